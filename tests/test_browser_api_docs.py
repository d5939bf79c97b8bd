"""The API docs in a real headless Chromium: Swagger UI renders with nothing from outside this server,
and "Try it out" with a bearer token gets a 200 from the live API.

Debian's ``chromium`` through Playwright's sync API, as in ``test_browser.py``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model

from sessions.models import APIToken, Membership, Role
from tests.live import child_env
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WebServer, require_chromium

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_it_tries_the_api_from_swagger_ui_with_a_bearer_token_offline(tmp_path, monkeypatch, team):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    user = get_user_model().objects.create(username="alice")
    Membership.objects.create(team=team, user=user, role=Role.MEMBER)
    _, secret = APIToken.issue(user, "docs")
    data_dir = tmp_path / "data"
    data_dir.mkdir()

    with WebServer(child_env(data_dir)) as web, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(15_000)
        outside: list[str] = []

        def only_this_server(route) -> None:
            if urlsplit(route.request.url).netloc == urlsplit(web.base).netloc:
                route.continue_()
            else:  # a CDN or anything else: refused, and the test fails below
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_this_server)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        page.goto(f"{web.base}/api/docs/")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("Deputies API")
        page.locator("button.authorize").first.click()
        bearer = page.locator(".auth-container form").filter(has_text="bearerToken")
        bearer.locator("input").fill(secret)
        bearer.locator("button.authorize").click()
        page.locator(".modal-ux button.close-modal").click()

        operation = page.locator(".opblock-get").filter(
            has=page.locator('.opblock-summary-path[data-path="/api/v1/sessions"]')
        )
        operation.locator(".opblock-summary").first.click()
        operation.locator("button.try-out__btn").click()
        with page.expect_response(lambda r: urlsplit(r.url).path == "/api/v1/sessions") as answer:
            operation.locator("button.execute").click()
        assert answer.value.status == 200
        assert answer.value.request.headers["authorization"] == f"Bearer {secret}"
        expect(operation.locator(".live-responses-table tbody .response-col_status").first).to_contain_text(
            "200"
        )

        browser.close()

    assert outside == []
    assert errors == []
