"""The environment pages in a real headless Chromium against ``deputies web`` (daphne) on Postgres:
log in, create an environment with a secret (after one refused attempt), find it in the list, edit it.

Debian's ``chromium`` through Playwright's sync API, as in ``test_browser.py`` (never ``playwright
install``); skipped without it, except with CI=true where that is a failure.
"""

from __future__ import annotations

import shutil

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.db import connection

from sessions.models import Environment, Membership, Role
from sessions.secrets import decrypt
from tests.live import ROOT, child_env
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WebServer, require_chromium

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

TOKEN = "tok-browser-7c1e94b2d0"
DSN = "https://k3y-5f0e2a@sentry.example.com/42"


def test_it_creates_lists_and_edits_an_environment_in_a_browser(tmp_path, monkeypatch, team):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    password = PBKDF2PasswordHasher().encode("correct-horse", "saltsaltsalt", iterations=1000)
    user = get_user_model().objects.create(username="alice", password=password)
    Membership.objects.create(team=team, user=user, role=Role.OWNER)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    env = child_env(
        data_dir, DEPUTIES_LLM_PROVIDERS="scripted", DEPUTIES_LLM_SCRIPTED_BASE_URL="http://127.0.0.1:9/v1"
    )

    try:
        with WebServer(env) as web, sync_playwright() as playwright:
            base = web.base
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(15_000)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            served: list[str] = []

            def keep_html(response) -> None:
                html = "text/html" in response.headers.get("content-type", "")
                if html and not 300 <= response.status < 400:
                    served.append(response.text())

            page.on("response", keep_html)
            nav = page.get_by_role("navigation", name="Main")

            # Log in; the empty list invites a first environment.
            page.goto(f"{base}/environments")
            expect(page).to_have_url(f"{base}/login?next=/environments")
            page.get_by_label("Username").fill("alice")
            page.get_by_label("Password").fill("correct-horse")
            page.get_by_role("button", name="Log in").click()
            expect(page).to_have_url(f"{base}/environments")
            expect(nav.get_by_role("link", name="Environments")).to_have_attribute("aria-current", "page")
            expect(page.get_by_text("No environments yet")).to_be_visible()

            # Create one with a secret; a malformed variable line is refused at its field first.
            page.get_by_role("link", name="Create an environment").click()
            expect(page).to_have_url(f"{base}/environments/new")
            page.get_by_label("Name", exact=True).fill("python")
            page.get_by_label("Image").fill("python:3.12-slim")
            page.get_by_label("Environment variables").fill("LOG_LEVEL=debug\nnot a pair")
            page.get_by_label("Network").select_option("bridge")
            page.get_by_label("Memory (MB)").fill("2048")
            page.get_by_label("Name of new secret 1").fill("API_TOKEN")
            page.get_by_label("Value of new secret 1").fill(TOKEN)
            page.get_by_label("Visible in sandbox (new secret 1)").check()
            page.get_by_role("button", name="Create environment").click()
            expect(page.locator("#id_env_vars_error")).to_have_text("Line 2: expected KEY=value.")
            expect(page.locator("#form-errors")).to_contain_text("type the ones you entered once more")
            expect(page.get_by_label("Name of new secret 1")).to_have_value("API_TOKEN")
            expect(page.get_by_label("Value of new secret 1")).to_have_value("")  # retyped, never sent back
            expect(page.get_by_label("Memory (MB)")).to_have_value("2048")
            page.screenshot(path=str(shots / "environment-refused.png"), full_page=True)
            assert Environment.objects.count() == 0
            page.get_by_label("Environment variables").fill("LOG_LEVEL=debug")
            page.get_by_label("Value of new secret 1").fill(TOKEN)
            page.get_by_role("button", name="Create environment").click()
            expect(page.locator(".flash")).to_have_text("Environment python created (revision 1).")
            environment = Environment.objects.get()
            expect(page).to_have_url(f"{base}/environments/{environment.pk}")
            expect(page.locator("#environment-revision")).to_have_text("revision 1")
            secret = environment.secrets.get()
            assert secret.name == "API_TOKEN" and secret.sandbox_visible
            assert TOKEN not in secret.ciphertext and decrypt(secret.ciphertext) == TOKEN

            # It is in the list.
            nav.get_by_role("link", name="Environments").click()
            row = page.locator(f'tr[data-environment-id="{environment.pk}"]')
            expect(row.get_by_role("link", name="python")).to_be_visible()
            expect(row.locator('[data-field="revision"]')).to_have_text("r1")
            expect(row.locator('[data-field="secrets"]')).to_have_text("1")
            expect(row).to_contain_text("python:3.12-slim")
            expect(row).to_contain_text("bridge")
            page.screenshot(path=str(shots / "environments.png"), full_page=True)

            # Edit it: a new image, the secret no longer in the sandbox, a second secret.
            row.get_by_role("link", name="python").click()
            expect(page.get_by_label("Image")).to_have_value("python:3.12-slim")
            expect(page.get_by_label("Visible in sandbox (API_TOKEN)")).to_be_checked()
            page.get_by_label("Image").fill("python:3.13-slim")
            page.get_by_label("Visible in sandbox (API_TOKEN)").uncheck()
            page.get_by_label("Name of new secret 1").fill("SENTRY_DSN")
            page.get_by_label("Value of new secret 1").fill(DSN)
            page.get_by_role("button", name="Save changes").click()
            expect(page.locator(".flash")).to_have_text("Saved as revision 2.")
            expect(page.locator("#environment-revision")).to_have_text("revision 2")
            expect(page.get_by_label("Image")).to_have_value("python:3.13-slim")
            expect(page.get_by_label("Visible in sandbox (API_TOKEN)")).not_to_be_checked()
            expect(page.locator("#secret-SENTRY_DSN")).to_be_visible()
            environment.refresh_from_db()
            assert environment.revision == 2 and environment.image == "python:3.13-slim"
            secrets = {s.name: s for s in environment.secrets.all()}
            assert (
                not secrets["API_TOKEN"].sandbox_visible and decrypt(secrets["SENTRY_DSN"].ciphertext) == DSN
            )
            page.screenshot(path=str(shots / "environment-form.png"), full_page=True)

            # Keyboard: the secret controls and the save button are reachable with Tab.
            wanted = {"secret-API_TOKEN-value", "secret-API_TOKEN-remove", "new-1-name", "Save changes"}
            reached = set()
            for _ in range(60):
                page.keyboard.press("Tab")
                reached.add(page.evaluate("(e => e.id || e.textContent.trim())(document.activeElement)"))
                if wanted <= reached:
                    break
            assert wanted <= reached, reached

            # A tablet and a phone: nothing runs off the side of the screen.
            page.set_viewport_size({"width": 800, "height": 900})
            page.goto(f"{base}/environments")
            assert page.evaluate("document.documentElement.scrollWidth") <= 800
            page.set_viewport_size({"width": 375, "height": 800})
            for url in (
                f"{base}/environments",
                f"{base}/environments/new",
                f"{base}/environments/{environment.pk}",
            ):
                page.goto(url)
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= 375, f"{url} is {width}px wide at 375px"
                name = url.rstrip("/").rsplit("/", 1)[-1]
                page.screenshot(path=str(shots / f"environment-phone-{name}.png"), full_page=True)

            # No page the browser was served held a secret value.
            assert served and not [html for html in served if TOKEN in html or DSN in html]
            assert not errors, errors
            browser.close()
            # Playwright runs this block in its own context, which got its own database connection.
            connection.close()
    finally:
        results = ROOT / "test-results"
        results.mkdir(exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, results / shot.name)
