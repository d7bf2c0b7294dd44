"""One node of a cluster: membership, publishing what it has, and placing requests across the cluster.

**Keys.** Under ``/reconciler/<cluster>/``:

* ``nodes/<node>`` — liveness: ``{node, url, advertise, gateway}`` (``gateway``: its model gateway's URL
  on the advertised host, when it serves one; else null), attached to the node's
  etcd lease (TTL :data:`DEFAULT_TTL_S`, kept alive every third of it);
* ``state/<node>`` — what it shares: GPUs (total, reserved, free), each service of its profile
  (priority, size, the URL it answers on from other machines, warm slots, the planner's offer:
  :mod:`.placement`), instances, leases; with a gateway, its URL and the models it routes
  (``models``: name → service, upstream name, protocol, MB), so that any node's gateway can place a
  request for a model and list every node's models;
* ``reservations/<node>`` — per GPU: total, reserved and free MB; rewritten only when they change
  (a start, a stop, a VRAM lease), not with every lease of a running service;
* ``leases/<id>`` — one per lease it holds (which node, which service): any node can find the
  owner of a lease id to forward a renew or a release;
* ``placements/<id>`` — a request this node placed (on itself or another node) that has waited
  for its answer longer than :data:`RECORD_AFTER_S` (a start, a queue); deleted once answered
  (*the record*, below).

Every key is attached to its node's etcd lease, so everything a node published vanishes
when it dies: within one TTL its reservations and leases are gone from the cluster view
and from placement, and holders of its leases get 404 when they renew.

**Publishing.** The node's SQLite stays the authority for what is its own (DESIGN §8); etcd
gets a copy. Any event of the runtime (a lease granted or released, a pass, an action)
marks the state dirty; a publisher writes it in one txn (the state key, the lease keys
that changed, the placements answered) at most every :data:`PUBLISH_DEBOUNCE_S`, and at
least every :data:`PUBLISH_INTERVAL_S`. The txn compares the node key's create revision, so
a node whose lease expired behind its back (a long pause, a partition) cannot publish into
a dead incarnation: it registers again (a new lease, the node key, everything re-published
from the local store) — which is also what happens when etcd comes back after a partition.

**Partitions.** Nothing here ever stops, starts or signals anything: the runtime does not
know etcd exists. A node cut off from etcd keeps converging to its own profile with its
services running; the cluster just stops seeing it, and it cannot place requests on
other nodes (placement answers 503) until etcd answers again.

**Placement** (:meth:`ClusterNode.place` for a lease on a service, :meth:`~ClusterNode.place_model`
for a gateway request naming a model, :meth:`~ClusterNode.place_vram` for cf-orch's VRAM lease: three
rankings of :mod:`.placement`, one confirmation, :meth:`~ClusterNode._commit`). The cluster view at
revision R — kept in memory by a watch of the prefix, else one range read of it —
:func:`.placement.rank`, then, when another node is chosen, one linearizable etcd read that
confirms the choice (:mod:`.confirming`, shared by the placements waiting at that moment): the
chosen node's liveness key still has the create revision we read (the same incarnation, still
alive) and its ``reservations`` key the mod revision (no GPU memory was reserved or freed there
since we read it) — the compare of a transaction that writes nothing. A loser re-reads and
tries again,
at most :data:`MAX_ATTEMPTS` times with a short jittered pause. (We compared the whole
state key at first: every lease then changed it, and 50 concurrent requests lost 3
txns in 4; warm slots are the serving node's to count, under its lock.) We chose to *forward*
the request to the chosen node's API over HTTP rather than have the node pick the
placement up through a watch: the request is answered by the same code that answers
it on one machine (warm path, demand → converge → grant, the wait and its reason),
and no GPU can be double-booked because each node is the only writer of its own GPUs'
reservations — its ledger grants atomically, in memory on the event loop's thread (invariant 4).
The confirmation makes the *choice* atomic against a stale view; the node's ledger makes the
*booking* atomic. At most one etcd round trip per lease placed on another node (the
confirmation, fewer when concurrent placements share one) while the watch is current, two
when the view must be read first (after a lost confirmation, or while the watch reconnects),
none for a lease the node asked places on itself, plus the nodes' batched publishes, which
are off the request path.

**The record.** The confirmation writes nothing: etcd answers a txn without writes, but with
one plain read in it (:class:`~.etcd.Get`: a txn of no operation at all it would answer from
the member's own state, even a member without quorum), as a linearizable read (its leader
confirms it still leads: one heartbeat to a majority) with no raft log entry and no fsync — a
range's 1.6-3 ms instead of a write's 2.6-5.5 on a 3-member etcd on disk. Until issue 12's last
round the txn also put the placement record; that lost nothing to drop: nobody compares against
a placement record, so putting one in the txn never kept two placers apart — the compare on the
chosen node's keys does, and it is still there.
The record only shows a request in flight (``GET /v1/cluster``, ``plan --cluster``; no
ranking reads it), so the placer writes it with a batched publish, attached to its own etcd
lease, once the request has waited :data:`RECORD_AFTER_S` (a start, a queue: within the
:data:`PUBLISH_INTERVAL_S` that follows), and deletes it once the answer came back (it sees
the answer: it forwarded the request). A warm request never has one — not even under load,
when writing one for each of fifty concurrent requests (and the watch events they cause on
every node) cost more than the requests themselves. A placer that dies takes its records with
it; its forwarded requests are answered anyway (or cancelled: the connection closed).

**Local choices pay no etcd round trip.** When the ranking chooses this node itself, nothing
is confirmed: the request goes straight to the local path. The confirmation is there to make
a choice of *another* node atomic against a stale view — its compare fails when that node's
reservations or incarnation changed since we read them, so we re-read instead of sending it
a request chosen on old facts. For this node those facts are not read from etcd at all: its ledger,
under its lock on the event loop, is the only writer of its GPUs' reservations and grants or
refuses (queues, starts, evicts) against what it holds *now*. The compare on our own
reservations key could only fail because of our own writes, and what it would protect — a
booking on our GPUs — our ledger makes atomic anyway. So a stale view can make a local
choice *less good* (another node became warmer meanwhile: the request queues or starts here
where it could have been warm there, exactly as a request that arrived a moment earlier), never
a double booking. Liveness needs no compare either: we are alive if we answer; a node cut off
from etcd drops its watched view when a heartbeat fails (within a third of the TTL), and
placement then reads etcd and answers 503 as before — until then it serves from its last view
what it chose for itself, as its gateway does. Its placement record is written as any other
(*the record*, above): never for a warm request. Counted as
``local_placements`` (and ``placement_confirmations`` for the others) in ``GET /v1/cluster``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from reconciler.cluster.confirming import Check, Confirmations, Revisions
from reconciler.cluster.etcd import Compare, Delete, Etcd, EtcdError, EtcdRequestError, Get, KeyValue, Put
from reconciler.cluster.placement import Choice, Offer, binds_model, offers, rank, rank_model, rank_vram, warm_slots
from reconciler.core.accounting import planned_reservations, world_now
from reconciler.core.clock import iso_utc
from reconciler.core.compatibility import capacity
from reconciler.core.events import EventKind
from reconciler.core.profile import Profile
from reconciler.core.world import lease_active
from reconciler.runtime import Runtime

DEFAULT_TTL_S = 10
PUBLISH_INTERVAL_S = 2.0
PUBLISH_DEBOUNCE_S = 0.05
RECORD_AFTER_S = 0.5  # a placement's record is written once its request has waited this long (see "The record")
REFOLLOW_S = 30.0  # the watched view is read again from scratch this often
RETRY_S = 1.0  # pause between attempts to reach etcd while it does not answer
MAX_ATTEMPTS = 8  # placement attempts (confirmations lost) before answering "busy"
ABANDONED_S = 900.0  # a placement older than the longest wait (600 s) and never answered is dropped
REMEMBERED = 10_000  # leases this node placed elsewhere whose owner it remembers
KEEPALIVE = 8  # idle connections kept to other nodes: httpcore scans them all per request (gateway/upstream.py)
FORWARDED = "X-Reconciler-Forwarded"
PLACEMENT = "X-Reconciler-Placement"

log = logging.getLogger("reconciler.cluster")


class ClusterRefused(Exception):
    """No node can take the request (``status`` 503) or the pinned node is unknown (404)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Placed:
    node: str
    url: str
    placement: str
    tier: str
    local: bool
    service: str = ""
    model: str | None = None
    gateway: str = ""  # the chosen node's gateway URL (a gateway request)
    gpu: int | None = None  # the chosen GPU (a VRAM lease)


