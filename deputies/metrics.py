"""``/metrics`` for Prometheus: what the database says, computed when Prometheus scrapes.

Two kinds of metrics come out of one web process's ``/metrics``:

* **Global** (``deputies_*``): read from the database by ``DatabaseCollector`` at scrape time, with
  a few aggregate queries (no per-request work). Every web process answers the same numbers, so
  scrape one of them (or take ``max`` across them), never ``sum``: queue depth, runs and sessions
  by status, the oldest queued run's age, ready sandboxes, events written, LLM calls, tokens, cost
  and latency, and deliveries by status (when the deliveries app is installed).
* **Per process**: prometheus_client's ``process_*`` and ``python_*`` of the process that
  answered, and django-prometheus's request metrics (``django_http_*``) when its middleware is on
  (``DEPUTIES_METRICS_MIDDLEWARE``). Worker processes serve no HTTP; their work shows in the global
  metrics.

The LLM histograms are cumulative over every ``LLMCall`` row: the first scrape of a process reads
them all once, later scrapes only rows newer than the last one read (by primary key), and only rows
older than ``SETTLE_SECONDS`` (a row committed out of id order would otherwise be skipped for
good), so they lag by that much. Deleting sessions deletes their calls, which a restart of the web
process shows as a counter reset, which Prometheus handles.

Access: ``Authorization: Bearer $DEPUTIES_METRICS_TOKEN`` or a staff login; else 401 (no
credentials) or 403.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection
from django.db.models import Count, Min, Sum
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

SETTLE_SECONDS = 10
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)  # seconds
TOKEN_BUCKETS = (100, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000)  # per call


def delivery_model():
    """The outbound deliveries model (``integrations/deliveries``), or None while that app is absent.

    The hook for ``deputies_deliveries{status}``: any model with a ``status`` field works here.
    """
    from django.apps import apps

    try:
        from integrations.deliveries.models import Delivery  # noqa: PLC0415
    except ImportError:
        return None
    if not apps.is_installed(Delivery._meta.app_config.name):
        return None
    return Delivery


class _Histogram:
    """Cumulative bucket counts and sum of one value, per label value."""

    def __init__(self, buckets: tuple) -> None:
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def add(self, label: str, counts: list[int], total: float) -> None:
        mine = self.counts.setdefault(label, [0] * (len(self.buckets) + 1))
        for i, n in enumerate(counts):
            mine[i] += n
        self.sums[label] = self.sums.get(label, 0.0) + total

    def family(self, name: str, doc: str, label: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=[label])
        for value, counts in sorted(self.counts.items()):
            cumulative, running = [], 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                running += n
                cumulative.append((floatToGoString(bound), running))
            family.add_metric([value], cumulative, self.sums[value])
        return family


class LLMTotals:
    """The running aggregate of LLMCall rows this process has read (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_id = 0
        self.calls: dict[tuple[str, str], int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.cost: dict[str, Decimal] = {}
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.call_tokens = _Histogram(TOKEN_BUCKETS)

    def refresh(self) -> None:
        from django.db.models import F, Max, Q

        from sessions.models import LLMCall

        with self.lock:
            cutoff = timezone.now() - timedelta(seconds=SETTLE_SECONDS)
            rows = LLMCall.objects.filter(pk__gt=self.last_id, created__lt=cutoff)

            def bucketed(field_expr, bounds: tuple, scale: float = 1) -> dict:
                agg = {}
                lower = None
                for i, bound in enumerate((*bounds, None)):
                    cond = Q()
                    if lower is not None:
                        cond &= Q(**{f"{field_expr}__gt": lower * scale})
                    if bound is not None:
                        cond &= Q(**{f"{field_expr}__lte": bound * scale})
                    agg[f"b{i}"] = Count("pk", filter=cond) if cond else Count("pk")
                    lower = bound
                return agg

            grouped = (
                rows.values("model", "outcome")
                .annotate(
                    n=Count("pk"),
                    max_id=Max("pk"),
                    input=Sum("input_tokens"),
                    output=Sum("output_tokens"),
                    cached=Sum("cached_tokens"),
                    cost=Sum("cost_usd"),
                    latency=Sum("latency_ms"),
                    **{f"l{k}": v for k, v in bucketed("latency_ms", LATENCY_BUCKETS, 1000).items()},
                )
                .order_by()
            )
            grouped = list(grouped)
            # Tokens per successful call, bucketed: input + output of each call.
            per_call = list(
                rows.filter(outcome="ok")
                .annotate(t=F("input_tokens") + F("output_tokens"))
                .values("model")
                .annotate(s=Sum("t"), **{f"t{k}": v for k, v in bucketed("t", TOKEN_BUCKETS).items()})
                .order_by()
            )
            for g in grouped:
                model = g["model"]
                self.calls[(model, g["outcome"])] = self.calls.get((model, g["outcome"]), 0) + g["n"]
                for kind in ("input", "output", "cached"):
                    self.tokens[(model, kind)] = self.tokens.get((model, kind), 0) + (g[kind] or 0)
                self.cost[model] = self.cost.get(model, Decimal("0")) + (g["cost"] or Decimal("0"))
                latency = [g[f"lb{i}"] for i in range(len(LATENCY_BUCKETS) + 1)]
                self.latency.add(model, latency, (g["latency"] or 0) / 1000)
                self.last_id = max(self.last_id, g["max_id"])
            for p in per_call:
                counts = [p[f"tb{i}"] for i in range(len(TOKEN_BUCKETS) + 1)]
                self.call_tokens.add(p["model"], counts, float(p["s"] or 0))

    def families(self):
        calls = CounterMetricFamily(
            "deputies_llm_calls",
            "Model calls (HTTP attempts) by model and outcome.",
            labels=["model", "outcome"],
        )
        for (model, outcome), n in sorted(self.calls.items()):
            calls.add_metric([model, outcome], n)
        tokens = CounterMetricFamily(
            "deputies_llm_tokens",
            "Tokens of successful model calls (input includes cached).",
            labels=["model", "kind"],
        )
        for (model, kind), n in sorted(self.tokens.items()):
            tokens.add_metric([model, kind], n)
        cost = CounterMetricFamily("deputies_llm_cost_usd", "Model spend in USD.", labels=["model"])
        for model, usd in sorted(self.cost.items()):
            cost.add_metric([model], float(usd))
        yield calls
        yield tokens
        yield cost
        yield self.latency.family("deputies_llm_latency_seconds", "Model call latency.", "model")
        yield self.call_tokens.family(
            "deputies_llm_call_tokens", "Input plus output tokens of each successful model call.", "model"
        )


class DatabaseCollector:
    """Registered once per process in prometheus_client's registry; runs at every scrape."""

    def __init__(self) -> None:
        self.llm = LLMTotals()

    def describe(self):
        return []  # no collection at registration time (it would touch the database)

    def collect(self):
        started = time.monotonic()
        try:
            yield from self._collect()
        except Exception:  # a scrape must not fail whole because one query did
            log.exception("metrics: a database metric failed")
            up = 0
        else:
            up = 1
        yield GaugeMetricFamily(
            "deputies_database_metrics_up", "Whether every database metric was read.", value=up
        )
        yield GaugeMetricFamily(
            "deputies_metrics_scrape_seconds",
            "Time spent reading the database metrics.",
            value=time.monotonic() - started,
        )

    def _collect(self):
        from django_q.models import OrmQ

        from sandboxes.models import Sandbox
        from sessions.models import Run, Session

        yield GaugeMetricFamily(
            "deputies_queue_depth", "Tasks in the queue (waiting or taken).", value=OrmQ.objects.count()
        )
        runs = GaugeMetricFamily("deputies_runs", "Runs by status.", labels=["status"])
        by_status = dict(Run.objects.order_by().values_list("status").annotate(n=Count("pk")))
        for status in Run.Status.values:
            runs.add_metric([status], by_status.get(status, 0))
        yield runs
        oldest = Run.objects.filter(status=Run.Status.QUEUED).aggregate(m=Min("created"))["m"]
        yield GaugeMetricFamily(
            "deputies_oldest_queued_run_seconds",
            "Age of the oldest queued run (0 when none waits).",
            value=(timezone.now() - oldest).total_seconds() if oldest else 0,
        )
        sessions = GaugeMetricFamily("deputies_sessions", "Sessions by status.", labels=["status"])
        by_status = dict(Session.objects.order_by().values_list("status").annotate(n=Count("pk")))
        for status, n in sorted(by_status.items()):
            sessions.add_metric([status], n)
        yield sessions
        sandboxes = GaugeMetricFamily(
            "deputies_active_sandboxes", "Ready sandboxes by provider.", labels=["provider"]
        )
        for provider, n in (
            Sandbox.objects.filter(status=Sandbox.Status.READY)
            .order_by()
            .values_list("provider")
            .annotate(n=Count("pk"))
        ):
            sandboxes.add_metric([provider], n)
        yield sandboxes
        yield CounterMetricFamily(
            "deputies_events", "Events written (rate() of it is the event rate).", value=events_written()
        )
        self.llm.refresh()
        yield from self.llm.families()
        delivery = delivery_model()
        if delivery is not None:
            family = GaugeMetricFamily(
                "deputies_deliveries", "Outbound deliveries by status.", labels=["status"]
            )
            for status, n in delivery.objects.order_by().values_list("status").annotate(n=Count("pk")):
                family.add_metric([str(status)], n)
            yield family


def events_written() -> int:
    """The event id sequence's position (no table read): a counter that deleted events do not lower.
    On SQLite, Django's ids are AUTOINCREMENT, whose position is kept in ``sqlite_sequence``."""
    from sessions.models import Event

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT pg_sequence_last_value(pg_get_serial_sequence(%s, 'id'))", [Event._meta.db_table]
            )
        else:
            cursor.execute("SELECT seq FROM sqlite_sequence WHERE name = %s", [Event._meta.db_table])
        row = cursor.fetchone()
    return int(row[0] or 0) if row else 0


_collector: DatabaseCollector | None = None
_collector_lock = threading.Lock()


def collector() -> DatabaseCollector:
    global _collector
    with _collector_lock:
        if _collector is None:
            _collector = DatabaseCollector()
            REGISTRY.register(_collector)
        return _collector


def _allowed(request: HttpRequest) -> int | None:
    """None when allowed; else the status to answer."""
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if (
            token
            and scheme.lower() == "bearer"
            and hmac.compare_digest(value.strip().encode(), token.encode())
        ):
            return None
        return 403 if scheme.lower() == "bearer" else 401
    user = request.user
    if user.is_authenticated:
        return None if user.is_staff else 403
    return 401


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    refused = _allowed(request)
    if refused == 401:
        response = JsonResponse(
            {"detail": "Authentication credentials were not provided.", "code": "not_authenticated"},
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if refused == 403:
        return JsonResponse(
            {"detail": "Staff login or DEPUTIES_METRICS_TOKEN needed.", "code": "permission_denied"},
            status=403,
        )
    collector()
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
