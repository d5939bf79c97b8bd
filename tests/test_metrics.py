"""/metrics: Prometheus text, read from the database at scrape time, behind a token or a staff login."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from deputies.metrics import LATENCY_BUCKETS, delivery_model
from sandboxes.models import Sandbox
from sessions.events import emit
from sessions.models import LLMCall, Repository, Run, Session

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def session(team):
    repo = Repository.objects.create(team=team, name="r", url="/tmp/none", provider="local")
    return Session.objects.create(team=team, repository=repo, base_branch="main", model="scripted/demo")


def call(session, latency_ms: int, age: float = 60, **fields) -> LLMCall:
    row = LLMCall.objects.create(
        session=session, provider="scripted", model="demo", latency_ms=latency_ms, **fields
    )
    LLMCall.objects.filter(pk=row.pk).update(created=timezone.now() - timedelta(seconds=age))
    return row


def test_it_refuses_anonymous_and_non_staff_scrapers(client, owner, settings):
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "not_authenticated"
    assert anonymous["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Basic eDp5").status_code == 401
    client.force_login(owner)
    assert client.get("/metrics").status_code == 403  # a team owner is not an operator


def test_it_answers_the_token_and_staff(client, admin_client, settings):
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    assert ("deputies_queue_depth", ()) in scrape(client, HTTP_AUTHORIZATION="Bearer s3cret-metrics-token")
    assert ("deputies_database_metrics_up", ()) in scrape(admin_client)


def test_it_refuses_every_token_when_none_is_configured(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 403


def test_it_counts_runs_sandboxes_queue_and_events_from_the_database(admin_client, session, team):
    Run.objects.create(session=session, status="running")
    other = Session.objects.create(team=team, repository=session.repository, base_branch="main", model="m")
    Run.objects.create(session=other, status="completed")
    Run.objects.create(session=other, status="queued", attempt=2)
    Sandbox.objects.create(session=session, provider="local", status="ready")
    Sandbox.objects.create(session=other, provider="local", status="destroyed")
    before = scrape(admin_client)
    for n in range(3):
        emit(session.pk, "progress", {"n": n})
    after = scrape(admin_client)
    assert after[("deputies_runs", (("status", "running"),))] == 1
    assert after[("deputies_runs", (("status", "queued"),))] == 1
    assert after[("deputies_runs", (("status", "failed"),))] == 0
    assert after[("deputies_active_sandboxes", (("provider", "local"),))] == 1
    assert after[("deputies_oldest_queued_run_seconds", ())] >= 0
    assert after[("deputies_events_total", ())] - before[("deputies_events_total", ())] == 3
    assert after[("deputies_database_metrics_up", ())] == 1


def test_it_builds_cumulative_llm_histograms_incrementally(admin_client, session):
    base = scrape(admin_client)  # the process's collector keeps its totals: compare with these

    def grew(samples, name: str, **labels) -> float:
        key = (name, tuple(sorted({"model": "demo", **labels}.items())))
        return samples[key] - base.get(key, 0)

    call(session, 80, input_tokens=100, output_tokens=20, cached_tokens=50, cost_usd=Decimal("0.01"))
    call(session, 1500, input_tokens=3000, output_tokens=400, cost_usd=Decimal("0.02"))
    call(session, 900, outcome="retry", status_code=500)
    first = scrape(admin_client)
    assert grew(first, "deputies_llm_latency_seconds_count") == 3
    assert grew(first, "deputies_llm_latency_seconds_bucket", le="0.1") == 1
    assert grew(first, "deputies_llm_latency_seconds_bucket", le="1.0") == 2
    assert grew(first, "deputies_llm_latency_seconds_bucket", le="+Inf") == 3
    assert grew(first, "deputies_llm_latency_seconds_sum") == pytest.approx(2.48)
    assert grew(first, "deputies_llm_tokens_total", kind="input") == 3100
    assert grew(first, "deputies_llm_tokens_total", kind="cached") == 50
    assert grew(first, "deputies_llm_cost_usd_total") == pytest.approx(0.03)
    assert grew(first, "deputies_llm_calls_total", outcome="retry") == 1
    assert grew(first, "deputies_llm_call_tokens_count") == 2  # successful calls only
    assert grew(first, "deputies_llm_call_tokens_bucket", le="500.0") == 1

    call(session, 70_000, input_tokens=10, output_tokens=1)
    call(session, 50, age=0)  # just written: counted once it has settled
    second = scrape(admin_client)
    assert grew(second, "deputies_llm_latency_seconds_count") == 4
    assert grew(second, "deputies_llm_latency_seconds_bucket", le="60.0") == 3
    assert grew(second, "deputies_llm_latency_seconds_bucket", le="120.0") == 4
    assert grew(second, "deputies_llm_tokens_total", kind="input") == 3110
    assert len(LATENCY_BUCKETS) + 1 == sum(
        1 for name, _ in second if name == "deputies_llm_latency_seconds_bucket"
    )


def test_it_counts_deliveries_by_status(admin_client, session):
    delivery = delivery_model()
    for n, status in enumerate(["pending", "pending", "failed"]):
        delivery.objects.create(
            session=session, target="https://example.com/hook", idempotency_key=f"k{n}", status=status
        )
    samples = scrape(admin_client)
    assert samples[("deputies_deliveries", (("status", "pending"),))] == 2
    assert samples[("deputies_deliveries", (("status", "failed"),))] == 1


def test_it_shows_per_process_metrics_too(admin_client):
    families = {name for name, _ in scrape(admin_client)}
    assert "process_resident_memory_bytes" in families or "python_info" in families