@dataclass
class View:
    revision: int
    nodes: dict[str, KeyValue] = field(default_factory=dict)
    states: dict[str, KeyValue] = field(default_factory=dict)
    reservations: dict[str, KeyValue] = field(default_factory=dict)
    leases: dict[str, KeyValue] = field(default_factory=dict)
    placements: dict[str, KeyValue] = field(default_factory=dict)

    def alive_states(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in self.nodes:
            if name in self.states and name in self.reservations:
                out[name] = self.states[name].json()
        return out


class ClusterNode:
    """Membership, publishing and placement for one node; a companion of the watch loop."""

    def __init__(self, etcd: Etcd, *, cluster: str, node: str, advertise: str, api_url: Callable[[], str | None],
                 ttl_s: int = DEFAULT_TTL_S, token: str | None = None,
                 gateway_url: Callable[[], str | None] | None = None):
        self.etcd = etcd
        self.cluster = cluster
        self.node = node
        self.advertise = advertise
        self._api_url = api_url
        self._gateway_url = gateway_url or (lambda: None)
        self._models: Callable[[], dict[str, dict[str, Any]]] | None = None  # the gateway's, once it started
        self.ttl_s = ttl_s
        self.token = token
        self.prefix = f"/reconciler/{cluster}/"
        self.lease_id: int | None = None
        self._node_create: int = 0
        self.connected = False
        self.placements = 0  # placements committed by this node
        self.conflicts = 0  # placements whose confirmation failed: a concurrent change (re-read and retried)
        self.placement_confirmations = 0  # choices of another node confirmed against etcd (:mod:`.confirming`)
        self.local_placements = 0  # placements on this node itself: nothing confirmed ("Local choices")
        self._runtime: Runtime | None = None
        self._profile: Callable[[], Profile] | None = None
        self._dirty = asyncio.Event()
        self._registered = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._published_leases: dict[str, str] = {}
        self._published_state: dict[str, Any] = {}
        self._published_reservations = ""
        self._answered: set[str] = set()
        self._unpublished: dict[str, tuple[str, float]] = {}  # ours, not written yet: id → (record, since)
        self._written: dict[str, str] = {}  # our own placements written, not yet answered: id → record
        self._writing: dict[str, str] = {}  # those the publish in flight writes
        self._offers: dict[str, Offer] = {}
        self._offers_for: object = None
        self._http: httpx.AsyncClient | None = None
        self._cached: View | None = None  # kept current by a watch (:meth:`_follow`)
        self._placed: OrderedDict[str, tuple[str, str]] = OrderedDict()  # lease id → (node, url) we forwarded
        self._confirmations = Confirmations(self._revisions, self._holds)

    # --- keys -------------------------------------------------------------------------

    def key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}/{name}"

    @property
    def url(self) -> str:
        """This node's API as other machines reach it: the advertised host and the API's port."""
        local = self._api_url() or ""
        port = local.rsplit(":", 1)[-1] if local else ""
        scheme = local.split("://", 1)[0] if "://" in local else "http"
        return f"{scheme}://{self.advertise}:{port}" if port else ""

    @property
    def gateway_url(self) -> str | None:
        """This node's model gateway as other machines reach it (the advertised host), when it has one."""
        local = self._gateway_url()
        if not local:
            return None
        return f"http://{self.advertise}:{local.rsplit(':', 1)[-1]}"

    def serve_models(self, models: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """The gateway's routing table, published with this node's state (name → service, model, api, mb)."""
        self._models = models
        self._dirty.set()

    def service_url(self, port: int | None) -> str | None:
        return f"http://{self.advertise}:{port}" if port else None

    # --- companion --------------------------------------------------------------------

    async def start(self, runtime: Runtime, profile: Callable[[], Profile]) -> None:
        self._runtime, self._profile = runtime, profile
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None),
                                       limits=httpx.Limits(max_connections=256, max_keepalive_connections=KEEPALIVE))
        subscription = runtime.events.subscribe()
        self._tasks = [asyncio.ensure_future(self._heartbeat()), asyncio.ensure_future(self._publisher()),
                       asyncio.ensure_future(self._listen(subscription)), asyncio.ensure_future(self._follow())]
        with contextlib.suppress(TimeoutError):  # etcd down at start-up: serve anyway, join when it answers
            await asyncio.wait_for(self._registered.wait(), self.etcd.timeout_s * len(self.etcd.endpoints) + 1)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.lease_id is not None:  # a clean leave: our keys go at once, not after a TTL
            with contextlib.suppress(EtcdError):
                await self.etcd.revoke(self.lease_id)
        if self._http is not None:
            await self._http.aclose()
        await self.etcd.close()

    def _announce(self, kind: EventKind, message: str, **data: Any) -> None:
        if self._runtime is not None:
            self._runtime.events.publish(kind, message=message, cluster=self.cluster, node=self.node, **data)

    async def _listen(self, subscription: Any) -> None:
        async for _ in subscription:
            self._dirty.set()

    async def _heartbeat(self) -> None:
        while True:
            try:
                if self.lease_id is None:
                    await self._register()
                else:
                    ttl = await self.etcd.keepalive(self.lease_id)
                    if ttl <= 0:
                        self._lost("its etcd lease expired")
                        continue
                    if not self.connected:
                        await self._publish(force=True)
                        self._connected()
            except EtcdRequestError as exc:
                if "lease not found" in str(exc):
                    self._lost("its etcd lease expired")
                    continue
                self._disconnected(exc)
            except EtcdError as exc:
                self._disconnected(exc)
            await asyncio.sleep(self.ttl_s / 3 if self.connected else RETRY_S)

    def _lost(self, why: str) -> None:
        log.warning("node %s: %s; registering again", self.node, why)
        self.lease_id = None
        self.connected = False  # announced as joined again once registered
        self._published_leases = {}
        self._unpublished.update((p, (doc, 0.0)) for p, doc in self._written.items())  # gone with the old lease
        self._written = {}

    def _connected(self) -> None:
        if not self.connected:
            self.connected = True
            self._announce(EventKind.CLUSTER_JOINED, f"node {self.node} joined cluster {self.cluster} "
                                                     f"({self.url or 'no API'})", url=self.url)

    def _disconnected(self, exc: Exception) -> None:
        self._cached = None  # a view we cannot vouch for: placement reads etcd again (and says it cannot)
        if self.connected:
            self.connected = False
            message = (f"cluster {self.cluster}: etcd does not answer ({exc}); services keep running, "
                       f"placement across nodes waits until it does")
            log.warning("%s", message)
            self._announce(EventKind.CLUSTER_DISCONNECTED, message)

    async def _register(self) -> None:
        lease = await self.etcd.grant(self.ttl_s)
        me = {"node": self.node, "url": self.url, "advertise": self.advertise, "cluster": self.cluster,
              "gateway": self.gateway_url}
        _, revision = await self.etcd.txn([], [Put(self.key("nodes", self.node), json.dumps(me), lease)])
        self.lease_id, self._node_create = lease, revision
        self._published_leases = {}
        await self._publish(force=True)
        self._registered.set()
        self._connected()

    async def _publisher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), PUBLISH_INTERVAL_S)
            await asyncio.sleep(PUBLISH_DEBOUNCE_S)
            self._dirty.clear()
            if self.lease_id is None:
                continue
            try:
                await self._publish()
            except EtcdRequestError as exc:
                if "lease not found" in str(exc):
                    self._lost("its etcd lease expired")
                else:
                    log.warning("cluster publish failed: %s", exc)
            except EtcdError as exc:
                self._disconnected(exc)

    # --- what we publish ------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """This node's shared state, from the store and the last pass (the local SQLite is the authority)."""
        assert self._runtime is not None and self._profile is not None, "started"
        runtime, profile = self._runtime, self._profile()
        now = runtime.clock.now()
        stored = runtime.state()
        last = runtime.last_pass()
        world = world_now(profile, last.snapshot, stored.leases, now) if last is not None else None
        gpus: list[dict[str, Any]] = []
        if world is not None and last is not None:
            planned = planned_reservations(world, last.plan)
            for index, view in sorted(world.gpus.items()):
                free = max(0, view.free - planned.get(index, 0))
                reserved = sum(h.reservation for h in view.holders.values()) + planned.get(index, 0)
                gpus.append({"index": index, "name": view.gpu.name, "total_mb": view.total,
                             "reserved_mb": reserved, "foreign_mb": view.foreign, "free_mb": free,
                             "used_mb": view.gpu.used_mb})
            if self._offers_for is not last:
                self._offers = offers(profile, last.snapshot, stored.leases, stored.demands, now)
                self._offers_for = last
        slots = warm_slots(profile, world, stored.leases, now)
        active = [lease for lease in stored.leases if lease_active(lease, now)]
        instances = {i.service: i for i in stored.instances}
        services: dict[str, Any] = {}
        for name, spec in profile.services.items():
            instance = instances.get(name)
            offer = self._offers.get(name)
            services[name] = {
                "priority": spec.priority, "max_mb": spec.max_mb, "capacity": capacity(spec),
                "url": self.service_url(spec.probe_port), "model_bound": binds_model(profile, name),
                "running": instance is not None and instance.state == "running",
                "model": instance.model if instance is not None else None,
                "gpu": instance.gpu if instance is not None else None,
                "held": sum(1 for lease in active if lease.service == name and lease.kind == "service"),
                "slots_free": slots.get(name, 0),
                "offer": offer.to_json() if offer is not None else None,
            }
        return {
            "node": self.node, "url": self.url, "advertise": self.advertise, "profile": profile.name,
            "observed_at": iso_utc(last.snapshot.now) if last is not None else None,
            "gpus": gpus, "services": services,
            "gateway": self.gateway_url, "models": self._models() if self._models is not None else {},
            "instances": [{"service": i.service, "gpu": i.gpu, "gpus": i.gpus, "state": i.state, "model": i.model,
                           "origin": i.origin} for i in stored.instances],
            "leases": [self._lease_doc(lease) for lease in active],
        }

    def _lease_doc(self, lease: Any) -> dict[str, Any]:
        return {"id": lease.id, "node": self.node, "service": lease.service, "holder": lease.holder,
                "kind": lease.kind, "gpu": lease.gpu, "mb": lease.mb, "model": lease.model,
                "expires_at": iso_utc(lease.expires_at) if lease.expires_at else None, "node_url": self.url}

    async def _publish(self, force: bool = False) -> None:
        lease = self.lease_id
        if lease is None:
            return
        state = self.state()
        same = {k: v for k, v in state.items() if k != "observed_at"}  # a pass that changed nothing: no write
        due = {p: doc for p, (doc, since) in self._unpublished.items()
               if time.monotonic() - since >= RECORD_AFTER_S}
        if not force and not self._answered and not due and same == self._published_state:
            return
        docs = {doc["id"]: json.dumps(doc, sort_keys=True) for doc in state["leases"]}
        ops: list[Put | Delete] = [Put(self.key("state", self.node), json.dumps(state), lease)]
        reservations = json.dumps({"gpus": [{k: g[k] for k in ("index", "total_mb", "reserved_mb", "free_mb")}
                                            for g in state["gpus"]]}, sort_keys=True)
        if force or reservations != self._published_reservations:
            ops.append(Put(self.key("reservations", self.node), reservations, lease))
        for lease_id, doc in docs.items():
            if force or self._published_leases.get(lease_id) != doc:
                ops.append(Put(self.key("leases", lease_id), doc, lease))
        for gone in set(self._published_leases) - set(docs):
            ops.append(Delete(self.key("leases", gone)))
        answered, self._answered = self._answered, set()
        ops.extend(Delete(self.key("placements", p)) for p in answered | self._abandoned())
        writing = due  # answered while written: deleted by the next publish
        for placement in writing:
            del self._unpublished[placement]
        self._writing.update(writing)  # (a forced publish may run beside the publisher's)
        ops.extend(Put(self.key("placements", p), doc, lease) for p, doc in writing.items())
        try:
            ok, _ = await self.etcd.txn([Compare(self.key("nodes", self.node), "CREATE", self._node_create)], ops)
        except EtcdError:
            self._answered |= answered
            self._unwritten(writing)
            raise
        finally:
            for placement in writing:
                self._writing.pop(placement, None)
        if ok:
            self._written.update((p, doc) for p, doc in writing.items() if p not in self._answered)
        else:
            self._answered |= answered
            self._unwritten(writing)
            self._lost("its node key is gone")
            return
        self._published_leases = docs
        self._published_state = same
        self._published_reservations = reservations

    def _unwritten(self, writing: dict[str, str]) -> None:
        """Placement records a publish may not have written: again with the next one, unless answered
        meanwhile (then deleted by it, in case the txn was applied and only its answer lost)."""
        for placement, doc in writing.items():
            if placement not in self._answered:
                self._unpublished[placement] = (doc, 0.0)

    def _abandoned(self) -> set[str]:
        """Placements on this node that their placer never deleted (placers before the record became
        theirs attached it to the chosen node's lease; one that died before forwarding left it): dropped
        after :data:`ABANDONED_S`, so that they do not stay as long as this node lives."""
        view = self._cached
        if view is None:
            return set()
        now = time.time()
        return {name for name, kv in view.placements.items()
                if kv.json().get("node") == self.node and now - float(kv.json().get("at", now)) > ABANDONED_S}

    def answered(self, placement: str) -> None:
        """The request of ``placement`` — one this node placed — has its answer: drop its record with the
        next publish, or forget it when it was never written (nothing to write, nothing to delete)."""
        if self._unpublished.pop(placement, None) is not None:
            return
        if self._written.pop(placement, None) is not None or placement in self._writing:
            self._answered.add(placement)  # (an id of another node's, from a forwarded request: not ours)
            self._dirty.set()

    def touch(self) -> None:
        self._dirty.set()

    # --- reading the cluster ----------------------------------------------------------------

    async def _revisions(self) -> Revisions:
        """Every node's liveness and reservations key with its revisions, now (one linearizable read)."""
        found = await self.etcd.ranges([self.key("nodes"), self.key("reservations")], keys_only=True)
        return {kv.key: (kv.create_revision, kv.mod_revision) for part in found for kv in part.kvs}

    async def _holds(self, checks: Sequence[Check]) -> bool:
        """Whether every check holds now: one txn of their compares that writes nothing — with one read in it,
        or etcd would answer it from the member's own state, quorum or not (:class:`~.etcd.Get`)."""
        ok, _ = await self.etcd.txn([Compare(c.key, c.target, c.revision) for c in checks], [Get(checks[0].key)])
        return ok

    async def view(self) -> View:
        """The cluster as etcd has it now (one range of the prefix)."""
        found = await self.etcd.range(self.prefix, prefix=True)
        view = View(found.revision)
        for kv in found.kvs:
            self._apply(view, "PUT", kv)
        return view

    def _apply(self, view: View, kind: str, kv: KeyValue) -> None:
        table_name, _, name = kv.key[len(self.prefix):].partition("/")
        table = {"nodes": view.nodes, "state": view.states, "reservations": view.reservations,
                 "leases": view.leases, "placements": view.placements}.get(table_name)
        if table is None or not name:
            return
        if kind == "DELETE":
            table.pop(name, None)
        else:
            table[name] = kv
        view.revision = max(view.revision, kv.mod_revision)

    async def _follow(self) -> None:
        """Keep :attr:`_cached` — the view, kept current by a watch — for placement's first attempt: a
        placement then costs one etcd round trip (its confirmation) instead of two. The cache is dropped
        whenever the watch breaks, and read again from scratch every :data:`REFOLLOW_S`; a choice that loses (the
        cache was behind) re-reads with a range, and so does a refusal (no node can take it, or none has the
        service): a request is refused only on what etcd holds now."""
        while True:
            try:
                view = await self.view()
                self._cached = view
                async with asyncio.timeout(REFOLLOW_S):  # a member that hangs cannot keep it stale for long
                    async for events in self.etcd.watch(self.prefix, view.revision + 1):
                        for event in events:
                            self._apply(view, event.kind, event.kv)
                        if self.connected:  # dropped by a heartbeat that failed: back once etcd answers again
                            self._cached = view
                self._cached = None  # the stream ended: the member went away
                await asyncio.sleep(RETRY_S)
            except TimeoutError:
                continue  # read it all again and follow from there
            except EtcdError:
                self._cached = None
                await asyncio.sleep(RETRY_S)

    async def place(self, service: str, model: str | None, *, pin: str | None = None,
                    exclude: frozenset[str] = frozenset()) -> Placed:
        """Choose a node for a lease on ``service`` and commit the choice (see the module docstring)."""

        def choose(view: View) -> list[Choice]:
            states = view.alive_states()
            if pin is not None and pin not in states:
                raise self._no_pin(pin, states)
            choices, refusals = rank(states, service, model, pin=pin, exclude=exclude)
            if not choices:
                if not any(service in s.get("services", {}) for s in states.values()):
                    raise ClusterRefused(404, f"unknown service {service!r}: no node of cluster {self.cluster!r} "
                                              "has it in its profile")
                raise ClusterRefused(503, f"no node can take {service!r} now: " + "; ".join(refusals))
            return choices

        return await self._commit(choose, service)

    async def place_model(self, asked: str, *, exclude: frozenset[str] = frozenset()) -> Placed:
        """Choose a node whose gateway serves the model ``asked`` and commit the choice: 404 when no live
        node serves it, 503 when none can take it now (:func:`.placement.rank_model`)."""

        def choose(view: View) -> list[Choice]:
            states = view.alive_states()
            choices, refusals = rank_model(states, asked, exclude=exclude)
            if not choices:
                if not refusals:
                    gone = " (the nodes that serve it did not answer)" if exclude else ""
                    raise ClusterRefused(404, f"model {asked!r} is not served by any live node of cluster "
                                              f"{self.cluster!r}{gone}")
                raise ClusterRefused(503, f"no node can take model {asked!r} now: " + "; ".join(refusals))
            return choices

        return await self._commit(choose, asked)

    async def place_vram(self, mb: int, gpu: int | None, *, pin: str | None = None,
                         exclude: frozenset[str] = frozenset()) -> Placed:
        """Choose a node and GPU with ``mb`` free now for a VRAM lease and commit the choice (503 when none
        has it, 404 for a pinned node that is not alive)."""

        def choose(view: View) -> list[Choice]:
            alive = {n: view.reservations[n].json() for n in view.alive_states()}
            if pin is not None and pin not in alive:
                raise self._no_pin(pin, alive)
            choices, refusals = rank_vram(alive, mb, gpu, pin=pin, exclude=exclude)
            if not choices:
                raise ClusterRefused(503, f"Insufficient VRAM — no node has {mb} MB free"
                                          f"{f' on GPU {gpu}' if gpu is not None else ''}: " + "; ".join(refusals))
            return choices

        return await self._commit(choose, f"{mb} MB of VRAM")

    def _no_pin(self, pin: str, alive: dict[str, Any]) -> ClusterRefused:
        known = ", ".join(sorted(alive)) or "none"
        return ClusterRefused(404, f"no live node {pin!r} in cluster {self.cluster!r} (live: {known})")

    async def _commit(self, choose: Callable[[View], list[Choice]], what: str) -> Placed:
        """The placement transaction: read the view, take the best choice, commit it comparing what was read;
        a loser re-reads and retries (at most :data:`MAX_ATTEMPTS` times)."""
        for attempt in range(MAX_ATTEMPTS):
            cached = self._cached if attempt == 0 else None
            view = cached if cached is not None else await self.view()
            try:
                choices = choose(view)
            except ClusterRefused:
                if cached is None:
                    raise
                view = await self.view()  # a refusal comes from a view read now, never from the cache (it may
                choices = choose(view)  # be behind: a node that just joined, a service just offered)
            choice = choices[0]
            node_kv, reserved_kv = view.nodes[choice.node], view.reservations[choice.node]
            placement = str(uuid.uuid4())
            doc = {"service": choice.service, "model": choice.model, "node": choice.node, "tier": choice.tier,
                   "by": self.node, "revision": view.revision, "at": time.time()}
            local = choice.node == self.node
            if local:  # our own ledger decides: nothing to confirm (module docstring, "Local choices")
                self.local_placements += 1
                ok = True
            else:  # a linearizable read, shared with the placements waiting now (:mod:`.confirming`)
                self.placement_confirmations += 1
                ok = await self._confirmations.confirm([Check(node_kv.key, "CREATE", node_kv.create_revision),
                                                        Check(reserved_kv.key, "MOD", reserved_kv.mod_revision)])
            if ok:
                self.placements += 1
                self._unpublished[placement] = (json.dumps(doc), time.monotonic())  # written if it waits
                self._dirty.set()
                record = node_kv.json()
                return Placed(choice.node, str(record.get("url", "")), placement, choice.tier, local,
                              choice.service, choice.model, str(record.get("gateway") or ""), choice.gpu)
            self.conflicts += 1
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        raise ClusterRefused(503, f"placement of {what} lost {MAX_ATTEMPTS} races in a row to concurrent "
                                  "changes; retry")

    async def current(self) -> View:
        """The cluster view: the watched one when it is current (no round trip), else one range read."""
        return self._cached if self._cached is not None else await self.view()

    def remember(self, lease_id: str, node: str, url: str) -> None:
        """A lease we placed on ``node``: its holder may renew or release it here before that node has
        published it (read your writes through this node)."""
        self._placed[lease_id] = (node, url)
        self._placed.move_to_end(lease_id)
        while len(self._placed) > REMEMBERED:
            self._placed.popitem(last=False)

    def forget(self, lease_id: str) -> None:
        self._placed.pop(lease_id, None)

    async def lease_owner(self, lease_id: str) -> tuple[str, str] | None:
        """(node, its API URL) holding ``lease_id``: a lease we placed ourselves (no etcd round trip: a
        holder renews and releases where it asked), else from etcd; None when no live node has it."""
        mine = self._placed.get(lease_id)
        if mine is not None:
            return mine
        kv = await self.etcd.get(self.key("leases", lease_id))
        if kv is None:
            return None
        doc = kv.json()
        return str(doc["node"]), str(doc.get("node_url", ""))

    async def forward(self, method: str, url: str, body: Any = None, *, placement: str | None = None,
                      timeout_s: float = 30.0) -> tuple[int, Any]:
        """Send a request to another node's API; (status, JSON answer). Raises httpx.TransportError."""
        assert self._http is not None, "started"
        headers = {FORWARDED: self.node}
        if placement is not None:
            headers[PLACEMENT] = placement
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        response = await self._http.request(method, url, json=body, headers=headers, timeout=timeout_s)
        try:
            answer = response.json()
        except ValueError:
            answer = {"detail": response.text or f"HTTP {response.status_code}"}
        return response.status_code, answer

    async def overview(self) -> dict[str, Any]:
        """``GET /v1/cluster``: the nodes (each with its published ``services``: what it offers placement),
        where each service runs, leases by node, placements in flight."""
        view = await self.view()
        nodes = []
        where: dict[str, list[str]] = {}
        by_node: dict[str, list[Any]] = {}
        for name, state in sorted(view.alive_states().items()):
            running = sorted(s for s, d in state.get("services", {}).items() if d.get("running"))
            for service in running:
                where.setdefault(service, []).append(name)
            by_node[name] = state.get("leases", [])
            node_doc = view.nodes[name].json()
            nodes.append({"node": name, "alive": True, "url": node_doc.get("url"),
                          "advertise": node_doc.get("advertise"),
                          "profile": state.get("profile"), "observed_at": state.get("observed_at"),
                          "gpus": state.get("gpus", []), "running": running, "leases": len(by_node[name]),
                          "services": state.get("services", {})})
        if self.node not in view.nodes:
            nodes.append({"node": self.node, "alive": False, "url": self.url, "advertise": self.advertise,
                          "profile": None, "observed_at": None, "gpus": [], "running": [], "leases": 0,
                          "services": {}})
        placements = [{"id": name, **{k: v for k, v in kv.json().items() if k in ("service", "model", "node", "tier",
                                                                                    "by")}}
                      for name, kv in sorted(view.placements.items())]
        return {"cluster": self.cluster, "node": self.node, "revision": view.revision, "nodes": nodes,
                "services": where, "leases": by_node, "placements_in_flight": len(view.placements),
                "placements": placements,
                "counters": {"etcd_round_trips": self.etcd.round_trips, "placement_conflicts": self.conflicts,
                             "placements": self.placements, "placement_confirmations": self.placement_confirmations,
                             "confirmation_reads": self._confirmations.reads,
                             "local_placements": self.local_placements}}
