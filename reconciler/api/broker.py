"""Lease requests: the fast path, the demand → converge → wait path, and VRAM leases.

Like Ollama's scheduler handing out runners:

* **Fast path.** A running, healthy instance of the service that is
  compatible (the model matches, or the request names none, or the service's
  launch does not depend on a model; the GPU matches when one is asked for)
  and below its ``max_concurrent`` is leased at once, with no planning:
  ``store.grant_lease`` counts and inserts in one transaction (invariant 4).
  It runs between passes (holding the runtime's pass lock, which no await
  interrupts while it is free), so no pass can be deciding meanwhile to stop
  or restart that instance. A request for a service that already has
  requests queued joins the queue instead: first come, first served.
* **Queued path.** Otherwise the request becomes a *demand* in the store and
  the runtime is woken; its next pass plans the demand (a ``lease`` action,
  after the ``start``/``evict`` it needs) and grants it. The request waits
  for that grant (``lease.granted`` on the event bus) up to ``wait_s``; then
  the demand is withdrawn — between passes, so a pass cannot grant it behind
  our back — and the answer is 503 with the plan's pending reason. When the
  queue already holds :data:`QUEUE_PER_SLOT` × ``max_concurrent`` demands
  for the service, the answer is 429 at once. A caller that disconnects
  while waiting has its demand withdrawn (and a lease granted meanwhile
  released): nothing is left behind.
* **VRAM leases** (cf-orch ``POST /api/leases``): ``mb`` on one GPU for an
  application that runs its own process. Granted between passes when the
  GPU's free memory (:func:`.accounting.free_now`: the last observation, the
  last plan's starts, every lease held now) covers it; else refused. The
  planner counts the lease as a reservation, so it really blocks
  competing starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from reconciler.api.accounting import free_now
from reconciler.api.models import LeaseRequest
from reconciler.core.planner import model_bound
from reconciler.core.profile import Profile, Service
from reconciler.core.snapshot import Demand, Lease
from reconciler.core.world import World, capacity
from reconciler.errors import StoreError
from reconciler.runtime import Runtime

QUEUE_PER_SLOT = 4  # a service's queue holds this many demands per lease slot (max_concurrent)
VRAM_LEASES_PER_HOLDER = 1_000_000  # VRAM leases are bounded by memory, not by count
GRANT_WAIT_S = 60.0  # most a grant or a withdrawal waits for a pass in flight to finish
EXPIRY_CHECK_S = 0.2  # how often, while demands wait, to look for leases whose time is up
EXPIRY_RETRY_S = 1.0  # the pause after a store error in that check

log = logging.getLogger("reconciler.api")


class Refused(Exception):
    """A lease request that is not granted: the HTTP status and the reason in words."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Disconnected(Exception):
    """The caller went away while waiting; its demand was withdrawn."""


@dataclass(frozen=True)
class Granted:
    lease: Lease
    warm: bool  # the fast path: an instance was already running and compatible
    waited_s: float


Observer = Callable[[str, str, float], None]  # (path, result, seconds) → metrics


