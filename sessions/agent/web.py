"""``web_fetch`` and ``web_search``: the agent reads the web through the worker, not the sandbox.

A fetch is a GET through ``deputies.netguard.guarded_client``: the address actually connected to is
checked against the same rules as callbacks (no loopback, link-local, metadata or private
addresses unless ``DEPUTIES_WEB_FETCH_ALLOWED_NETWORKS`` opens a range), redirects are followed by
hand (each hop checked again), the body is cut at ``DEPUTIES_WEB_FETCH_MAX_BYTES`` and the whole
fetch at ``DEPUTIES_WEB_FETCH_TIMEOUT``. HTML comes back as its text.

Search goes to a pluggable backend (``DEPUTIES_WEB_SEARCH_BACKEND``: SearXNG or the Brave Search
API; ``SEARCH_BACKENDS`` maps a name to a function); with none, the tool is not offered. Both cache their answers per session (``WebResult``), so asking twice costs nothing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin

import httpx
from django.conf import settings
from django.db import IntegrityError

from deputies.netguard import UnsafeAddress, check_url, guarded_client
from sessions.agent.tools import ToolError, ToolResult, _spec, register_worker_tool

FETCH_SETTING = "DEPUTIES_WEB_FETCH_ALLOWED_NETWORKS"
MAX_REDIRECTS = 5
USER_AGENT = "Deputies-web_fetch/1 (+https://github.com/deputies)"
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "+json", "+xml")


class _TextExtractor(HTMLParser):
    """Readable text of an HTML page: no scripts or styles, blocks on their own lines."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    BLOCKS = {
        *("p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer"),
        *("h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "dd", "dt", "nav", "main"),
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.title = ""
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "title":
            self.in_title = True
        elif tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        elif tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title += data
        elif not self.skipping:
            self.parts.append(data)


def html_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(parser.parts).split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    title = parser.title.strip()
    return f"# {title}\n\n{text}" if title else text


# --- the per-session cache --------------------------------------------------------------------


def cached(context: Any, kind: str, key: str, produce: Callable[[], str]) -> str:
    from sessions.models import WebResult

    session_id = context.session.pk
    digest = WebResult.hash(key)
    hit = WebResult.objects.filter(session_id=session_id, kind=kind, key_hash=digest).first()
    if hit is not None:
        return hit.text
    text = produce()
    try:
        WebResult.objects.create(session_id=session_id, kind=kind, key_hash=digest, key=key, text=text)
    except IntegrityError:  # the same request twice in one reply: the first stored wins
        pass
    return text


# --- web_fetch -----------------------------------------------------------------------------------


def fetch(url: str) -> tuple[int, str]:
    """(status, the page at ``url`` as text for the model); ToolError for anything it should know."""
    allowed = settings.WEB_FETCH_ALLOWED_NETWORKS
    deadline = time.monotonic() + settings.WEB_FETCH_TIMEOUT
    limit = settings.WEB_FETCH_MAX_BYTES
    with guarded_client(allowed, FETCH_SETTING, timeout=settings.WEB_FETCH_TIMEOUT) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                check_url(url, allowed=allowed, setting=FETCH_SETTING)
                with client.stream(
                    "GET",
                    url,
                    headers={"User-Agent": USER_AGENT, "Accept": "text/html, text/*;q=0.9, */*;q=0.5"},
                ) as response:
                    if response.is_redirect and response.headers.get("location"):
                        url = urljoin(url, response.headers["location"])
                        continue
                    body, cut = bytearray(), False
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > limit:
                            del body[limit:]
                            cut = True
                            break
                        if time.monotonic() > deadline:
                            raise ToolError(
                                f"web_fetch: {url} took longer than {settings.WEB_FETCH_TIMEOUT:g} s "
                                "(DEPUTIES_WEB_FETCH_TIMEOUT)"
                            )
                    return response.status_code, _describe(url, response, bytes(body), cut)
            except UnsafeAddress as exc:
                raise ToolError(f"web_fetch: {url}: {exc}") from None
            except httpx.TimeoutException:
                raise ToolError(
                    f"web_fetch: {url} timed out after {settings.WEB_FETCH_TIMEOUT:g} s"
                ) from None
            except httpx.HTTPError as exc:
                raise ToolError(f"web_fetch: {url}: {type(exc).__name__}: {exc}") from None
    raise ToolError(f"web_fetch: more than {MAX_REDIRECTS} redirects, the last to {url}")


def _describe(url: str, response: httpx.Response, body: bytes, cut: bool) -> str:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    head = f"URL: {url}\nStatus: {response.status_code}\nContent-Type: {content_type or 'unknown'}\n\n"
    if content_type and not any(t in content_type for t in TEXT_TYPES):
        return head + f"(a {content_type} body of {len(body)} bytes{'+' if cut else ''}; not text, not shown)"
    text = body.decode(response.encoding or "utf-8", errors="replace")
    if "html" in content_type or (not content_type and "<html" in text[:2000].lower()):
        text = html_text(text)
    note = f"\n\n[cut at {len(body)} bytes: DEPUTIES_WEB_FETCH_MAX_BYTES]" if cut else ""
    return head + text + note


def _web_fetch(context: Any, args: dict[str, Any]) -> ToolResult:
    url = args["url"].strip()
    if not re.match(r"(?i)^https?://", url):
        raise ToolError(f"web_fetch: {url!r} is not an http:// or https:// URL")

    def produce() -> str:
        status, text = fetch(url)
        if not 200 <= status < 300:
            raise _NotCached(text)  # not cached: an error page may be gone next time
        return text

    try:
        return ToolResult(ok=True, output=cached(context, "fetch", url, produce))
    except _NotCached as exc:
        return ToolResult(ok=False, output=str(exc))


class _NotCached(Exception):
    pass


register_worker_tool(
    _spec(
        "web_fetch",
        "Fetch a web page or file over http(s) (GET) and return its text (HTML is converted to "
        "text). Use it for documentation, issues or release notes; it cannot reach internal addresses.",
        {"url": {"type": "string", "minLength": 1, "description": "An http:// or https:// URL."}},
        ["url"],
    ),
    _web_fetch,
    offered=lambda context: settings.WEB_FETCH_ENABLED,
)


# --- web_search ----------------------------------------------------------------------------------


def searxng(query: str, count: int) -> list[dict[str, str]]:
    """A SearXNG instance's JSON API (``/search?format=json``; the instance must enable the json
    format). Its address is the operator's, so it is not held to the user-address rules."""
    with httpx.Client(timeout=settings.WEB_FETCH_TIMEOUT, trust_env=False, follow_redirects=False) as client:
        response = client.get(
            f"{settings.WEB_SEARCH_URL}/search",
            params={"q": query, "format": "json"},
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )
        response.raise_for_status()
        data = response.json()
    results = data.get("results", []) if isinstance(data, dict) else []
    return [
        {"title": str(r.get("title", "")), "url": str(r.get("url", "")), "snippet": str(r.get("content", ""))}
        for r in results[:count]
        if isinstance(r, dict)
    ]


def brave(query: str, count: int) -> list[dict[str, str]]:
    """The Brave Search API (``/web/search``, key in ``X-Subscription-Token``)."""
    with httpx.Client(timeout=settings.WEB_FETCH_TIMEOUT, trust_env=False, follow_redirects=False) as client:
        response = client.get(
            f"{settings.WEB_SEARCH_URL}/web/search",
            params={"q": query, "count": min(count, 20)},
            headers={
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
                "X-Subscription-Token": settings.WEB_SEARCH_API_KEY,
            },
        )
        response.raise_for_status()
        data = response.json()
    web = data.get("web", {}) if isinstance(data, dict) else {}
    results = web.get("results", []) if isinstance(web, dict) else []
    return [
        {
            "title": str(r.get("title", "")),
            "url": str(r.get("url", "")),
            "snippet": html_text(str(r.get("description", ""))),  # Brave marks matches with <strong>
        }
        for r in results[:count]
        if isinstance(r, dict)
    ]


SEARCH_BACKENDS: dict[str, Callable[[str, int], list[dict[str, str]]]] = {"searxng": searxng, "brave": brave}


def _web_search(context: Any, args: dict[str, Any]) -> ToolResult:
    query = args["query"].strip()
    count = min(args.get("count", settings.WEB_SEARCH_RESULTS), settings.WEB_SEARCH_RESULTS)
    backend = SEARCH_BACKENDS[settings.WEB_SEARCH_BACKEND]

    def produce() -> str:
        try:
            results = backend(query, count)
        except (httpx.HTTPError, ValueError) as exc:
            raise ToolError(f"web_search: the search backend failed: {type(exc).__name__}: {exc}") from None
        if not results:
            return f"No results for {query!r}."
        return "\n".join(
            f"{n}. {r['title']}\n   {r['url']}\n   {r['snippet']}".rstrip() for n, r in enumerate(results, 1)
        )

    return ToolResult(ok=True, output=cached(context, "search", f"{count}:{query}", produce))


register_worker_tool(
    _spec(
        "web_search",
        "Search the web; returns titles, URLs and snippets. Read a result with `web_fetch`.",
        {
            "query": {"type": "string", "minLength": 1, "description": "What to search for."},
            "count": {"type": "integer", "minimum": 1, "description": "How many results (default: all)."},
        },
        ["query"],
    ),
    _web_search,
    offered=lambda context: settings.WEB_SEARCH_BACKEND in SEARCH_BACKENDS,
)
