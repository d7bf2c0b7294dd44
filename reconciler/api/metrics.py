"""``GET /metrics``: Prometheus metrics, in a registry of the server's own, by Prometheus' conventions.

The conventions (checked by ``promtool check metrics`` on a live scrape, in
``tests/test_metrics_prometheus.py``): base units (bytes and seconds, never
MB), counters end in ``_total``, no ``_created`` series (prometheus_client
exports one per counter and histogram by default: a gauge of the time the
process created it, which reads as a value on every dashboard; it is turned
off with :func:`prometheus_client.disable_created_metrics`, for the whole
process, since the server's registry is the only one it exports), and a
series that can drop to zero *does* — every service of the profile has its
lease, demand, up, restart and backoff series from the first scrape on, at 0
when there is nothing to count, so ``rate()``, ``absent()`` and alert rules
see 0 instead of a gap. A service removed from the profile keeps its series
while it still has an instance (it is being stopped), then they go.

GPU memory, read at scrape time from the status document (one figure for
free memory everywhere, :mod:`.status`):

- ``reconciler_gpu_memory_total_bytes{gpu}``, ``reconciler_gpu_memory_used_bytes{gpu}``: NVML's total
  and used (the simulated GPU's under ``--gpu sim``)
- ``reconciler_gpu_memory_bytes{gpu, use}``: the GPU split by who holds it, a set of label values that
  sums to the GPU's total — ``use`` = ``started`` (reserved by instances the reconciler started, and by
  starts the last plan carried out), ``adopted``, ``leased`` (VRAM leases and leased unmanaged slots),
  ``foreign`` (NVML usage nobody accounts for), ``free`` (what a start could still take: the same figure
  as status, ``why`` and the lease answers), ``other`` (the rest: NVML reports less free than the
  accounting leaves; normally 0). ``sum by (gpu)`` is the total —
  except while the GPU is over-committed, when it is the total plus the over-commit below.
- ``reconciler_gpu_overcommit_bytes{gpu}``: reservations booked above the GPU's total (invariant 4): 0
  normally; anything else is a defect to alert on.

Services (one series per service of the profile, and per instance left over from an older one):

- ``reconciler_service_up{service}``: 1 while a healthy, running instance serves it, else 0
- ``reconciler_service_wanted{service}``: 1 while the reconciler wants it running (``always_on``, a lease or
  a demand, a dependent that is wanted, not yet idle: DESIGN §3 "Wanted", as of the last pass); an
  unmanaged slot is never started, so never wanted. ``wanted == 1 and up == 0`` for long is what to alert on:
  an idle on-demand service is down by design
- ``reconciler_service_restarts_total{service}``: restarts since this server started — launch-spec or
  model changes carried out, and starts after the service failed (crashed, or never got healthy)
- ``reconciler_service_backoff_failures{service}``: failures in a row counted against it (0: none)
- ``reconciler_service_backoff_next_attempt_seconds{service}``: seconds until it may be tried again
  (0: now)
- ``reconciler_service_stalled{service}``: 1 once the failures reach the stall threshold (invariant 6)
- ``reconciler_leases{service, kind}``: leases held (kind ``service`` or ``vram``; an expired lease not
  yet released is not held), ``reconciler_demands{service}``: lease requests waiting
- ``reconciler_instances{state}``: instances by state (starting, running, stopping, failed)
- ``reconciler_instance_gpu{service, gpu}``: 1 for each GPU an instance is on (each of them, for one
  spanning several)
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
- ``reconciler_gateway_proxied_total{model, service, to_node}`` (cluster mode): requests this gateway
  placed on another node's gateway, counted in full there (the series above) and only here as proxied

Counted from the event bus and the leasing service:

- ``reconciler_actions_total{kind, outcome}``: plan actions carried out (outcome: done, failed, skipped, deferred)
- ``reconciler_reconcile_duration_seconds``: one reconcile (the watch loop's converge: passes until settled)
- ``reconciler_lease_wait_seconds{path, result}``: a lease request's wait; path fast|queued,
  result granted|timeout|queue_full|refused|disconnected

Counters kept in this process (actions, restarts, lease waits) start from 0 when the server starts;
Prometheus' ``rate()`` and ``increase()`` take such a reset in their stride.

**In a cluster** (``--etcd``) every series carries a constant ``node`` label, the node's name
(:class:`NodeLabelled`): one Prometheus scraping every node of a cluster then tells ``gpu="0"`` of
node a from ``gpu="0"`` of node b without relabelling rules, and the Grafana dashboard groups by
``node``. We chose the label on every series over a single ``reconciler_node_info{node}`` to join
against: a join (``* on (instance) group_left (node) reconciler_node_info``) would be needed in every
query and alert rule, and the node's name is what an operator filters by. On one machine (no
``--etcd``) the output is exactly as before, with no ``node`` label — a one-machine host's name is
``local``, which says nothing, and existing queries and alerts keep working. A scrape config that
sets a target label ``node`` itself would meet ours: Prometheus keeps ours as ``exported_node``
(or replaces it, with ``honor_labels: true``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from reconciler.api.connections import CLOSE_REASONS, ConnectionGuard
from reconciler.api.models import GpuStatus, Status
from reconciler.api.status import build_status
from reconciler.core.accounting import world_now
from reconciler.core.events import EventKind
from reconciler.core.profile import Profile
from reconciler.core.wanted import compute_wanted
from reconciler.runtime import Runtime
from reconciler.runtime.events import Subscription

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("starting", "running", "stopping", "failed")
LEASE_KINDS = ("service", "vram")
MIB = 1024 * 1024  # the project's MB are NVML's MiB
USES = ("started", "adopted", "leased", "foreign", "free", "other")

disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series (see the module docstring)


def memory_split(gpu: GpuStatus) -> dict[str, int]:
    """A GPU's memory by use, in MB, summing to its total (plus the over-commit, when there is one)."""
    split = {"started": gpu.reserved_started_mb, "adopted": gpu.adopted_mb, "leased": gpu.leased_mb,
             "foreign": gpu.foreign_mb, "free": gpu.free_mb}
    split["other"] = max(0, gpu.total_mb - sum(split.values()))
    return split


