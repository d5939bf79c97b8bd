"""Outbound deliveries on real parts: a worker process, Postgres, and an HTTP receiver on 127.0.0.1.

Loopback is refused for callbacks by default; the worker gets DEPUTIES_CALLBACK_ALLOWED_NETWORKS to
reach the receiver, except in the test that checks the refusal.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from django.db import transaction

from integrations.deliveries import services
from integrations.deliveries.models import Delivery, DeliveryAttempt
from integrations.deliveries.tasks import recover_stale_deliveries
from sessions.models import Event, Session
from tests.callback_receiver import Receiver
from tests.conftest import client_for
from tests.live import child_env, wait_for, worker_process

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SECRET = "whsec-test-signing-secret"
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_verify():
    """The receiver's check exactly as the README shows it."""
    block = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", README.read_text(), re.S)
    assert block, "the README's verification recipe is missing"
    assert len(block.group(1).strip().splitlines()) <= 10
    namespace: dict = {}
    exec(block.group(1), namespace)  # noqa: S102 - our own README
    return namespace["verify"]


def worker_env(tmp_path: Path, allow: bool = True, **extra: str) -> dict[str, str]:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    settings = {
        "DEPUTIES_DELIVERY_BACKOFF_BASE": "0.05",
        "DEPUTIES_DELIVERY_BACKOFF_MAX": "0.2",
        "DEPUTIES_DELIVERY_TIMEOUT": "5",
        **extra,
    }
    if allow:
        settings["DEPUTIES_CALLBACK_ALLOWED_NETWORKS"] = "127.0.0.0/8"
    return child_env(data_dir, **settings)


def log_of(env: dict[str, str], name: str = "worker") -> str:
    path = Path(env["DEPUTIES_DATA_DIR"]) / f"{name}.log"
    return path.read_text()[-3000:] if path.exists() else ""


@pytest.fixture
def session(team, owner, repository) -> Session:
    return Session.objects.create(
        team=team, created_by=owner, repository=repository, base_branch="main", model="scripted/demo",
        status="completed",
    )  # fmt: skip


def send_one(session: Session, url: str, key: str = "ping-1") -> Delivery:
    with transaction.atomic():
        subscription = services.subscribe(session, url, SECRET, label="test")
        return services.enqueue(
            session=session, kind="http", target=url, subscription=subscription, event="test.ping",
            payload={"hello": "world", "session": session.pk}, idempotency_key=key,
        )  # fmt: skip


def ended(delivery_id: int) -> Delivery | None:
    d = Delivery.objects.get(pk=delivery_id)
    return d if d.status in ("delivered", "failed") else None


def test_it_retries_a_500_a_429_and_a_dropped_connection_then_delivers_once(tmp_path, session):
    verify = readme_verify()
    with Receiver(["500", "429:1", "drop", "200"]) as receiver:
        env = worker_env(tmp_path)
        with worker_process(env):
            delivery = send_one(session, receiver.url)
            done = wait_for(lambda: ended(delivery.pk), timeout=30, what="the delivery to end")
            assert done.status == "delivered", (done.last_error, log_of(env))
        requests = list(receiver.requests)

    assert len(requests) == 4
    assert {r.headers["x-deputies-delivery"] for r in requests} == {str(delivery.pk)}
    assert [r.headers["x-deputies-attempt"] for r in requests] == ["1", "2", "3", "4"]
    assert {r.headers["x-deputies-idempotency-key"] for r in requests} == {"ping-1"}
    for r in requests:
        assert verify(SECRET, r.headers["x-deputies-signature"], r.body)
        assert not verify("another-secret", r.headers["x-deputies-signature"], r.body)
    assert json.loads(requests[-1].body) == {"hello": "world", "session": session.pk}
    assert requests[3].at - requests[2].at < 1.0  # back-off of at most 0.2 s
    assert requests[2].at - requests[1].at >= 1.0  # Retry-After: 1 honoured

    attempts = list(DeliveryAttempt.objects.filter(delivery=delivery).order_by("number"))
    assert [a.number for a in attempts] == [1, 2, 3, 4]
    assert [a.status_code for a in attempts] == [500, 429, None, 200]
    assert attempts[2].error and "status" not in attempts[2].error.lower()[:6]
    assert attempts[1].retry_in_seconds == 1.0
    assert 0 <= attempts[0].retry_in_seconds <= 0.05 and 0 <= attempts[2].retry_in_seconds <= 0.2
    assert attempts[3].retry_in_seconds is None and attempts[3].response_excerpt == '{"ok": true}'
    assert done.attempts == 4 and done.delivered is not None and done.last_error == ""

    events = list(Event.objects.filter(session=session, type__startswith="callback_").order_by("seq"))
    assert [e.type for e in events] == ["callback_failed"] * 3 + ["callback_sent"]
    assert all(e.payload["will_retry"] for e in events[:3])
    assert events[-1].payload["status_code"] == 200 and events[-1].payload["target"] == receiver.url
    assert SECRET not in json.dumps([e.payload for e in events])


