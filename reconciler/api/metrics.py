"""``GET /metrics``: Prometheus metrics, in a registry of the server's own.

State, read at scrape time (from the same sources as the status document):

- ``reconciler_gpu_memory_mb{gpu, kind}``: kind = total, used, reserved_started, adopted, leased, foreign, free
- ``reconciler_instances{state}``: instances by state (starting, running, stopping, failed)
- ``reconciler_instance_gpu{service, gpu}``: 1 for each GPU an instance is on (each of them, for one
  spanning several)
- ``reconciler_leases{service, kind}`` (held: an expired lease not yet released is not), ``reconciler_demands{service}``
- ``reconciler_pending``: items the last plan could not reach

The API's own connections (:mod:`.connections`):

- ``reconciler_api_connections``, ``reconciler_api_connections_max``: open now, and the cap
- ``reconciler_api_connections_closed_total{reason}``: closed by the server — refused (at the cap, every
  connection busy), evicted (to make room), head_timeout, body_timeout, idle (kept alive, unused)

The model gateway's traffic per model (``serve --gateway``; labels ``model``, ``service``), from
the runtime's :class:`~reconciler.runtime.traffic.Traffic`:

- ``reconciler_gateway_requests_total{model, service, status}``: requests answered, by HTTP status
- ``reconciler_gateway_disconnected_total{model, service}``: clients that went away before their answer ended
- ``reconciler_gateway_in_flight``, ``reconciler_gateway_queued``: requests being proxied, and waiting, now
- ``reconciler_gateway_ttfb_seconds``, ``reconciler_gateway_request_seconds``: summaries (count, sum) of the
  time to first byte and the total time
- ``reconciler_gateway_caused_total{model, service, action}``: starts, model switches (``switch``) and
  evictions its requests caused

Counted from the event bus and the leasing service:

- ``reconciler_actions_total{kind, outcome}``: plan actions carried out (outcome: done, failed, skipped, deferred)
- ``reconciler_reconcile_duration_seconds``: one reconcile (the watch loop's converge: passes until settled)
- ``reconciler_lease_wait_seconds{path, result}``: a lease request's wait; path fast|queued,
  result granted|timeout|queue_full|refused|disconnected
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from reconciler.api.connections import CLOSE_REASONS, ConnectionGuard
from reconciler.api.status import build_status
from reconciler.core.events import EventKind
from reconciler.core.profile import Profile
from reconciler.runtime import Runtime
from reconciler.runtime.events import Subscription

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("starting", "running", "stopping", "failed")


class StateCollector:
    """Gauges computed at scrape time from the status document."""

    def __init__(self, runtime: Runtime, profile: Callable[[], Profile]):
        self.runtime = runtime
        self.profile = profile

    def collect(self) -> Iterator[Metric]:
        status = build_status(self.runtime, self.profile())
        memory = GaugeMetricFamily("reconciler_gpu_memory_mb", "GPU memory by use, MB", labels=["gpu", "kind"])
        for gpu in status.gpus:
            for kind in ("total", "used", "reserved_started", "adopted", "leased", "foreign", "free"):
                memory.add_metric([str(gpu.index), kind], getattr(gpu, f"{kind}_mb"))
        yield memory
        instances = GaugeMetricFamily("reconciler_instances", "Service instances by state", labels=["state"])
        for state in STATES:
            instances.add_metric([state], sum(1 for i in status.instances if i.state == state))
        yield instances
        placed = GaugeMetricFamily("reconciler_instance_gpu", "GPUs each instance is on (1 per GPU)",
                                   labels=["service", "gpu"])
        for instance in status.instances:
            for index in instance.gpus or ([instance.gpu] if instance.gpu is not None else []):
                placed.add_metric([instance.service, str(index)], 1)
        yield placed
        leases = GaugeMetricFamily("reconciler_leases", "Leases held (not expired), by service and kind",
                                   labels=["service", "kind"])
        counts: dict[tuple[str, str], int] = {}
        for lease in (lease for lease in status.leases if lease.state == "active"):
            counts[(lease.service, lease.kind)] = counts.get((lease.service, lease.kind), 0) + 1
        for (service, kind), n in sorted(counts.items()):
            leases.add_metric([service, kind], n)
        yield leases
        demands = GaugeMetricFamily("reconciler_demands", "Lease requests waiting, by service", labels=["service"])
        waiting: dict[str, int] = {}
        for demand in status.demands:
            waiting[demand.service] = waiting.get(demand.service, 0) + 1
        for service, n in sorted(waiting.items()):
            demands.add_metric([service], n)
        yield demands
        pending = GaugeMetricFamily("reconciler_pending", "Items the last plan could not reach")
        pending.add_metric([], len(status.pending))
        yield pending
        yield from self.gateway()

    def gateway(self) -> Iterator[Metric]:
        """The model gateway's traffic per model."""
        traffic = self.runtime.traffic.models()
        labels = ["model", "service"]
        requests = CounterMetricFamily("reconciler_gateway_requests", "Gateway requests answered, by HTTP status",
                                       labels=[*labels, "status"])
        gone = CounterMetricFamily("reconciler_gateway_disconnected", "Gateway clients that went away mid-request",
                                   labels=labels)
        in_flight = GaugeMetricFamily("reconciler_gateway_in_flight", "Gateway requests being proxied now",
                                      labels=labels)
        queued = GaugeMetricFamily("reconciler_gateway_queued", "Gateway requests waiting for their service now",
                                   labels=labels)
        ttfb = SummaryMetricFamily("reconciler_gateway_ttfb_seconds", "Gateway time to first byte", labels=labels)
        total = SummaryMetricFamily("reconciler_gateway_request_seconds", "Gateway request total time", labels=labels)
        caused = CounterMetricFamily("reconciler_gateway_caused", "Starts, model switches and evictions that "
                                     "gateway requests caused", labels=[*labels, "action"])
        for m in traffic:
            key = [m.model, m.service]
            for code, n in sorted(m.statuses.items()):
                requests.add_metric([*key, str(code)], n)
            gone.add_metric(key, m.disconnected)
            in_flight.add_metric(key, m.in_flight)
            queued.add_metric(key, m.queued)
            ttfb.add_metric(key, m.ttfb.count, m.ttfb.total_s)
            total.add_metric(key, m.total.count, m.total.total_s)
            for action, n in m.caused.items():
                caused.add_metric([*key, action], n)
        yield from (requests, gone, in_flight, queued, ttfb, total, caused)


