"""web_fetch and web_search: real runs, a real page server and a SearXNG-speaking server on loopback."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from deputies.netguard import parse_networks
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Environment, Event, WebResult, start_session
from sessions.runner import execute

PAGE = (
    "<html><head><title>Release notes</title><style>body{color:red}</style></head><body>"
    "<script>var tracking = 'do not show';</script><h1>Version 2.0</h1><p>Faster &amp; smaller.</p>"
    "<ul><li>one</li><li>two</li></ul><p>token: tok-secret-123456</p></body></html>"
)


class PageServer:
    """A tiny web site on loopback that counts what it is asked for."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.release = threading.Event()
        self.keys: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.hits.append(self.path)
                path = urlsplit(self.path).path
                if path == "/notes":
                    self.reply(200, PAGE.encode(), "text/html; charset=utf-8")
                elif path == "/moved":
                    self.send_response(302)
                    self.send_header("Location", "/notes")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/stall":  # headers and a first chunk, then nothing until released
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b"first part")
                    self.wfile.flush()
                    outer.release.wait(10)
                elif path == "/res/v1/web/search":  # the Brave Search API's shape
                    outer.keys.append(self.headers.get("X-Subscription-Token", ""))
                    query = parse_qs(urlsplit(self.path).query)
                    results = [
                        {
                            "title": "Brave result",
                            "url": "https://example.org/b",
                            "description": f"about <strong>{query['q'][0]}</strong>",
                        }
                    ]
                    self.reply(200, json.dumps({"web": {"results": results}}).encode(), "application/json")
                elif path == "/big":
                    self.reply(200, b"x" * 50_000, "text/plain")
                elif path == "/search":
                    query = parse_qs(urlsplit(self.path).query)
                    assert query["format"] == ["json"]
                    results = [
                        {
                            "title": f"Result {n} for {query['q'][0]}",
                            "url": f"https://example.org/{n}",
                            "content": f"snippet {n}",
                        }
                        for n in range(1, 4)
                    ]
                    self.reply(200, json.dumps({"results": results}).encode(), "application/json")
                else:
                    self.reply(404, b"no such page", "text/plain")

            def reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site():
    server = PageServer()
    yield server
    server.close()


def call(tool: str, **arguments) -> dict:
    return {"name": tool, "arguments": arguments}


def run_session(run_settings, session, responses: list[dict]) -> list[dict]:
    with start_in_thread({"responses": responses}) as fake:
        run_settings.LLM_PROVIDERS = {
            "scripted": {"kind": "openai", "base_url": fake.base_url, "api_key": "k"}
        }
        execute(session.runs.get().pk)
        return [r["body"] for r in fake.requests]


def outputs(session) -> list[dict]:
    return [e.payload for e in Event.objects.filter(session=session, type="tool_finished").order_by("seq")]


@pytest.fixture
def session(team, owner, repository):
    environment = Environment.objects.create(team=team, name="web")
    environment.change_secrets({"PAGE_TOKEN": {"value": "tok-secret-123456"}}, new_revision=False)
    return start_session(
        team=team,
        repository=repository,
        environment=environment,
        prompt="Read the notes",
        model="scripted/demo",
        created_by=owner,
    )


def test_it_refuses_a_loopback_page_by_default(run_settings, session, site):
    run_session(
        run_settings,
        session,
        [{"tool_calls": [call("web_fetch", url=f"{site.url}/notes")]}, {"content": "ok"}],
    )
    (result,) = outputs(session)
    assert result["ok"] is False
    assert "is not allowed: a loopback address" in result["output"]
    assert "DEPUTIES_WEB_FETCH_ALLOWED_NETWORKS" in result["output"]
    assert site.hits == []  # refused before any connection
    assert session.runs.get().status == "completed"


