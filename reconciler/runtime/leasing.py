"""The leasing service: the warm path, the demand → converge → wait path, and VRAM leases.

Like Ollama's scheduler handing out runners:

* **Warm path.** A running, healthy instance of the service that can serve the
  request now (:func:`reconciler.core.compatibility.can_serve_now`: the model
  matches, or the request names none, or the service's launch does not
  depend on a model; the GPU matches when one is asked for; a lease slot is
  free) is leased at once, with no planning: the ledger counts in memory
  and writes the lease in one transaction (invariant 4), shared with the
  other grants and releases of the same turn of the event loop and
  committed before the answer (:mod:`.ledger`, "Grouped commits"). It
  takes no lock
  and waits for no pass: a pass in flight that is about to stop, evict or
  restart that instance *fences* it first (:mod:`.ledger`), and a grant
  made after that pass's plan makes the pass leave the instance alone. A
  request for a service that already has requests queued joins the queue
  instead: first come, first served.
* **Queued path.** Otherwise the request becomes a *demand* in the store and
  the runtime is woken; its next pass plans the demand (a ``lease`` action,
  after the ``start``/``evict`` it needs) and grants it. The request waits
  for that grant (the runtime's :class:`~.passes.GrantWatch`) up to
  ``wait_s``; then the demand is withdrawn (a pass grants a demand only
  while the ledger still holds it, so a withdrawal and a grant cannot both
  happen) and the request is refused with the plan's pending reason. When
  the queue already holds :data:`QUEUE_PER_SLOT` × ``max_concurrent``
  demands for the service, it is refused at once. A caller that disconnects
  while waiting has its demand withdrawn (and a lease granted meanwhile
  released): nothing is left behind.
* **VRAM leases** (cf-orch ``POST /api/leases``): ``mb`` on one GPU for an
  application that runs its own process. Granted when the GPU's free memory
  covers it (:func:`reconciler.core.accounting.headroom`: the last
  observation, the starts of the last plan *and of the plan being carried
  out*, every lease held now); else refused. The headroom is computed once
  per pass and change of service leases, and the VRAM leases' running sum
  per GPU is subtracted from it: a check costs the same with a thousand
  leases held as with none. The planner counts the lease as a reservation,
  so it really blocks competing starts; a pass plans with the leases held at
  the moment it plans, and publishes that plan before it awaits anything,
  so a VRAM lease either is in the plan's view or sees the plan's starts.

A request that is not granted raises :class:`~reconciler.errors.LeaseRefused`
whose :class:`~reconciler.errors.Refusal` says which way (unknown service,
queue full, cannot be met, closing…); the HTTP layer maps those to status
codes. A caller that went away raises :class:`~reconciler.errors.CallerGone`.
Every wait is measured on the runtime's clock, and everything the service
knows of the host it reads through the runtime's public interface
(:meth:`~reconciler.runtime.Runtime.last_pass`,
:meth:`~reconciler.runtime.Runtime.planning`, its ledger and store). No
request holds a lock, and none waits for a pass in flight.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from reconciler.core.accounting import Headroom, free_explained, headroom
from reconciler.core.backoff import backing_off
from reconciler.core.clock import iso_utc
from reconciler.core.compatibility import can_serve_now, capacity
from reconciler.core.events import EventKind
from reconciler.core.launch import launch_changed
from reconciler.core.plan import Plan
from reconciler.core.profile import Profile, Service
from reconciler.core.snapshot import Demand, Instance, Lease
from reconciler.core.world import World
from reconciler.errors import CallerGone, LeaseRefused, Refusal
from reconciler.runtime.passes import LastPass
from reconciler.runtime.runtime import Runtime
from reconciler.store.base import Store

QUEUE_PER_SLOT = 4  # a service's queue holds this many demands per lease slot (max_concurrent)
VRAM_LEASES_PER_HOLDER = 1_000_000  # VRAM leases are bounded by memory, not by count
EXPIRY_CHECK_S = 0.2  # how often, while demands wait, to look for leases whose time is up

log = logging.getLogger("reconciler.leasing")


@dataclass(frozen=True)
class LeaseRequest:
    """A request for a lease on a service of the profile."""

    service: str
    holder: str = ""
    model: str | None = None
    ttl_s: float | None = 300.0  # None: until released
    gpu: int | None = None
    wait_s: float = 120.0
    durable: bool = True  # False: a warm grant is held in memory only (the gateway's per-request lease; see .ledger)


@dataclass(frozen=True)
class Granted:
    lease: Lease
    warm: bool  # the warm path: an instance was already running and compatible
    waited_s: float


Observer = Callable[[str, str, float], None]  # (path, result, seconds) → metrics


class Leasing:
    """Grants leases; one per server. :meth:`start` it in the event loop, :meth:`close` at the end."""

    def __init__(self, runtime: Runtime, profile: Callable[[], Profile], *, observe: Observer | None = None):
        self.runtime = runtime
        self.clock = runtime.clock
        self.ledger = runtime.ledger
        self._profile = profile
        self._observe: Observer = observe or (lambda path, result, seconds: None)
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.vram_priority: dict[str, int] = {}  # cf-orch's priority of a VRAM lease (not persisted)
        self._world_of: LastPass | None = None
        self._world_cache: World | None = None
        self._rooms: _Rooms | None = None
        self._launches: dict[str, tuple[Service, Instance, bool]] = {}  # see _launch_changed

    @property
    def store(self) -> Store:
        """The runtime's store."""
        return self.runtime.store

    def start(self) -> None:
        """Withdraw demands a previous server left (their callers went with it), then watch for expiries."""
        for demand in self.ledger.demands():
            self.ledger.remove_demand(demand.id)
            self.runtime.events.publish(EventKind.DEMAND_WITHDRAWN, service=demand.service, demand=demand.id,
                                        holder=demand.holder, message="left by a previous run; its caller is gone")
        self._tasks = [asyncio.ensure_future(self._expiries())]

    async def close(self) -> None:
        """Answer every waiting request (refused: closing), stop watching."""
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _expiries(self) -> None:
        """While demands wait, wake the loop when a lease expires: its pass releases it and grants theirs
        (the ledger is in memory: the check reads no store and cannot fail). While none waits, nothing runs
        (it used to look five times a second for nothing, for as long as the daemon lived)."""
        while True:
            await self.ledger.demand_waits()
            await self.clock.sleep(EXPIRY_CHECK_S)
            if not self.ledger.waiting():
                continue
            due = self.ledger.next_expiry()
            if due is not None and due <= self.clock.now():
                self.runtime.wake()

    # --- service leases ---------------------------------------------------------------

    def service(self, name: str) -> Service:
        profile = self._profile()
        spec = profile.services.get(name)
        if spec is None:
            known = ", ".join(sorted(profile.services)) or "none"
            raise LeaseRefused(Refusal.UNKNOWN_SERVICE,
                               f"unknown service {name!r}: profile {profile.name!r} has {known}")
        return spec

    async def lease(
        self,
        request: LeaseRequest,
        *,
        disconnected: Callable[[], Awaitable[object]] | None = None,
        fall_through: bool = False,
    ) -> Granted:
        """Grant ``request`` or raise :class:`~reconciler.errors.LeaseRefused` / :class:`~reconciler.errors.CallerGone`.

        ``fall_through``: give up as soon as a pass has planned the demand as
        pending, or its start is backing off (cf-orch's allocate tries the next
        model candidate then, and answers 503 at once when none is left).
        ``disconnected()``: an awaitable that finishes when the caller goes away.
        """
        began = self.clock.monotonic()
        spec = self.service(request.service)
        lease = await self._fast(request, spec)
        if lease is not None:
            self._observe("fast", "granted", self.clock.monotonic() - began)
            return Granted(lease, True, self.clock.monotonic() - began)
        queued = self.ledger.queued(request.service)
        limit = QUEUE_PER_SLOT * capacity(spec)
        if queued >= limit:
            self._observe("queued", "queue_full", self.clock.monotonic() - began)
            raise LeaseRefused(Refusal.QUEUE_FULL,
                               f"{request.service}: {queued} requests already wait for it (its queue holds "
                               f"{limit}: {QUEUE_PER_SLOT} × max_concurrent {capacity(spec)}); retry later")
        demand = Demand(
            id=str(uuid.uuid4()), service=request.service, holder=request.holder, model=request.model,
            gpu=request.gpu, requested_at=self.clock.now(), ttl_s=request.ttl_s,
        )
        self.runtime.grants.watch(demand.id)
        try:
            self.ledger.add_demand(demand)
            self.runtime.events.publish(EventKind.DEMAND_ADDED, service=demand.service, demand=demand.id,
                                        holder=demand.holder, model=demand.model)
            self.runtime.wake()
            lease = await self._wait(demand, request.wait_s, disconnected, fall_through)
        except LeaseRefused as refused:
            timed_out = refused.refusal in (Refusal.CANNOT_BE_MET, Refusal.ENDED, Refusal.CLOSING)
            self._observe("queued", "timeout" if timed_out else "refused", self.clock.monotonic() - began)
            raise
        except CallerGone:
            self._observe("queued", "disconnected", self.clock.monotonic() - began)
            raise
        except BaseException:  # cancelled (the server stops): leave nothing behind, as well as we can now
            self._forget(demand.id)
            raise
        finally:
            self.runtime.grants.forget(demand.id)
        self._observe("queued", "granted", self.clock.monotonic() - began)
        return Granted(lease, False, self.clock.monotonic() - began)

    async def _fast(self, request: LeaseRequest, spec: Service) -> Lease | None:
        last = self.runtime.last_pass()
        if spec.managed is None or last is None or self._closing.is_set():
            return None
        ledger, now = self.ledger, self.clock.now()
        if ledger.fenced(request.service) or ledger.queued(request.service):
            return None  # an action is ending the instance, or others wait first
        instance = self.store.get_instance(request.service)
        if instance is None or instance.state != "running":
            return None
        if instance.restart is not None or self._launch_changed(request.service, spec, instance):
            return None  # it restarts (now, or once its leases end): new requests wait for the new one
        world = self._world(last)
        seen = world.instances.get(request.service)
        if seen is None or seen.pid != instance.pid or not world.healthy(request.service):
            return None
        held = ledger.held(request.service, "service", now)
        if can_serve_now(spec, serving=instance.model, placed=instance.gpu_set, held=held, model=request.model,
                         gpu=request.gpu, installed=world.installed_models(request.service)) is not None:
            return None
        lease = Lease(
            id=str(uuid.uuid4()), service=request.service, holder=request.holder, gpu=instance.gpu,
            gpus=instance.gpus,
            model=instance.model if instance.model is not None else request.model,
            expires_at=now + timedelta(seconds=request.ttl_s) if request.ttl_s is not None else None,
        )
        if request.durable:
            if not await ledger.grant_durably(lease, capacity(spec), now=now):
                return None
        elif not ledger.grant(lease, capacity(spec), now=now, durable=False):
            return None
        tell = self.runtime.events.publish if request.durable else self.runtime.events.announce  # see release()
        tell(EventKind.LEASE_GRANTED, service=lease.service, lease=lease.id, holder=lease.holder, path="fast")
        return lease

    def _launch_changed(self, name: str, spec: Service, instance: Instance) -> bool:
        """:func:`launch_changed`, remembered while the service's spec and the instance are the same objects (the
        store hands out the same frozen Instance while its row is unchanged): rendering the launch per request
        was a tenth of the warm path."""
        seen = self._launches.get(name)
        if seen is not None and seen[0] is spec and seen[1] is instance:
            return seen[2]
        changed = launch_changed(name, spec, instance) is not None
        self._launches[name] = (spec, instance, changed)
        return changed

    def _world(self, last: LastPass) -> World:
        """The last pass's world (built once per pass: it is read, never changed, here)."""
        if self._world_of is not last or self._world_cache is None:
            self._world_of, self._world_cache = last, World(self._profile(), last.snapshot)
        return self._world_cache

    async def _wait(
        self, demand: Demand, wait_s: float, disconnected: Callable[[], Awaitable[object]] | None,
        fall_through: bool,
    ) -> Lease:
        deadline = self.clock.monotonic() + wait_s
        granted = self.runtime.grants.watch(demand.id)
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            while True:
                lease = self.lease_by_id(demand.id)
                if lease is not None:
                    return lease
                if granted.is_set():  # granted (its demand went with it) and already ended: nothing to wait for
                    raise LeaseRefused(Refusal.ENDED,
                                       f"lease {demand.id} was granted but ended (expired or released) before "
                                       f"it could be answered (ttl_s {demand.ttl_s} too short?)")
                last = self.runtime.last_pass()
                verdict = last.verdict(demand.id) if last is not None else None
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0 or (verdict is not None and verdict.final) or (
                        fall_through and verdict is not None and (
                        verdict.state == "pending" or self.backing_off(demand.service))):
                    break  # (a final verdict: waiting would not help — answered at once)
                passed = self.runtime.passed.current()
                waits: list[asyncio.Future[Any]] = [
                    asyncio.ensure_future(e.wait()) for e in (granted, passed, self._closing)
                ]
                waits.append(asyncio.ensure_future(self.clock.sleep(remaining)))
                try:
                    await asyncio.wait([*waits, *([gone] if gone else [])], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
                if gone is not None and gone.done():
                    lease = await self._withdraw(demand.id)
                    if lease is not None:
                        self.release(lease.id)
                    raise CallerGone(f"the caller of demand {demand.id} went away")
                if self._closing.is_set():
                    await self._withdraw(demand.id)
                    raise LeaseRefused(Refusal.CLOSING, "the reconciler is shutting down")
        finally:
            if gone is not None and not gone.done():
                gone.cancel()
        lease = await self._withdraw(demand.id)
        if lease is not None:  # granted while we were giving up: it is theirs
            return lease
        raise LeaseRefused(Refusal.CANNOT_BE_MET, self.reason(demand.id, demand.service, wait_s))

    async def _withdraw(self, demand_id: str) -> Lease | None:
        """Remove the demand; the lease, when a pass granted it after all."""
        removed = self.ledger.remove_demand(demand_id)
        lease = self.lease_by_id(demand_id)
        if removed is not None:
            self.runtime.events.publish(EventKind.DEMAND_WITHDRAWN, service=removed.service, demand=demand_id,
                                        holder=removed.holder)
            self.runtime.wake()  # the plan (status, why) stops saying it waits at once, not at the next tick
        return lease

    def _forget(self, demand_id: str) -> None:
        """Withdraw at once (the server stops): the demand goes, and a lease granted for it is released."""
        removed = self.ledger.remove_demand(demand_id)
        lease = self.lease_by_id(demand_id)
        if lease is not None:
            self.release(lease.id)
        if removed is not None:
            self.runtime.events.publish(EventKind.DEMAND_WITHDRAWN, service=removed.service, demand=demand_id,
                                        holder=removed.holder)

    def reason(self, demand_id: str, service: str, wait_s: float) -> str:
        last = self.runtime.last_pass()
        verdict = last.verdict(demand_id) if last is not None else None
        if verdict is None:
            return f"not granted within wait_s {wait_s:g} s: no pass has planned it yet"
        if verdict.state == "pending":
            return verdict.reason
        held_back = self.backing_off(service)
        return f"not granted within wait_s {wait_s:g} s; planned: {verdict.reason}" + (
            f"; but {held_back}" if held_back else "")

    def backing_off(self, service: str) -> str | None:
        """Why the service's start is held back now (invariant 6), or None."""
        return backing_off(self.store.get_backoff(service), self.clock.now())

    # --- lookups, renewals, releases ----------------------------------------------------

    def lease_by_id(self, lease_id: str) -> Lease | None:
        return self.ledger.get(lease_id)

    def renew(self, lease_id: str, ttl_s: float | None) -> Lease | None:
        expires = self.clock.now() + timedelta(seconds=ttl_s) if ttl_s else None
        lease = self.ledger.renew(lease_id, expires)
        if lease is not None:
            tell = self.runtime.events.announce if self.ledger.memory_only(lease_id) else self.runtime.events.publish
            tell(EventKind.LEASE_RENEWED, service=lease.service, lease=lease.id,
                 expires_at=iso_utc(expires) if expires else None)
        return lease

    async def release_durably(self, lease_id: str) -> Lease | None:
        """:meth:`release` for a holder that waits for its answer: the write is grouped with the others of this
        turn of the event loop (:meth:`~.ledger.Ledger.release_durably`), and the release is durable when this
        returns."""
        durable = not self.ledger.memory_only(lease_id)  # (a memory-only one is released at once, not recorded)
        lease = await self.ledger.release_durably(lease_id, self.clock.now())
        if lease is not None:
            self._released(lease, durable=durable)
        return lease

    def release(self, lease_id: str) -> Lease | None:
        """End a lease now. A lease held in memory only (the gateway's, per request) has its grant and release
        announced to whoever listens (the dashboard, event streams, metrics) but not recorded: it is no more
        durable than the lease, and the event log would hold two rows per model request otherwise."""
        durable = not self.ledger.memory_only(lease_id)
        lease = self.ledger.release(lease_id, self.clock.now())
        if lease is not None:
            self._released(lease, durable=durable)
        return lease

    def _released(self, lease: Lease, *, durable: bool) -> None:
        self.vram_priority.pop(lease.id, None)
        tell = self.runtime.events.publish if durable else self.runtime.events.announce
        tell(EventKind.LEASE_RELEASED, service=lease.service, lease=lease.id, holder=lease.holder)
        if self.ledger.waiting():  # a freed slot or freed memory: queued demands may be granted now
            self.runtime.wake()

    # --- VRAM leases ------------------------------------------------------------------------

    def free_mb(self) -> dict[int, int]:
        """Per GPU, what a VRAM lease may take now ({} before the first observation)."""
        rooms = self._headroom()
        vram = self.ledger.vram_mb()
        return {index: room.free(vram.get(index, 0)) for index, room in rooms.items()}

    def _headroom(self) -> dict[int, Headroom]:
        """Each GPU's room but for VRAM leases, computed again only when what it depends on changed: the last
        pass, the plan in flight, the profile, the leases other than VRAM leases (see the module text)."""
        last = self.runtime.last_pass()
        if last is None:
            return {}
        planning, profile, bookings = self.runtime.planning(), self._profile(), self.ledger.bookings
        cached = self._rooms
        if cached is not None and cached.last is last and cached.planning is planning \
                and cached.profile is profile and cached.bookings == bookings:
            return cached.rooms
        leases = [lease for lease in self.ledger.leases() if lease.kind != "vram"]
        rooms = headroom(profile, last.snapshot, [last.plan, planning], leases, self.clock.now())
        self._rooms = _Rooms(last, planning, profile, bookings, rooms)
        return rooms

    async def vram_lease(self, gpu: int, mb: int, holder: str, priority: int, ttl_s: float) -> Lease:
        """``mb`` of GPU ``gpu`` for ``holder``'s own process; ``ttl_s`` 0 = until released."""
        last = self.runtime.last_pass()
        if last is None:
            raise LeaseRefused(Refusal.NOT_OBSERVED,
                               "Insufficient VRAM — the host has not been observed yet; retry in a moment")
        snapshot = last.snapshot
        if snapshot.gpu(gpu) is None:
            known = ", ".join(str(g.index) for g in snapshot.gpus) or "none"
            raise LeaseRefused(Refusal.UNKNOWN_GPU, f"Unknown gpu_id {gpu} on node {snapshot.node!r} (GPUs: {known})")
        now = self.clock.now()
        due = self.ledger.next_expiry()
        if due is not None and due <= now:
            self.runtime.wake()  # an expired lease counts until a pass ends it: a pass now
        room = self._headroom().get(gpu)
        free = room.free(self.ledger.vram_mb().get(gpu, 0)) if room is not None else 0
        if free < mb:  # (the refusal, rarer, says what holds the memory: worth a walk over the leases)
            _, held = free_explained(self._profile(), snapshot, last.plan, self.ledger.leases(), now, gpu)
            raise LeaseRefused(Refusal.NO_VRAM, f"Insufficient VRAM — GPU {gpu} has {free} MB free, {mb} MB "
                                                f"requested" + (f" ({', '.join(held)})" if held else ""))
        lease = Lease(id=str(uuid.uuid4()), kind="vram", service=holder, holder=holder, gpu=gpu, mb=mb,
                      expires_at=now + timedelta(seconds=ttl_s) if ttl_s > 0 else None)
        await self.ledger.grant_durably(lease, VRAM_LEASES_PER_HOLDER, now=now)
        self.vram_priority[lease.id] = priority
        self.runtime.events.publish(EventKind.LEASE_GRANTED, service=holder, lease=lease.id, holder=holder,
                                    lease_kind="vram", gpu=gpu, mb=mb)
        return lease


@dataclass(frozen=True)
class _Rooms:
    """:meth:`Leasing._headroom`'s cache: the rooms and what they were computed from."""

    last: LastPass
    planning: Plan | None
    profile: Profile
    bookings: int
    rooms: dict[int, Headroom]
