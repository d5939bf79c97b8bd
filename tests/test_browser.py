"""The dashboard in a real headless Chromium against live processes: daphne, a worker, the scripted LLM.

Debian's ``chromium`` is driven through Playwright's sync API (``playwright install`` is never needed).
Without /usr/bin/chromium the test is skipped, except with CI=true where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connection

from sessions.agent.fake_llm import start_in_thread
from sessions.models import Event, Membership, Repository, Role, Run, Session
from tests.live import ROOT, child_env, stop_process, wait_for, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCRIPT = json.loads((ROOT / "deputies" / "demo" / "script.json").read_text())
PRICES = {"scripted/demo": {"input": 3.0, "output": 15.0, "cached": 0.3}}
SLOW = "[slow]"  # a prompt with this marker waits at its second model call until the test says so
TIMEOUT = 45_000  # ms, for expectations that wait on a run


def require_chromium() -> None:
    problem = ""
    if not CHROMIUM.exists():
        problem = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is missing (pip install -e '.[dev]')"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run in CI: {problem}")
        pytest.skip(problem)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebServer:
    """``deputies web`` (daphne: HTTP and websockets) on a fixed free port, so it can be restarted."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(env["DEPUTIES_DATA_DIR"]) / "web.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "deputies.cli",
                    "web",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self.answers, timeout=30, interval=0.05, what="daphne to answer")

    def answers(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Gates:
    """Holds scripted model calls so the test, not the clock, decides when a run moves on.

    Every conversation's first call waits for ``start`` (so the page is open before the agent acts);
    a ``[slow]`` prompt's second call waits for ``release`` (a long run to cancel).
    """

    def __init__(self) -> None:
        self.start = threading.Event()
        self.slow_waiting = threading.Event()
        self.release = threading.Event()

    def __call__(self, body: dict) -> None:
        messages = body.get("messages", [])
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        answered = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        if answered == 0:
            self.start.wait(30)
        elif answered == 1 and users and SLOW in str(users[0].get("content")):
            self.slow_waiting.set()
            self.release.wait(30)

    def open_all(self) -> None:
        self.start.set()
        self.release.set()


def assert_page_matches_database(page, session_id: int) -> None:
    """Every stored event on the timeline once, in order (tool results fold into their call), and the
    totals equal to the session's: nothing missed or repeated across reconnects."""
    stored = Event.objects.filter(session_id=session_id).order_by("seq").values_list("seq", "type")
    expected = [seq for seq, type in stored if type not in ("usage", "tool_finished")]
    shown = page.locator("#timeline > li").evaluate_all("items => items.map(li => Number(li.dataset.seq))")
    assert shown == expected
    session = Session.objects.get(pk=session_id)
    assert page.locator("#total-input").inner_text() == str(session.input_tokens)
    assert page.locator("#total-output").inner_text() == str(session.output_tokens)
    assert page.locator("#total-cost").inner_text() == f"${session.cost_usd:.4f}"


def test_it_watches_steers_and_cancels_sessions_in_a_browser(tmp_path, monkeypatch, team, sample_repo):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM calls below are still sync.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    # The web process knows only the default hashers, not the tests' fast MD5 one.
    password = PBKDF2PasswordHasher().encode("correct-horse", "saltsaltsalt", iterations=1000)
    user = get_user_model().objects.create(username="alice", password=password)
    Membership.objects.create(team=team, user=user, role=Role.OWNER)
    repository = Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    gates = Gates()

    with start_in_thread(SCRIPT) as fake:
        fake.on_request = gates
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_LLM_SCRIPTED_API_KEY="sk-test",
            DEPUTIES_DEFAULT_MODEL="scripted/demo",
            DEPUTIES_LLM_PRICES=json.dumps(PRICES),
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
        )
        try:
            with (
                worker_process(env) as worker,
                WebServer(env) as web,
                sync_playwright() as playwright,
            ):
                base = web.base
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.set_default_timeout(15_000)
                page = context.new_page()
                sockets: list[str] = []
                page.on("websocket", lambda ws: sockets.append(ws.url))
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))

                # Log in; the empty list invites a first session.
                page.goto(f"{base}/")
                expect(page).to_have_url(f"{base}/login?next=/")
                page.get_by_label("Username").fill("alice")
                page.get_by_label("Password").fill("correct-horse")
                page.get_by_role("button", name="Log in").click()
                expect(page).to_have_url(f"{base}/")
                expect(page.get_by_text("No sessions yet — start one")).to_be_visible()

                # Start a session with the form; a bad model is refused at the field first.
                page.get_by_role("link", name="Start a session").click()
                page.get_by_label("Repository", exact=True).select_option(str(repository.pk))
                page.get_by_label("Model").fill("nowhere/model")
                page.get_by_label("Prompt").fill("Make the failing test pass")
                page.get_by_role("button", name="Start session").click()
                expect(page.locator("#id_model_error")).to_contain_text("Unknown provider 'nowhere'")
                expect(page.get_by_label("Prompt")).to_have_value("Make the failing test pass")
                page.get_by_label("Model").fill("scripted/demo")
                page.get_by_role("button", name="Start session").click()
                expect(page).to_have_url(f"{base}/sessions/{Session.objects.get().pk}")
                session = Session.objects.get()
                assert session.source == "web"

                # Events appear without a reload: the run reaches the model and waits at the gate.
                page.evaluate("window.__sameDocument = true")
                timeline = page.locator("#timeline")
                status = page.locator("#session-status")
                expect(timeline.locator(".ev-repository")).to_be_visible(timeout=TIMEOUT)
                expect(status).to_have_text("running")
                expect(page.locator("#connection")).to_have_attribute("data-state", "live")
                expect(page.locator("#cancel-form")).to_be_visible()

                # The web server goes away while the run goes on; the page catches up when it is back.
                web.stop()
                expect(page.locator("#connection")).not_to_have_attribute("data-state", "live")
                gates.start.set()
                wait_for(
                    lambda: Session.objects.get(pk=session.pk).status == "completed", timeout=45, what="run 1"
                )
                web.start()
                expect(status).to_have_text("completed", timeout=TIMEOUT)
                # Connected again, but a finished session does not claim to be live.
                expect(page.locator("#connection")).to_have_attribute(
                    "data-state", "finished", timeout=20_000
                )
                expect(page.locator("#connection")).to_contain_text("Finished (completed)")
                expect(page.locator("#followup-scripted")).to_contain_text("cannot follow new instructions")
                assert_page_matches_database(page, session.pk)
                expect(timeline.locator(".ev-completed")).to_contain_text("Fixed add() in calc.py")
                expect(timeline.locator(".ev-assistant").first).to_contain_text("I will run the tests first")
                expect(page.locator("#todos .todo-completed")).to_have_count(3)
                expect(page.locator("#cancel-form")).to_be_hidden()

                # A tool call opens to show its output.
                bash = timeline.locator(".ev-tool", has_text="python3 -m unittest").first
                bash.locator("summary").click()
                expect(bash.locator(".tool-output")).to_contain_text("Ran 2 tests")

                # The diff arrived live; open it from the header.
                page.locator("#changes-link").click()
                changes = page.locator("#changes")
                expect(changes.locator(".diff-file summary", has_text="calc.py")).to_be_visible()
                expect(changes.locator(".dl-add").first).to_contain_text("return a + b")
                expect(changes.locator(".dl-del").first).to_contain_text("return a - b")
                expect(page.locator("#changes-link")).to_contain_text("+1")
                artifact = page.locator("#artifacts a").first
                expect(artifact).to_have_text(f"session-{session.pk}-run-1.diff")
                download = page.request.get(base + artifact.get_attribute("href"))
                assert download.ok and "+    return a + b" in download.text()

                # A follow-up starts a second run in the same session; its diff replaces the first.
                page.get_by_label("Follow-up message").fill("Add a changelog entry")
                page.get_by_role("button", name="Send").click()
                expect(timeline.locator(".ev-message", has_text="Add a changelog entry")).to_be_visible()
                expect(page.get_by_label("Follow-up message")).to_have_value("")
                expect(timeline.locator(".ev-completed")).to_have_count(2, timeout=TIMEOUT)
                expect(timeline.locator(".ev-status").last).to_contain_text("completed")
                expect(status).to_have_text("completed")
                expect(changes.locator(".diff-file summary", has_text="CHANGELOG.md")).to_be_visible()
                expect(timeline.locator(".ev-message .badge.pending")).to_have_count(0)
                assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
                assert any(f"/ws/sessions/{session.pk}/" in url for url in sockets), sockets

                assert_page_matches_database(page, session.pk)

                page.locator("#changes").scroll_into_view_if_needed()
                page.screenshot(path=str(shots / "session-page.png"), full_page=True)

                # Keyboard: the controls are reachable with Tab, in page order.
                page.goto(f"{base}/sessions/{session.pk}")
                wanted = {"Log out", "Archive", "followup-content", "Send"}
                reached = set()
                for _ in range(80):
                    page.keyboard.press("Tab")
                    reached.add(page.evaluate("(e => e.id || e.textContent.trim())(document.activeElement)"))
                    if wanted <= reached:
                        break
                assert wanted <= reached, reached

                # Phone width: nothing runs off the side of the screen.
                page.set_viewport_size({"width": 375, "height": 800})
                for url in (
                    f"{base}/sessions/{session.pk}",
                    f"{base}/",
                    f"{base}/sessions/new",
                    f"{base}/usage",
                ):
                    page.goto(url)
                    width = page.evaluate("document.documentElement.scrollWidth")
                    assert width <= 375, f"{url} is {width}px wide at 375px"
                page.goto(f"{base}/sessions/{session.pk}")
                page.screenshot(path=str(shots / "session-page-phone.png"), full_page=True)
                page.set_viewport_size({"width": 1280, "height": 900})

                # Tabs without websockets follow the list and the session pages by polling the API.
                polling_list, polling = context.new_page(), context.new_page()
                for tab in (polling_list, polling):
                    tab.add_init_script("delete window.WebSocket")
                polling_list.goto(f"{base}/")
                expect(polling_list.locator("#connection")).to_have_attribute("data-state", "polling")

                # The list page hears about new sessions over its channel.
                listing = context.new_page()
                listing.goto(f"{base}/")
                expect(listing.locator("#connection")).to_have_attribute("data-state", "live")
                expect(
                    listing.locator(f'tr[data-session-id="{session.pk}"] [data-field="status"]')
                ).to_have_text("completed")

                # A long run: cancel it while the model is still thinking.
                page.goto(f"{base}/sessions/new")
                page.get_by_label("Repository", exact=True).select_option(str(repository.pk))
                page.get_by_label("Prompt").fill(f"{SLOW} Make the failing test pass")
                page.get_by_role("button", name="Start session").click()
                expect(page).to_have_url(f"{base}/sessions/{session.pk + 1}")
                expect(page.locator("#todos .todo")).to_have_count(3, timeout=TIMEOUT)
                wait_for(gates.slow_waiting.is_set, timeout=30, what="the slow model call")
                expect(page.locator("#session-status")).to_have_text("running")
                expect(listing.locator("#list-new")).to_be_visible()
                polling.goto(page.url)
                expect(polling.locator("#connection")).to_have_attribute("data-state", "polling")
                expect(polling.locator("#todos .todo")).to_have_count(3)
                page.get_by_role("button", name="Cancel run").click()
                expect(page.locator(".flash")).to_contain_text("Session cancelled.")
                expect(page.locator("#session-status")).to_have_text("cancelled")
                expect(page.locator("#cancel-form")).to_be_hidden()
                expect(polling.locator("#session-status")).to_have_text("cancelled")
                expect(polling.locator("#cancel-form")).to_be_hidden()
                expect(polling_list.locator("#list-new")).to_be_visible()
                page.screenshot(path=str(shots / "session-cancelled.png"), full_page=True)
                long_run = Run.objects.get(session_id=session.pk + 1)
                assert long_run.status == Run.Status.CANCELLED
                gates.release.set()

                # Archive it: gone from the default list, there when filtered.
                page.get_by_role("button", name="Archive").click()
                expect(page.locator("#session-status")).to_have_text("archived")
                page.goto(f"{base}/")
                expect(page.locator("tbody tr")).to_have_count(1)
                page.goto(f"{base}/?status=archived")
                expect(page.locator("tbody tr")).to_have_count(1)
                assert not errors, errors
                browser.close()
                # Playwright runs this block in its own context, which got its own database connection.
                connection.close()
                stop_process(worker, timeout=10)
        finally:
            gates.open_all()
            results = ROOT / "test-results"
            results.mkdir(exist_ok=True)
            for shot in shots.glob("*.png"):
                shutil.copy(shot, results / shot.name)
