"""The leasing service: the warm path, the demand → converge → wait path, and VRAM leases.

Like Ollama's scheduler handing out runners:

* **Warm path.** A running, healthy instance of the service that can serve the
  request now (:func:`reconciler.core.compatibility.can_serve_now`: the model
  matches, or the request names none, or the service's launch does not
  depend on a model; the GPU matches when one is asked for; a lease slot is
  free) is leased at once, with no planning: the ledger counts and inserts in
  one transaction (invariant 4). It runs between passes (holding the
  runtime's :meth:`~reconciler.runtime.Runtime.exclusive` lock, which no await
  interrupts while it is free), so no pass can be deciding meanwhile to stop
  or restart that instance. A request for a service that already has
  requests queued joins the queue instead: first come, first served.
* **Queued path.** Otherwise the request becomes a *demand* in the store and
  the runtime is woken; its next pass plans the demand (a ``lease`` action,
  after the ``start``/``evict`` it needs) and grants it. The request waits
  for that grant (the runtime's :class:`~.passes.GrantWatch`) up to
  ``wait_s``; then the demand is withdrawn — between passes, so a pass cannot
  grant it behind our back — and the request is refused with the plan's
  pending reason. When the queue already holds :data:`QUEUE_PER_SLOT` ×
  ``max_concurrent`` demands for the service, it is refused at once. A caller
  that disconnects while waiting has its demand withdrawn (and a lease
  granted meanwhile released): nothing is left behind.
* **VRAM leases** (cf-orch ``POST /api/leases``): ``mb`` on one GPU for an
  application that runs its own process. Granted between passes when the
  GPU's free memory (:func:`reconciler.core.accounting.free_now`: the last
  observation, the last plan's starts, every lease held now) covers it; else
  refused. The planner counts the lease as a reservation, so it really blocks
  competing starts.

A request that is not granted raises :class:`~reconciler.errors.LeaseRefused`
whose :class:`~reconciler.errors.Refusal` says which way (unknown service,
queue full, cannot be met, closing…); the HTTP layer maps those to status
codes. A caller that went away raises :class:`~reconciler.errors.CallerGone`.
Every wait is measured on the runtime's clock, and everything the service
knows of the host it reads through the runtime's public interface
(:meth:`~reconciler.runtime.Runtime.last_pass`, its ledger and store).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from reconciler.core.accounting import free_explained, free_now
from reconciler.core.backoff import backing_off
from reconciler.core.clock import iso_utc
from reconciler.core.compatibility import can_serve_now, capacity
from reconciler.core.events import EventKind
from reconciler.core.launch import launch_changed
from reconciler.core.profile import Profile, Service
from reconciler.core.snapshot import Demand, Lease
from reconciler.core.world import World
from reconciler.errors import CallerGone, LeaseRefused, Refusal, StoreError
from reconciler.runtime.runtime import Runtime
from reconciler.store.base import Store

QUEUE_PER_SLOT = 4  # a service's queue holds this many demands per lease slot (max_concurrent)
VRAM_LEASES_PER_HOLDER = 1_000_000  # VRAM leases are bounded by memory, not by count
GRANT_WAIT_S = 60.0  # most a grant or a withdrawal waits for a pass in flight to finish
EXPIRY_CHECK_S = 0.2  # how often, while demands wait, to look for leases whose time is up
EXPIRY_RETRY_S = 1.0  # the pause after a store error in that check

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

    @property
    def store(self) -> Store:
        """The runtime's store."""
        return self.runtime.store

    def start(self) -> None:
        """Withdraw demands a previous server left (their callers went with it), then watch for expiries."""
        for demand in self.store.demands():
            self.store.remove_demand(demand.id)
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
        """While demands wait, wake the loop when a lease expires: its pass releases it and grants theirs.

        A store error (a locked or unreadable database) is logged and announced, and the
        check goes on after :data:`EXPIRY_RETRY_S`: it must not end silently."""
        while True:
            await self.clock.sleep(EXPIRY_CHECK_S)
            try:
                if not self.store.demands():
                    continue
                now = self.clock.now()
                ends = [lease.expires_at for lease in self.store.leases() if lease.expires_at is not None]
                if any(end <= now for end in ends):
                    self.runtime.wake()
            except StoreError as exc:
                message = f"lease expiry check failed ({exc}); retrying in {EXPIRY_RETRY_S:g} s"
                log.warning("%s", message)
                self.runtime.events.announce(EventKind.LEASING_ERROR, message=message)  # not recorded: the store fails
                await self.clock.sleep(EXPIRY_RETRY_S)

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
        queued = len(self.store.demands(request.service))
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
            self.store.add_demand(demand)
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
        async with self.runtime.exclusive():
            store, now = self.store, self.clock.now()
            instance = store.get_instance(request.service)
            if instance is None or instance.state != "running" or store.demands(request.service):
                return None
            if instance.restart is not None or launch_changed(request.service, spec, instance) is not None:
                return None  # it restarts (now, or once its leases end): new requests wait for the new one
            world = World(self._profile(), last.snapshot)
            seen = world.instances.get(request.service)
            if seen is None or seen.pid != instance.pid or not world.healthy(request.service):
                return None
            held = sum(1 for lease in store.leases(request.service)
                       if lease.kind == "service" and (lease.expires_at is None or lease.expires_at > now))
            if can_serve_now(spec, serving=instance.model, placed=instance.gpu_set, held=held, model=request.model,
                             gpu=request.gpu, installed=world.installed_models(request.service)) is not None:
                return None
            lease = Lease(
                id=str(uuid.uuid4()), service=request.service, holder=request.holder, gpu=instance.gpu,
                gpus=instance.gpus,
                model=instance.model if instance.model is not None else request.model,
                expires_at=now + timedelta(seconds=request.ttl_s) if request.ttl_s is not None else None,
            )
            if not self.ledger.grant(lease, capacity(spec), now=now):
                return None
        self.runtime.events.publish(EventKind.LEASE_GRANTED, service=lease.service, lease=lease.id,
                                    holder=lease.holder, path="fast")
        return lease

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
        """Remove the demand between passes; the lease, when a pass granted it after all."""
        try:
            await asyncio.wait_for(self.runtime.exclusive().acquire(), GRANT_WAIT_S)
        except TimeoutError:
            self._forget(demand_id)
            return None
        try:
            removed = self.store.remove_demand(demand_id)
            lease = self.lease_by_id(demand_id)
        finally:
            self.runtime.exclusive().release()
        if removed is not None:
            self.runtime.events.publish(EventKind.DEMAND_WITHDRAWN, service=removed.service, demand=demand_id,
                                        holder=removed.holder)
            self.runtime.wake()  # the plan (status, why) stops saying it waits at once, not at the next tick
        return lease

    def _forget(self, demand_id: str) -> None:
        """Withdraw without waiting for a pass in flight (shutdown); a grant it makes expires with its TTL."""
        removed = self.store.remove_demand(demand_id)
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
            self.runtime.events.publish(EventKind.LEASE_RENEWED, service=lease.service, lease=lease.id,
                                        expires_at=iso_utc(expires) if expires else None)
        return lease

    def release(self, lease_id: str) -> Lease | None:
        lease = self.ledger.release(lease_id, self.clock.now())
        if lease is not None:
            self.vram_priority.pop(lease.id, None)
            self.runtime.events.publish(EventKind.LEASE_RELEASED, service=lease.service, lease=lease.id,
                                        holder=lease.holder)
            if self.store.demands():  # a freed slot or freed memory: queued demands may be granted now
                self.runtime.wake()
        return lease

    # --- VRAM leases ------------------------------------------------------------------------

    def free_mb(self) -> dict[int, int]:
        """Per GPU, what a VRAM lease may take now ({} before the first observation)."""
        last = self.runtime.last_pass()
        if last is None:
            return {}
        return free_now(self._profile(), last.snapshot, last.plan, self.store.leases(), self.clock.now())

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
        try:
            await asyncio.wait_for(self.runtime.exclusive().acquire(), GRANT_WAIT_S)
        except TimeoutError:
            raise LeaseRefused(Refusal.BUSY, "Insufficient VRAM — the reconciler is busy; retry in a moment") from None
        try:
            free = self.free_mb().get(gpu, 0)
            if free < mb:
                _, held = free_explained(self._profile(), snapshot, last.plan, self.store.leases(), self.clock.now(),
                                         gpu)
                raise LeaseRefused(Refusal.NO_VRAM, f"Insufficient VRAM — GPU {gpu} has {free} MB free, {mb} MB "
                                                    f"requested" + (f" ({', '.join(held)})" if held else ""))
            now = self.clock.now()
            lease = Lease(id=str(uuid.uuid4()), kind="vram", service=holder, holder=holder, gpu=gpu, mb=mb,
                          expires_at=now + timedelta(seconds=ttl_s) if ttl_s > 0 else None)
            self.ledger.grant(lease, VRAM_LEASES_PER_HOLDER, now=now)
        finally:
            self.runtime.exclusive().release()
        self.vram_priority[lease.id] = priority
        self.runtime.events.publish(EventKind.LEASE_GRANTED, service=holder, lease=lease.id, holder=holder,
                                    lease_kind="vram", gpu=gpu, mb=mb)
        return lease
