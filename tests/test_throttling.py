"""API rate limits: per token (or user), 429 with Retry-After and a JSON body, shared across processes."""

from __future__ import annotations

import httpx
import pytest
from django.db import connection
from rest_framework.test import APIClient

from sessions.api import throttles
from sessions.models import APIToken, RateCounter, Repository
from tests.live import child_env, free_port, web_process
from tests.test_streaming_e2e import redis_or_skip

SESSIONS = "/api/v1/sessions"


@pytest.fixture(autouse=True)
def fresh_store():
    throttles.reset_store()
    yield
    throttles.reset_store()


@pytest.fixture
def providers(settings):
    settings.LLM_PROVIDERS = {
        "scripted": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": ""}
    }


@pytest.fixture
def repository(team, sample_repo):
    return Repository.objects.create(team=team, name="sample", url=str(sample_repo), provider="local")


def bearer(user, name: str = "") -> APIClient:
    _, secret = APIToken.issue(user, name)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def assert_throttled(response) -> None:
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.json()["code"] == "throttled" and "throttled" in response.json()["detail"].lower()


@pytest.mark.django_db(transaction=True)
def test_it_limits_session_starts_more_strictly_than_other_requests(settings, providers, owner, repository):
    settings.API_RATE, settings.API_RATE_SESSIONS = "100/min", "2/min"
    client = bearer(owner)
    body = {"repository": repository.pk, "prompt": "go", "model": "scripted/demo"}
    assert [client.post(SESSIONS, body, format="json").status_code for _ in range(2)] == [201, 201]
    assert_throttled(client.post(SESSIONS, body, format="json"))
    assert client.get(SESSIONS).status_code == 200  # reading is not starting
    assert repository.sessions.count() == 2  # nothing half-created by the refused one


@pytest.mark.django_db(transaction=True)
def test_it_counts_each_token_on_its_own(settings, owner):
    settings.API_RATE = "3/min"
    first, second = bearer(owner, "a"), bearer(owner, "b")
    assert [first.get(SESSIONS).status_code for _ in range(3)] == [200, 200, 200]
    assert_throttled(first.get(SESSIONS))
    assert second.get(SESSIONS).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_it_counts_a_logged_in_user_by_account(settings, owner, teammate):
    settings.API_RATE = "2/min"
    client = APIClient()
    client.force_login(owner)
    assert [client.get(SESSIONS).status_code for _ in range(2)] == [200, 200]
    assert_throttled(client.get(SESSIONS))
    client.force_login(teammate)
    assert client.get(SESSIONS).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_it_does_not_limit_when_the_rate_is_off(settings, owner):
    settings.API_RATE = None
    client = bearer(owner)
    assert {client.get(SESSIONS).status_code for _ in range(30)} == {200}


@pytest.mark.django_db(transaction=True)
def test_it_shares_the_count_between_web_processes(tmp_path, owner):
    _, secret = APIToken.issue(owner, "ci")
    headers = {"Authorization": f"Bearer {secret}"}
    extra = {"DEPUTIES_API_RATE": "5/min"}
    if connection.vendor == "sqlite":  # the default store is per process there (one web process)
        extra["DEPUTIES_RATE_LIMIT_STORE"] = "database"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        web_process(child_env(tmp_path / "a", **extra), free_port()) as a,
        web_process(child_env(tmp_path / "b", **extra), free_port()) as b,
    ):
        codes = [httpx.get(f"{base}{SESSIONS}", headers=headers).status_code for base in (a, b) * 3]
        refused = httpx.get(f"{a}{SESSIONS}", headers=headers)
    assert codes == [200] * 5 + [429]
    assert refused.status_code == 429 and "Retry-After" in refused.headers


@pytest.mark.django_db(transaction=True)
def test_it_counts_in_redis_when_configured(settings, owner):
    import redis

    from tests.test_streaming_e2e import REDIS_URL

    redis_or_skip()

    redis.Redis.from_url(REDIS_URL).flushdb()
    settings.REDIS_URL, settings.RATE_LIMIT_STORE, settings.API_RATE = REDIS_URL, "redis", "2/min"
    client = bearer(owner)
    assert [client.get(SESSIONS).status_code for _ in range(2)] == [200, 200]
    assert_throttled(client.get(SESSIONS))
    assert not RateCounter.objects.exists()  # counted in Redis, not in the database
