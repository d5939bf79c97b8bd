"""What sends callbacks: every way a run ends, a real run end to end, and the deliveries API."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone

from integrations.deliveries import services
from integrations.deliveries.models import CallbackSubscription, Delivery
from integrations.deliveries.senders import parse_retry_after, sign
from sessions.agent.fake_llm import start_in_thread
from sessions.models import Event, Run, Session, start_session
from tests.callback_receiver import Receiver
from tests.conftest import client_for
from tests.live import child_env, wait_for, worker_process

SECRET = "whsec-trigger-secret"
SCRIPT = json.loads(open("deputies/demo/script.json").read())
PRICES = {"scripted/demo": {"input": 3.0, "output": 15.0, "cached": 0.3}}


def subscribed_session(owner, repository, urls=("https://hooks.example.test/a",)) -> Session:
    with transaction.atomic():
        session = start_session(
            team=repository.team,
            repository=repository,
            prompt="Fix it",
            model="scripted/demo",
            created_by=owner,
        )
        for url in urls:
            services.subscribe(session, url, SECRET, label="test")
    return session


@pytest.mark.django_db
def test_it_queues_one_callback_per_subscription_when_a_session_is_cancelled(owner, repository):
    session = subscribed_session(owner, repository, ["https://a.example.test/h", "https://b.example.test/h"])
    run = session.runs.get()
    assert session.cancel()
    deliveries = list(Delivery.objects.filter(session=session).order_by("target"))
    assert [d.target for d in deliveries] == ["https://a.example.test/h", "https://b.example.test/h"]
    for d in deliveries:
        assert d.event == "run.cancelled" and d.status == "pending" and d.run_id == run.pk
        assert d.payload["run"] == {**d.payload["run"], "id": run.pk, "status": "cancelled"}
        assert d.payload["session"]["status"] == "cancelled"
        assert d.payload["links"]["session"].endswith(f"/sessions/{session.pk}")
    assert len({d.idempotency_key for d in deliveries}) == 2
    assert not session.cancel()  # closed already: nothing more is sent
    assert Delivery.objects.filter(session=session).count() == 2


@pytest.mark.django_db
def test_it_sends_nothing_for_a_session_without_subscriptions(owner, repository):
    session = start_session(
        team=repository.team, repository=repository, prompt="x", model="m/x", created_by=owner
    )
    assert session.cancel()
    assert not Delivery.objects.exists()


@pytest.mark.django_db
def test_it_queues_a_failed_callback_when_a_run_times_out(settings, owner, repository):
    session = subscribed_session(owner, repository)
    run = session.runs.get()
    assert run.claim("test-worker")
    settings.RUN_TIMEOUT = 10
    Run.objects.filter(pk=run.pk).update(started=timezone.now() - timedelta(seconds=60))
    run.refresh_from_db()
    assert not run.beat()
    delivery = Delivery.objects.get(session=session)
    assert delivery.event == "run.failed"
    assert "DEPUTIES_RUN_TIMEOUT" in delivery.payload["run"]["error"]


@pytest.mark.django_db
def test_it_queues_a_failed_callback_when_recovery_gives_a_run_up(owner, repository, settings):
    session = subscribed_session(owner, repository)
    run = session.runs.get()
    assert run.claim("lost-worker")
    for _ in range(settings.RUN_MAX_RECOVERIES):
        Event.objects.create(session=session, seq=1000 + _, run=run, type="run_requeued", payload={})
    Run.objects.filter(pk=run.pk).update(heartbeat=timezone.now() - timedelta(hours=1))
    assert Run.recover_stale(timezone.now() - timedelta(minutes=5)) == []
    delivery = Delivery.objects.get(session=session)
    assert delivery.event == "run.failed" and "lost" in delivery.payload["run"]["error"]


@pytest.mark.django_db
def test_it_stores_the_signing_secret_encrypted_and_updates_it_on_resubscribe(owner, repository):
    session = subscribed_session(owner, repository)
    subscription = CallbackSubscription.objects.get(session=session)
    assert SECRET not in subscription.secret_ciphertext and subscription.secret() == SECRET
    again = services.subscribe(session, subscription.url, "a-new-secret", label="rotated")
    assert again.pk == subscription.pk and again.secret() == "a-new-secret"
    assert CallbackSubscription.objects.filter(session=session).count() == 1


@pytest.mark.django_db
def test_it_returns_the_first_delivery_for_a_repeated_idempotency_key(owner, repository):
    session = subscribed_session(owner, repository)
    subscription = CallbackSubscription.objects.get(session=session)
    args = dict(session=session, kind="http", target=subscription.url, subscription=subscription, payload={})
    first = services.enqueue(**args, idempotency_key="same")
    assert services.enqueue(**args, idempotency_key="same").pk == first.pk
    with pytest.raises(LookupError):
        services.enqueue(**{**args, "kind": "carrier-pigeon"}, idempotency_key="other")


def test_it_reads_retry_after_as_seconds_or_an_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert (
        sign("k", b"{}", timestamp=1)
        == "t=1,v1=" + __import__("hmac").new(b"k", b"1.{}", "sha256").hexdigest()
    )


# --- the API -------------------------------------------------------------------------------------


@pytest.fixture
def ended_delivery(db, owner, repository) -> Delivery:
    session = subscribed_session(owner, repository)
    session.cancel()
    delivery = Delivery.objects.get(session=session)
    Delivery.objects.filter(pk=delivery.pk).update(status="failed", last_error="the receiver answered 500")
    delivery.refresh_from_db()
    return delivery


@pytest.mark.django_db
def test_it_lists_a_sessions_deliveries_for_its_team_only(ended_delivery, owner, viewer, outsider):
    url = f"/api/v1/sessions/{ended_delivery.session_id}/deliveries"
    for user in (owner, viewer):
        body = client_for(user).get(url).json()
        assert [d["id"] for d in body["results"]] == [ended_delivery.pk]
        assert body["results"][0]["event"] == "run.cancelled" and body["results"][0]["status"] == "failed"
        assert SECRET not in json.dumps(body)
    assert client_for(outsider).get(url).status_code == 404
    assert client_for(outsider).get(f"/api/v1/deliveries/{ended_delivery.pk}").status_code == 404
    assert client_for(None).get(url).status_code in (401, 403)


@pytest.mark.django_db
def test_it_lets_members_replay_but_not_viewers_or_outsiders(
    ended_delivery, owner, teammate, viewer, outsider
):
    url = f"/api/v1/deliveries/{ended_delivery.pk}/replay"
    assert client_for(outsider).post(url).status_code == 404
    assert client_for(viewer).post(url).status_code == 403
    assert Delivery.objects.count() == 1
    reply = client_for(teammate).post(url)
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert (
        body["replay_of"] == ended_delivery.pk and body["idempotency_key"] == ended_delivery.idempotency_key
    )
    pending = client_for(owner).post(f"/api/v1/deliveries/{body['id']}/replay")
    assert pending.status_code == 409 and "pending" in pending.json()["detail"]


@pytest.mark.django_db
def test_it_documents_the_deliveries_endpoints_in_the_schema(owner):
    schema = client_for(owner).get("/api/schema/", HTTP_ACCEPT="application/json").json()
    assert "/api/v1/sessions/{session_pk}/deliveries" in schema["paths"]
    assert "post" in schema["paths"]["/api/v1/deliveries/{id}/replay"]


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_it_calls_back_when_a_real_run_finishes(settings, tmp_path, team, owner, repository):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings.MEDIA_ROOT = data_dir / "media"  # the worker's artifacts, read back here
    with start_in_thread(SCRIPT) as fake, Receiver(["200"]) as receiver:
        env = child_env(
            data_dir,
            DEPUTIES_LLM_PROVIDERS="scripted",
            DEPUTIES_LLM_SCRIPTED_BASE_URL=fake.base_url,
            DEPUTIES_LLM_PRICES=json.dumps(PRICES),
            DEPUTIES_SANDBOX_ROOT=str(tmp_path / "sandboxes"),
            DEPUTIES_SANDBOX_ISOLATION="none",
            DEPUTIES_CALLBACK_ALLOWED_NETWORKS="127.0.0.1/32",
            DEPUTIES_BASE_URL="https://deputies.example.test",
        )
        with worker_process(env):
            session = subscribed_session(owner, repository, [receiver.url])
            wait_for(lambda: receiver.count() >= 1, timeout=90, what="the run's callback")
            delivery = wait_for(
                lambda: Delivery.objects.filter(session=session, status="delivered").first(),
                timeout=10,
                what="the delivery to be recorded",
            )
        request = receiver.requests[0]
    body = json.loads(request.body)
    session.refresh_from_db()
    assert session.status == "completed"
    assert request.headers["x-deputies-delivery"] == str(delivery.pk)
    assert request.headers["x-deputies-event"] == "run.completed"
    assert body["event"] == "run.completed" and body["run"]["status"] == "completed"
    assert body["session"]["id"] == session.pk and body["session"]["status"] == "completed"
    assert body["summary"] == session.summary and "add()" in body["summary"]
    files = {f["path"]: f for f in body["diff"]["files"]}
    assert files["calc.py"]["additions"] == 1 and files["calc.py"]["deletions"] == 1
    assert body["diff"]["additions"] >= 1
    assert Decimal(body["cost"]["usd"]) == session.cost_usd > 0
    assert body["cost"]["input_tokens"] == session.input_tokens > 0
    assert body["links"]["session"] == f"https://deputies.example.test/sessions/{session.pk}"
    assert body["links"]["diff"].startswith("https://deputies.example.test/api/v1/artifacts/")
    types = list(Event.objects.filter(session=session).order_by("seq").values_list("type", flat=True))
    assert types.index("run_completed") < types.index("callback_sent")


@pytest.mark.django_db
def test_it_shows_deliveries_and_their_events_on_the_session_page(client, ended_delivery, owner):
    from sessions.events import emit

    emit(ended_delivery.session_id, "callback_failed", {
        "delivery_id": ended_delivery.pk, "kind": "http", "target": "https://a.example.test/h", "attempt": 3,
        "status_code": 500, "error": "the receiver answered 500", "will_retry": False, "retry_in": None,
    })  # fmt: skip
    client.force_login(owner)
    page = client.get(f"/sessions/{ended_delivery.session_id}").content.decode()
    assert "Callbacks" in page and "run.cancelled" in page and "delivery-failed" in page
    assert (
        "Callback to https://a.example.test/h failed (attempt 3): the receiver answered 500; giving up"
        in page
    )
    assert SECRET not in page


@pytest.mark.django_db
def test_it_shows_the_attempt_log_in_the_admin_and_replays_from_there(admin_client, ended_delivery):
    from integrations.deliveries.models import DeliveryAttempt

    DeliveryAttempt.objects.create(
        delivery=ended_delivery, number=1, status_code=500, error="the receiver answered 500"
    )
    page = admin_client.get(f"/admin/deliveries/delivery/{ended_delivery.pk}/change/").content.decode()
    assert "the receiver answered 500" in page and "https://hooks.example.test/a" in page
    reply = admin_client.post(
        "/admin/deliveries/delivery/",
        {"action": "replay_deliveries", "_selected_action": [ended_delivery.pk]},
        follow=True,
    )
    assert "Queued 1 replay(s)." in reply.content.decode()
    copy = Delivery.objects.get(replay_of=ended_delivery)
    assert copy.status == "pending" and copy.idempotency_key == ended_delivery.idempotency_key


@pytest.mark.django_db
def test_it_drops_a_duplicate_task_and_puts_an_early_one_back_until_it_is_due(ended_delivery):
    from django_q.models import OrmQ

    Delivery.objects.filter(pk=ended_delivery.pk).update(attempts=1)
    assert services.send(ended_delivery.pk, 1) == "skipped: attempt 1 was made already"
    due = timezone.now() + timedelta(minutes=5)
    Delivery.objects.filter(pk=ended_delivery.pk).update(status="pending", next_attempt=due)
    before = set(OrmQ.objects.values_list("pk", flat=True))
    assert services.send(ended_delivery.pk, 2) == "not due yet"
    (queued,) = OrmQ.objects.exclude(pk__in=before)
    assert abs((queued.lock - due).total_seconds()) < 0.01  # the queue hands it out when due, not before
    assert Delivery.objects.get(pk=ended_delivery.pk).status == "pending"


@pytest.mark.django_db
def test_it_recovers_a_delivery_whose_lease_ran_out_and_one_whose_task_was_lost(settings, ended_delivery):
    settings.DELIVERY_LEASE = 60
    old = timezone.now() - timedelta(minutes=5)
    lost = services.replay(ended_delivery)
    Delivery.objects.filter(pk=lost.pk).update(next_attempt=old)
    fresh = services.replay(ended_delivery)  # due now: its task is still in the queue
    Delivery.objects.filter(pk=ended_delivery.pk).update(status="sending", claimed_at=old, attempts=2)
    assert sorted(services.recover_stale()) == sorted([ended_delivery.pk, lost.pk])
    assert Delivery.objects.get(pk=ended_delivery.pk).status == "pending"
    assert "lost" in Delivery.objects.get(pk=ended_delivery.pk).last_error
    assert Delivery.objects.get(pk=fresh.pk).status == "pending"