def overcommit_mb(gpu: GpuStatus) -> int:
    """Booked above the GPU's total (invariant 4 says: never): the status document's figure, judged on the
    world the last pass planned from (:func:`reconciler.core.accounting.over_committed_mb`), not a sum of
    the status's reservation fields, which between passes may count a start beside what it replaced."""
    return gpu.over_committed_mb


class StateCollector:
    """Gauges computed at scrape time from the status document (and the store's backoff records)."""

    def __init__(self, runtime: Runtime, profile: Callable[[], Profile], restarts: dict[str, int] | None = None):
        self.runtime = runtime
        self.profile = profile
        self.restarts = restarts if restarts is not None else {}

    def collect(self) -> Iterator[Metric]:
        profile = self.profile()
        status = build_status(self.runtime, profile)
        yield from self.memory(status)
        yield from self.services(status, self.wanted(profile, status))
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
        pending = GaugeMetricFamily("reconciler_pending", "Items the last plan could not reach")
        pending.add_metric([], len(status.pending))
        yield pending
        yield from self.gateway()

    def memory(self, status: Status) -> Iterator[Metric]:
        """Each GPU's total, used, split by use (summing to the total) and over-commit, in bytes."""
        total = GaugeMetricFamily("reconciler_gpu_memory_total_bytes", "GPU memory in all (NVML)", labels=["gpu"])
        used = GaugeMetricFamily("reconciler_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
        split = GaugeMetricFamily("reconciler_gpu_memory_bytes", "GPU memory by use; the uses of a GPU sum to "
                                  "its total (plus any over-commit)", labels=["gpu", "use"])
        over = GaugeMetricFamily("reconciler_gpu_overcommit_bytes", "GPU memory reserved above the GPU's total "
                                 "(0 unless invariant 4 is broken)", labels=["gpu"])
        for gpu in status.gpus:
            index = str(gpu.index)
            total.add_metric([index], gpu.total_mb * MIB)
            used.add_metric([index], gpu.used_mb * MIB)
            for use, mb in memory_split(gpu).items():
                split.add_metric([index, use], mb * MIB)
            over.add_metric([index], overcommit_mb(gpu) * MIB)
        yield from (total, used, split, over)

    def wanted(self, profile: Profile, status: Status) -> set[str]:
        """The managed services the last pass's world wants running (none before the first pass)."""
        last = self.runtime.last_pass()
        if last is None:
            return set()
        world = world_now(profile, last.snapshot, self.runtime.ledger.leases(), self.runtime.clock.now())
        return {name for name in compute_wanted(world).wanted
                if name in profile.services and profile.services[name].managed is not None}

    def services(self, status: Status, wanted: set[str]) -> Iterator[Metric]:
        """Per service of the profile (and per instance left of an older one), every series, 0 when idle."""
        names = sorted({s.service for s in status.services} | {i.service for i in status.instances})
        up = GaugeMetricFamily("reconciler_service_up", "1 while a healthy, running instance serves the service",
                               labels=["service"])
        wants = GaugeMetricFamily("reconciler_service_wanted", "1 while the reconciler wants the service running",
                                  labels=["service"])
        restarts = CounterMetricFamily("reconciler_service_restarts", "Restarts carried out (launch changes, and "
                                       "starts after a failure) since this server started", labels=["service"])
        failures = GaugeMetricFamily("reconciler_service_backoff_failures", "Failures in a row counted against "
                                     "the service (its backoff)", labels=["service"])
        next_try = GaugeMetricFamily("reconciler_service_backoff_next_attempt_seconds", "Seconds until a "
                                     "backing-off service may be tried again (0: now)", labels=["service"])
        stalled = GaugeMetricFamily("reconciler_service_stalled", "1 when the service is stalled (backing off "
                                    "after repeated failures)", labels=["service"])
        leases = GaugeMetricFamily("reconciler_leases", "Leases held (not expired), by service and kind",
                                   labels=["service", "kind"])
        demands = GaugeMetricFamily("reconciler_demands", "Lease requests waiting, by service", labels=["service"])
        serving = {i.service for i in status.instances if i.state == "running" and i.healthy}
        held: dict[tuple[str, str], int] = {}
        for lease in (lease for lease in status.leases if lease.state == "active"):
            held[(lease.service, lease.kind)] = held.get((lease.service, lease.kind), 0) + 1
        waiting: dict[str, int] = {}
        for demand in status.demands:
            waiting[demand.service] = waiting.get(demand.service, 0) + 1
        now = self.runtime.clock.now()
        for name in names:
            up.add_metric([name], 1 if name in serving else 0)
            wants.add_metric([name], 1 if name in wanted else 0)
            restarts.add_metric([name], self.restarts.get(name, 0))
            backoff = self.runtime.store.get_backoff(name)
            failures.add_metric([name], backoff.failures)
            wait = (backoff.next_attempt_at - now).total_seconds() if backoff.next_attempt_at is not None else 0.0
            next_try.add_metric([name], round(max(0.0, wait), 3) if backoff.failures else 0.0)
            stalled.add_metric([name], 1 if backoff.stalled else 0)
            for kind in LEASE_KINDS:
                leases.add_metric([name, kind], held.get((name, kind), 0))
            demands.add_metric([name], waiting.get(name, 0))
        # a lease or demand of a service no longer in the profile still shows (it will be released)
        for (name, kind), n in sorted(held.items()):
            if name not in names:
                leases.add_metric([name, kind], n)
        for name, n in sorted(waiting.items()):
            if name not in names:
                demands.add_metric([name], n)
        yield from (up, wants, restarts, failures, next_try, stalled, leases, demands)

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
        proxied = CounterMetricFamily("reconciler_gateway_proxied", "Gateway requests placed on another node's "
                                      "gateway and answered there, by that node", labels=[*labels, "to_node"])
        for m in traffic:
            key = [m.model, m.service]
            for node, n in sorted(m.proxied.items()):
                proxied.add_metric([*key, node], n)
            for code, n in sorted(m.statuses.items()):
                requests.add_metric([*key, str(code)], n)
            gone.add_metric(key, m.disconnected)
            in_flight.add_metric(key, m.in_flight)
            queued.add_metric(key, m.queued)
            ttfb.add_metric(key, m.ttfb.count, m.ttfb.total_s)
            total.add_metric(key, m.total.count, m.total.total_s)
            for action, n in m.caused.items():
                caused.add_metric([*key, action], n)
        yield from (requests, gone, in_flight, queued, ttfb, total, caused, proxied)


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


class NodeLabelled:
    """A registry's metrics with a constant ``node`` label added to every sample (cluster mode)."""

    def __init__(self, registry: CollectorRegistry, node: str):
        self.registry = registry
        self.node = node

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [s._replace(labels={"node": self.node, **s.labels}) for s in metric.samples]
            yield labelled


_COUNTED = frozenset({EventKind.ACTION_FINISHED, EventKind.BACKOFF, EventKind.PASS_FINISHED})  # what _listen reads


class Metrics:
    def __init__(self, runtime: Runtime, profile: Callable[[], Profile], connections: ConnectionGuard | None = None,
                 node: Callable[[], str | None] = lambda: None):
        self.runtime = runtime
        self.node = node  # the node's name in a cluster (every series gets a `node` label), None on one machine
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
        self.restarts: dict[str, int] = {}  # service → restarts carried out (see StateCollector)
        self._failed: set[str] = set()  # services that failed since their last start
        self.registry.register(StateCollector(runtime, profile, self.restarts))
        if connections is not None:
            self.registry.register(ConnectionCollector(connections))
        self._listening: asyncio.Task[None] | None = None

    def observe_lease(self, path: str, result: str, seconds: float) -> None:
        self.lease_wait.labels(path, result).observe(seconds)

    def render(self) -> bytes:
        node = self.node()
        if node is None:
            return generate_latest(self.registry)
        return generate_latest(NodeLabelled(self.registry, node))  # duck-typed: anything with collect()

    def start(self) -> None:
        # only the kinds it counts are queued: a pass's other events (every second on a quiet host) and a
        # lease's two (per request) wake no task here
        subscription = self.runtime.events.subscribe(wants=lambda event: event.get("kind") in _COUNTED)
        self._listening = asyncio.ensure_future(self._listen(subscription))

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
                    self._count_restart(event)
                elif kind == EventKind.BACKOFF and isinstance(event.get("service"), str):
                    self._failed.add(event["service"])
                elif kind == EventKind.PASS_FINISHED and isinstance(event.get("duration_s"), (int, float)):
                    self.reconcile.observe(event["duration_s"])

    def _count_restart(self, event: dict[str, object]) -> None:
        """A restart action carried out, or a start of a service that failed since its last start, is a
        restart (the way Kubernetes counts a container's)."""
        service, kind = event.get("service"), event.get("action_kind")
        if not isinstance(service, str) or event.get("status") != "done":
            return
        if kind == "restart" or (kind == "start" and service in self._failed):
            self.restarts[service] = self.restarts.get(service, 0) + 1
        if kind in ("start", "restart"):
            self._failed.discard(service)