class ConnectionCollector:
    """The API's connections: open, the cap, and how many the server closed, by reason."""

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("reconciler_api_connections", "HTTP connections open now", value=self.guard.open)
        yield GaugeMetricFamily("reconciler_api_connections_max", "HTTP connections at most (from RLIMIT_NOFILE)",
                                value=self.guard.sizing.max_connections)
        closed = CounterMetricFamily("reconciler_api_connections_closed", "HTTP connections the server closed",
                                     labels=["reason"])
        for reason in CLOSE_REASONS:
            closed.add_metric([reason], self.guard.closed[reason])
        yield closed


class Metrics:
    def __init__(self, runtime: Runtime, profile: Callable[[], Profile], connections: ConnectionGuard | None = None):
        self.runtime = runtime
        self.registry = CollectorRegistry()
        self.actions = Counter("reconciler_actions", "Plan actions carried out, by kind and outcome",
                               ["kind", "outcome"], registry=self.registry)
        self.reconcile = Histogram(
            "reconciler_reconcile_duration_seconds", "Duration of one reconcile (passes until settled)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.lease_wait = Histogram(
            "reconciler_lease_wait_seconds", "How long a lease request waited for its answer",
            ["path", "result"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry)
        self.registry.register(StateCollector(runtime, profile))
        if connections is not None:
            self.registry.register(ConnectionCollector(connections))
        self._listening: asyncio.Task[None] | None = None

    def observe_lease(self, path: str, result: str, seconds: float) -> None:
        self.lease_wait.labels(path, result).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start(self) -> None:
        self._listening = asyncio.ensure_future(self._listen(self.runtime.events.subscribe()))

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)

    async def _listen(self, subscription: Subscription) -> None:
        async with subscription:
            async for event in subscription:
                kind = event.get("kind")
                if kind == EventKind.ACTION_FINISHED:
                    self.actions.labels(str(event.get("action_kind", "?")), str(event.get("status", "?"))).inc()
                elif kind == EventKind.PASS_FINISHED and isinstance(event.get("duration_s"), (int, float)):
                    self.reconcile.observe(event["duration_s"])