class Broker:
    """Grants leases for the API; one per server. :meth:`start` it in the event loop, :meth:`close` at the end."""

    def __init__(self, runtime: Runtime, profile: Callable[[], Profile], *, observe: Observer | None = None):
        self.runtime = runtime
        self._profile = profile
        self._observe = observe or (lambda path, result, seconds: None)
        self._grants: dict[str, asyncio.Event] = {}
        self._passed = asyncio.Event()
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.vram_priority: dict[str, int] = {}  # cf-orch's priority of a VRAM lease (not persisted)

    @property
    def store(self):
        return self.runtime.store

    def start(self) -> None:
        """Withdraw demands a previous server left (their callers went with it), then listen to the bus."""
        for demand in self.store.demands():
            self.store.remove_demand(demand.id)
            self.runtime.events.publish("demand.withdrawn", service=demand.service, demand=demand.id,
                                        holder=demand.holder, message="left by a previous run; its caller is gone")
        subscription = self.runtime.events.subscribe()
        self._tasks = [asyncio.ensure_future(self._listen(subscription)), asyncio.ensure_future(self._expiries())]

    async def close(self) -> None:
        """Answer every waiting request (503), stop listening."""
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _expiries(self) -> None:
        """While demands wait, wake the loop when a lease expires: its pass releases it and grants theirs.

        A store error (a locked or unreadable database) is logged and announced, and the
        check goes on after :data:`EXPIRY_RETRY_S`: it must not end silently."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            try:
                if not self.store.demands():
                    continue
                now = self.runtime.clock()
                ends = [lease.expires_at for lease in self.store.leases() if lease.expires_at is not None]
                if any(end <= now for end in ends):
                    self.runtime.wake()
            except StoreError as exc:
                message = f"lease expiry check failed ({exc}); retrying in {EXPIRY_RETRY_S:g} s"
                log.warning("%s", message)
                self.runtime.events.announce("broker.error", message=message)  # not recorded: the store fails
                await asyncio.sleep(EXPIRY_RETRY_S)

    async def _listen(self, subscription) -> None:
        async with subscription:
            async for event in subscription:
                kind = event.get("kind")
                if kind == "lease.granted":
                    waiter = self._grants.get(event.get("lease"))
                    if waiter is not None:
                        waiter.set()
                elif kind == "pass":
                    passed, self._passed = self._passed, asyncio.Event()
                    passed.set()

    # --- service leases ---------------------------------------------------------------

    def service(self, name: str) -> Service:
        profile = self._profile()
        spec = profile.services.get(name)
        if spec is None:
            known = ", ".join(sorted(profile.services)) or "none"
            raise Refused(404, f"unknown service {name!r}: profile {profile.name!r} has {known}")
        return spec

    async def lease(
        self,
        request: LeaseRequest,
        *,
        disconnected: Callable[[], Awaitable[object]] | None = None,
        fall_through: bool = False,
    ) -> Granted:
        """Grant ``request`` or raise :class:`Refused` / :class:`Disconnected`.

        ``fall_through``: give up as soon as a pass has planned the demand as
        pending, or its start is backing off (cf-orch's allocate tries the next
        model candidate then, and answers 503 at once when none is left).
        ``disconnected()``: an awaitable that finishes when the caller goes away.
        """
        began = time.monotonic()
        spec = self.service(request.service)
        lease = await self._fast(request, spec)
        if lease is not None:
            self._observe("fast", "granted", time.monotonic() - began)
            return Granted(lease, True, time.monotonic() - began)
        queued = len(self.store.demands(request.service))
        limit = QUEUE_PER_SLOT * capacity(spec)
        if queued >= limit:
            self._observe("queued", "queue_full", time.monotonic() - began)
            raise Refused(429, f"{request.service}: {queued} requests already wait for it (its queue holds "
                               f"{limit}: {QUEUE_PER_SLOT} × max_concurrent {capacity(spec)}); retry later")
        demand = Demand(
            id=str(uuid.uuid4()), service=request.service, holder=request.holder, model=request.model,
            gpu=request.gpu, requested_at=self.runtime.clock(), ttl_s=request.ttl_s,
        )
        self._grants[demand.id] = asyncio.Event()
        try:
            self.store.add_demand(demand)
            self.runtime.events.publish("demand.added", service=demand.service, demand=demand.id,
                                        holder=demand.holder, model=demand.model)
            self.runtime.wake()
            lease = await self._wait(demand, request.wait_s, disconnected, fall_through)
        except Refused as refused:
            self._observe("queued", "timeout" if refused.status == 503 else "refused", time.monotonic() - began)
            raise
        except Disconnected:
            self._observe("queued", "disconnected", time.monotonic() - began)
            raise
        except BaseException:  # cancelled (the server stops): leave nothing behind, as well as we can now
            self._forget(demand.id)
            raise
        finally:
            self._grants.pop(demand.id, None)
        self._observe("queued", "granted", time.monotonic() - began)
        return Granted(lease, False, time.monotonic() - began)

    async def _fast(self, request: LeaseRequest, spec: Service) -> Lease | None:
        if spec.managed is None or self.runtime.last_snapshot is None or self._closing.is_set():
            return None
        async with self.runtime.exclusive():
            store, snapshot = self.store, self.runtime.last_snapshot
            instance = store.get_instance(request.service)
            if instance is None or instance.state != "running" or store.demands(request.service):
                return None
            world = World(self._profile(), snapshot)
            seen = world.instances.get(request.service)
            if seen is None or seen.pid != instance.pid or not world.healthy(request.service):
                return None
            if request.gpu is not None and instance.gpu != request.gpu:
                return None
            if model_bound(spec) and request.model is not None and request.model != instance.model:
                return None
            now = self.runtime.clock()
            lease = Lease(
                id=str(uuid.uuid4()), service=request.service, holder=request.holder, gpu=instance.gpu,
                model=instance.model if instance.model is not None else request.model,
                expires_at=now + timedelta(seconds=request.ttl_s),
            )
            if not store.grant_lease(lease, capacity(spec), now=now):
                return None
        self.runtime.events.publish("lease.granted", service=lease.service, lease=lease.id, holder=lease.holder,
                                    path="fast")
        return lease

    async def _wait(
        self, demand: Demand, wait_s: float, disconnected: Callable[[], Awaitable[object]] | None,
        fall_through: bool,
    ) -> Lease:
        deadline = time.monotonic() + wait_s
        granted = self._grants[demand.id]
        gone = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        try:
            while True:
                lease = self.lease_by_id(demand.id)
                if lease is not None:
                    return lease
                if granted.is_set():  # granted (its demand went with it) and already ended: nothing to wait for
                    raise Refused(503, f"lease {demand.id} was granted but ended (expired or released) before "
                                       f"it could be answered (ttl_s {demand.ttl_s} too short?)")
                verdict = self.plan_verdict(demand.id)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (fall_through and verdict is not None and (
                        verdict[0] == "pending" or self.backing_off(demand.service))):
                    break
                passed = self._passed
                waits = [asyncio.ensure_future(e.wait()) for e in (granted, passed, self._closing)]
                try:
                    await asyncio.wait([*waits, *([gone] if gone else [])], timeout=remaining,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in waits:
                        task.cancel()
                if gone is not None and gone.done():
                    lease = await self._withdraw(demand.id)
                    if lease is not None:
                        self.release(lease.id)
                    raise Disconnected()
                if self._closing.is_set():
                    await self._withdraw(demand.id)
                    raise Refused(503, "the reconciler is shutting down")
        finally:
            if gone is not None and not gone.done():
                gone.cancel()
        lease = await self._withdraw(demand.id)
        if lease is not None:  # granted while we were giving up: it is theirs
            return lease
        raise Refused(503, self.reason(demand.id, demand.service, wait_s))

    async def _withdraw(self, demand_id: str) -> Lease | None:
        """Remove the demand between passes; the lease, when a pass granted it after all."""
        try:
            await asyncio.wait_for(self.runtime.exclusive().acquire(), GRANT_WAIT_S)
        except asyncio.TimeoutError:
            self._forget(demand_id)
            return None
        try:
            removed = self.store.remove_demand(demand_id)
            lease = self.lease_by_id(demand_id)
        finally:
            self.runtime.exclusive().release()
        if removed is not None:
            self.runtime.events.publish("demand.withdrawn", service=removed.service, demand=demand_id,
                                        holder=removed.holder)
        return lease

    def _forget(self, demand_id: str) -> None:
        """Withdraw without waiting for a pass in flight (shutdown); a grant it makes expires with its TTL."""
        removed = self.store.remove_demand(demand_id)
        lease = self.lease_by_id(demand_id)
        if lease is not None:
            self.release(lease.id)
        if removed is not None:
            self.runtime.events.publish("demand.withdrawn", service=removed.service, demand=demand_id,
                                        holder=removed.holder)

    def plan_verdict(self, demand_id: str) -> tuple[str, str] | None:
        """What the last plan says about a demand: ("pending", reason), ("planned", reason) or None."""
        plan = self.runtime.last_plan
        if plan is None:
            return None
        for item in plan.pending:
            if item.demand == demand_id:
                return "pending", item.reason
        for action in plan.actions:
            if action.kind == "lease" and action.lease == demand_id:
                return "planned", action.reason
        return None

    def reason(self, demand_id: str, service: str, wait_s: float) -> str:
        verdict = self.plan_verdict(demand_id)
        if verdict is None:
            return f"not granted within wait_s {wait_s:g} s: no pass has planned it yet"
        kind, why = verdict
        if kind == "pending":
            return why
        return f"not granted within wait_s {wait_s:g} s; planned: {why}" + (
            f"; but {self.backing_off(service)}" if self.backing_off(service) else "")

    def backing_off(self, service: str) -> str | None:
        """Why the service's start is held back now (invariant 6), or None."""
        backoff = self.store.get_backoff(service)
        if not backoff.failures or backoff.next_attempt_at is None or backoff.next_attempt_at <= self.runtime.clock():
            return None
        return (f"{service} is backing off after {backoff.failures} failed start(s) "
                f"({backoff.last_error or 'no error recorded'})")

    # --- lookups, renewals, releases ----------------------------------------------------

    def lease_by_id(self, lease_id: str) -> Lease | None:
        return next((lease for lease in self.store.leases() if lease.id == lease_id), None)

    def renew(self, lease_id: str, ttl_s: float | None) -> Lease | None:
        expires = self.runtime.clock() + timedelta(seconds=ttl_s) if ttl_s else None
        lease = self.store.renew_lease(lease_id, expires)
        if lease is not None:
            self.runtime.events.publish("lease.renewed", service=lease.service, lease=lease.id,
                                        expires_at=expires.isoformat().replace("+00:00", "Z") if expires else None)
        return lease

    def release(self, lease_id: str) -> Lease | None:
        lease = self.store.release_lease(lease_id, self.runtime.clock())
        if lease is not None:
            self.vram_priority.pop(lease.id, None)
            self.runtime.events.publish("lease.released", service=lease.service, lease=lease.id,
                                        holder=lease.holder)
            if self.store.demands():  # a freed slot or freed memory: queued demands may be granted now
                self.runtime.wake()
        return lease

    # --- VRAM leases ------------------------------------------------------------------------

    def free_mb(self) -> dict[int, int]:
        """Per GPU, what a VRAM lease may take now ({} before the first observation)."""
        snapshot = self.runtime.last_snapshot
        if snapshot is None:
            return {}
        return free_now(self._profile(), snapshot, self.runtime.last_plan, self.store.leases(),
                        self.runtime.clock())

    async def vram_lease(self, gpu: int, mb: int, holder: str, priority: int, ttl_s: float) -> Lease:
        """``mb`` of GPU ``gpu`` for ``holder``'s own process; ``ttl_s`` 0 = until released."""
        snapshot = self.runtime.last_snapshot
        if snapshot is None:
            raise Refused(503, "Insufficient VRAM — the host has not been observed yet; retry in a moment")
        if snapshot.gpu(gpu) is None:
            known = ", ".join(str(g.index) for g in snapshot.gpus) or "none"
            raise Refused(422, f"Unknown gpu_id {gpu} on node {snapshot.node!r} (GPUs: {known})")
        try:
            await asyncio.wait_for(self.runtime.exclusive().acquire(), GRANT_WAIT_S)
        except asyncio.TimeoutError:
            raise Refused(503, "Insufficient VRAM — the reconciler is busy; retry in a moment") from None
        try:
            free = self.free_mb().get(gpu, 0)
            if free < mb:
                raise Refused(503, f"Insufficient VRAM — GPU {gpu} has {free} MB free, {mb} MB requested")
            now = self.runtime.clock()
            lease = Lease(id=str(uuid.uuid4()), kind="vram", service=holder, holder=holder, gpu=gpu, mb=mb,
                          expires_at=now + timedelta(seconds=ttl_s) if ttl_s > 0 else None)
            self.store.grant_lease(lease, VRAM_LEASES_PER_HOLDER, now=now)
        finally:
            self.runtime.exclusive().release()
        self.vram_priority[lease.id] = priority
        self.runtime.events.publish("lease.granted", service=holder, lease=lease.id, holder=holder,
                                    lease_kind="vram", gpu=gpu, mb=mb)
        return lease