def test_it_gives_up_with_the_whole_log_and_a_replay_then_delivers(settings, tmp_path, session, teammate):
    settings.DELIVERY_MAX_ATTEMPTS = 3  # the enqueuing process sets a delivery's limit
    with Receiver(["503"]) as receiver:
        env = worker_env(tmp_path)
        with worker_process(env):
            delivery = send_one(session, receiver.url)
            done = wait_for(lambda: ended(delivery.pk), timeout=30, what="the delivery to give up")
            assert done.status == "failed"
            assert done.attempts == 3 and "503" in done.last_error and "gave up after 3" in done.last_error
            log = list(done.attempt_log.order_by("number").values_list("number", "status_code"))
            assert log == [(1, 503), (2, 503), (3, 503)]
            last = Event.objects.filter(session=session, type="callback_failed").order_by("-seq").first()
            assert last.payload["will_retry"] is False

            receiver.script = ["200"]
            reply = client_for(teammate).post(f"/api/v1/deliveries/{delivery.pk}/replay")
            assert reply.status_code == 201, reply.content
            replay_id = reply.json()["id"]
            # The reply reads the new row after its commit: the running worker may have taken it already.
            assert reply.json()["replay_of"] == delivery.pk
            assert reply.json()["status"] in ("pending", "sending", "delivered")
            again = wait_for(lambda: ended(replay_id), timeout=30, what="the replay to end")
            assert again.status == "delivered", again.last_error
        assert receiver.count() == 4
        last = receiver.requests[-1]
        assert last.headers["x-deputies-delivery"] == str(replay_id)
        assert last.headers["x-deputies-idempotency-key"] == delivery.idempotency_key
    assert Delivery.objects.get(pk=delivery.pk).status == "failed"  # the original keeps its history


def test_it_does_not_retry_a_client_error(tmp_path, session):
    with Receiver(["404", "200"]) as receiver:
        env = worker_env(tmp_path)
        with worker_process(env):
            delivery = send_one(session, receiver.url)
            done = wait_for(lambda: ended(delivery.pk), timeout=30, what="the delivery to end")
        assert receiver.count() == 1
    assert done.status == "failed" and done.attempts == 1 and done.last_status_code == 404


def test_it_refuses_a_loopback_callback_at_send_time_without_the_allow_setting(tmp_path, session):
    with Receiver(["200"]) as receiver:
        env = worker_env(tmp_path, allow=False)
        with worker_process(env):
            delivery = send_one(session, receiver.url)
            done = wait_for(lambda: ended(delivery.pk), timeout=30, what="the delivery to be refused")
        assert receiver.count() == 0  # no connection was made
    assert done.status == "failed" and done.attempts == 1
    assert "127.0.0.1" in done.last_error and "loopback" in done.last_error
    assert "DEPUTIES_CALLBACK_ALLOWED_NETWORKS" in done.last_error
    event = Event.objects.get(session=session, type="callback_failed")
    assert event.payload["will_retry"] is False and "loopback" in event.payload["error"]


def test_it_sends_again_a_delivery_whose_worker_was_killed_mid_send(settings, tmp_path, session):
    settings.DELIVERY_LEASE = 1  # this process runs the recovery
    with Receiver(["hold", "200"]) as receiver:
        env = worker_env(tmp_path)
        with worker_process(env) as proc:
            delivery = send_one(session, receiver.url)
            wait_for(lambda: receiver.count() == 1, timeout=30, what="the first attempt to arrive")
            assert Delivery.objects.get(pk=delivery.pk).status == "sending"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        receiver.release()
        assert Delivery.objects.get(pk=delivery.pk).status == "sending"  # the crash left it mid-send

        # What the every-minute schedule does, once the lease has run out.
        wait_for(
            lambda: str(delivery.pk) in recover_stale_deliveries(), timeout=10, interval=0.2, what="recovery"
        )
        assert Delivery.objects.get(pk=delivery.pk).status == "pending"
        with worker_process(env, name="worker-2"):
            done = wait_for(lambda: ended(delivery.pk), timeout=30, what="the recovered delivery")
        assert done.status == "delivered", (done.last_error, log_of(env, "worker-2"))
        assert receiver.count() == 2
        assert {r.headers["x-deputies-delivery"] for r in receiver.requests} == {str(delivery.pk)}
    assert done.attempts == 2
    assert list(done.attempt_log.values_list("number", "status_code")) == [(2, 200)]