def test_it_fetches_a_loopback_page_as_text_when_allowed(run_settings, session, site):
    run_settings.WEB_FETCH_ALLOWED_NETWORKS = parse_networks("127.0.0.0/8", "test")
    bodies = run_session(
        run_settings,
        session,
        [
            {"tool_calls": [call("web_fetch", url=f"{site.url}/moved")]},
            {"tool_calls": [call("web_fetch", url=f"{site.url}/moved")]},  # again: from the session cache
            {"tool_calls": [call("web_fetch", url=f"{site.url}/missing")]},
            {"content": "Read."},
        ],
    )
    first, second, missing = outputs(session)
    assert first["ok"] is True and first["output"] == second["output"]
    text = first["output"]
    assert f"URL: {site.url}/notes" in text and "Status: 200" in text  # the redirect was followed
    assert "# Release notes" in text and "Version 2.0" in text and "Faster & smaller." in text
    assert "- one" in text and "- two" in text
    assert "tracking" not in text and "color:red" not in text
    # A secret of the session's environment never reaches the events or the model.
    assert "[secret PAGE_TOKEN]" in text
    assert "tok-secret-123456" not in json.dumps(bodies)
    assert not Event.objects.filter(session=session, payload__icontains="tok-secret-123456").exists()
    assert site.hits == ["/moved", "/notes", "/missing"]
    assert WebResult.objects.filter(session=session, kind="fetch").count() == 1  # errors are not cached
    assert missing["ok"] is False and "Status: 404" in missing["output"]


def test_it_cuts_a_large_body_at_the_size_limit(run_settings, session, site):
    run_settings.WEB_FETCH_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    run_settings.WEB_FETCH_MAX_BYTES = 2048
    run_session(
        run_settings, session, [{"tool_calls": [call("web_fetch", url=f"{site.url}/big")]}, {"content": "ok"}]
    )
    (result,) = outputs(session)
    assert result["ok"] is True
    assert "[cut at 2048 bytes: DEPUTIES_WEB_FETCH_MAX_BYTES]" in result["output"]
    assert result["output"].split("\n\n")[1] == "x" * 2048


def test_it_refuses_other_schemes(run_settings, session):
    run_session(
        run_settings,
        session,
        [{"tool_calls": [call("web_fetch", url="file:///etc/passwd")]}, {"content": "ok"}],
    )
    (result,) = outputs(session)
    assert result["ok"] is False and "not an http:// or https:// URL" in result["output"]


def test_it_searches_through_a_searxng_backend_and_caches_per_session(run_settings, session, site):
    run_settings.WEB_SEARCH_BACKEND = "searxng"
    run_settings.WEB_SEARCH_URL = site.url
    bodies = run_session(
        run_settings,
        session,
        [
            {"tool_calls": [call("web_search", query="deputies agents", count=2)]},
            {"tool_calls": [call("web_search", query="deputies agents", count=2)]},
            {"content": "Found."},
        ],
    )
    assert "web_search" in [t["function"]["name"] for t in bodies[0]["tools"]]
    first, second = outputs(session)
    assert first["output"] == second["output"]
    assert first["output"].splitlines()[:3] == [
        "1. Result 1 for deputies agents",
        "   https://example.org/1",
        "   snippet 1",
    ]
    assert "Result 3" not in first["output"]
    assert [h.split("?")[0] for h in site.hits] == ["/search"]


def test_it_gives_up_on_a_page_past_the_time_limit(run_settings, session, site):
    run_settings.WEB_FETCH_ALLOWED_NETWORKS = parse_networks("127.0.0.1", "test")
    run_settings.WEB_FETCH_TIMEOUT = 0.5
    run_session(
        run_settings,
        session,
        [{"tool_calls": [call("web_fetch", url=f"{site.url}/stall")]}, {"content": "ok"}],
    )
    (result,) = outputs(session)
    assert result["ok"] is False and "timed out after 0.5 s" in result["output"]
    assert session.runs.get().status == "completed"


def test_it_searches_through_the_brave_api(run_settings, session, site):
    run_settings.WEB_SEARCH_BACKEND = "brave"
    run_settings.WEB_SEARCH_URL = f"{site.url}/res/v1"
    run_settings.WEB_SEARCH_API_KEY = "brave-key-123456"
    run_session(run_settings, session, [{"tool_calls": [call("web_search", query="mcp")]}, {"content": "ok"}])
    (result,) = outputs(session)
    assert result["output"] == "1. Brave result\n   https://example.org/b\n   about mcp"
    assert site.keys == ["brave-key-123456"]
    assert "brave-key-123456" not in json.dumps([e.payload for e in Event.objects.filter(session=session)])
