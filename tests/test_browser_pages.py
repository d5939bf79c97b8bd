"""Pages a person opens directly, in a real headless Chromium against ``deputies web``: the usage
charts' text at the page's scale with cards apart, a diff opened by its own address as a whole styled
page, and a favicon.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher

from sessions.artifacts import store_artifact
from sessions.models import LLMCall, Membership, Role, start_session
from tests.live import child_env
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WebServer, require_chromium

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

DIFF = "diff --git a/calc.py b/calc.py\n--- a/calc.py\n+++ b/calc.py\n@@ -1 +1 @@\n-    return a - b\n+    return a + b\n"


def test_it_renders_usage_diff_pages_and_favicon_as_a_person_sees_them(
    tmp_path, monkeypatch, settings, team, repository
):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    password = PBKDF2PasswordHasher().encode("correct-horse", "saltsaltsalt", iterations=1000)
    user = get_user_model().objects.create(username="alice", password=password)
    Membership.objects.create(team=team, user=user, role=Role.OWNER)
    session = start_session(
        team=team, repository=repository, prompt="Fix it", model="scripted/demo", created_by=user
    )
    for model, cost in (("scripted/demo", "0.40"), ("scripted/summaries-with-a-long-name", "0.05")):
        LLMCall.objects.create(
            session=session,
            provider="scripted",
            model=model,
            input_tokens=900,
            output_tokens=90,
            cost_usd=Decimal(cost),
        )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"  # where the web process reads artifacts
    store_artifact(session.pk, "diff", f"session-{session.pk}.diff", DIFF.encode())

    with WebServer(child_env(data_dir)) as web, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(f"{web.base}/login")
        page.get_by_label("Username").fill("alice")
        page.get_by_label("Password").fill("correct-horse")
        page.get_by_role("button", name="Log in").click()
        expect(page.locator(".topbar .who")).to_have_text("alice")

        page.goto(f"{web.base}/usage")
        body_px = page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)")
        label_px = page.evaluate(
            """() => Math.max(...[...document.querySelectorAll('svg.chart text')].map(t => {
                 const svg = t.ownerSVGElement;
                 const scale = svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
                 return parseFloat(getComputedStyle(t).fontSize) * scale;
               }))"""
        )
        assert 9 <= label_px <= body_px, (label_px, body_px)
        gaps = page.evaluate(
            """() => { const cards = [...document.querySelectorAll('main section.card')];
                 return cards.slice(1).map((c, i) => c.getBoundingClientRect().top - cards[i].getBoundingClientRect().bottom); }"""
        )
        assert gaps and min(gaps) >= 8, gaps

        page.goto(f"{web.base}/sessions/{session.pk}/diff")
        expect(page.locator(".topbar .brand")).to_be_visible()  # the app's page, not a bare fragment
        expect(page.locator(".diff-file summary")).to_contain_text("calc.py")
        expect(page.locator(".dl-add .code .k")).to_have_text("return")  # highlighted

        icon = page.request.get(f"{web.base}/favicon.ico")
        assert icon.ok and "svg" in icon.headers["content-type"]
        browser.close()
