"""One plan action → what the host and the store should do about it.

:class:`Actuator` is the executor's handler for one pass: it knows the
profile and the snapshot the plan came from. ``start``/``restart``/``stop``/
``evict`` go through :class:`~.lifecycle.Lifecycle`; ``adopt``, ``lease`` and
``release`` only touch the store:

* adopt — an ``adopted`` instance: the listener's pid and create_time where
  the snapshot shows it, the GPU (or GPUs) the plan chose;
* lease — granted atomically against ``max_concurrent``, removing its demand
  in the same transaction (invariant 4); a refusal is a failure;
* release — a lease ends; or an adopted instance whose service left the
  profile is forgotten (its process keeps running, untouched).

Each handler returns one line for the report, or raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from reconciler.core.clock import iso_utc
from reconciler.core.compatibility import capacity
from reconciler.core.events import EventKind
from reconciler.core.plan import Action
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Instance, Lease, Snapshot
from reconciler.errors import DriverError, StoreError
from reconciler.runtime.executor import Deferred
from reconciler.runtime.ledger import Ledger
from reconciler.runtime.lifecycle import Lifecycle, who
from reconciler.store.base import Store


@dataclass
class Actuator:
    lifecycle: Lifecycle
    ledger: Ledger
    profile: Profile
    snapshot: Snapshot
    deadline: float | None = None  # a clock value (monotonic) after which starts stop waiting for health
    on_grant: Callable[[Lease], None] = lambda lease: None  # told of each lease this pass grants

    @property
    def store(self) -> Store:
        return self.lifecycle.store

    def now(self) -> datetime:
        return self.lifecycle.clock.now()

    async def __call__(self, action: Action) -> str:
        handler: Callable[[Action], Awaitable[str]] = getattr(self, f"_{action.kind}")
        return await handler(action)

    # --- processes -----------------------------------------------------------------

    async def _start(self, action: Action) -> str:
        spec = self.profile.services[action.service]
        return await self.lifecycle.start(action.service, spec, action.gpu_set or action.gpu, action.model, action.id,
                                          self.deadline)

    async def _restart(self, action: Action) -> str:
        stopped = await self._stop(action)
        started = await self._start(action)
        return f"{stopped}; then {started}"

    async def _stop(self, action: Action) -> str:
        instance = self.store.get_instance(action.service)
        if instance is None:
            return f"{action.service} is not in the inventory any more; nothing to stop"
        # no await between the check and the fence: a warm grant cannot slip in (see runtime.ledger)
        if not self.ledger.fence(action.service, self.snapshot.leases):
            raise Deferred(f"a lease was granted on {action.service} after the plan was made; "
                           f"the next pass decides again")
        try:
            return await self.lifecycle.stop(
                instance, self.profile.services.get(action.service), action.kind, action.id, action.mb,
                self.profile.eviction_timeout_s,
            )
        finally:
            self.ledger.unfence(action.service)

    _evict = _stop

    # --- bookkeeping -----------------------------------------------------------------

    async def _adopt(self, action: Action) -> str:
        spec = self.profile.services[action.service]
        port = spec.probe_port
        listener = next((p for p in self.snapshot.processes if port in p.listening), None)
        instance = Instance(
            service=action.service, gpu=action.gpu, gpus=action.gpus, origin="adopted",
            pid=listener.pid if listener else None, create_time=listener.create_time if listener else None,
            state="running", since=self.now(),
        )
        self.store.put_instance(instance)
        self.lifecycle.events.publish(EventKind.INSTANCE_ADOPTED, service=action.service,
                                      message=f"adopted {who(instance)}")
        return f"adopted {who(instance)} listening on port {port}; it is never signalled"

    async def _lease(self, action: Action) -> str:
        demand_id = action.lease
        assert demand_id is not None, f"{action.id} names no demand"
        demand = next((d for d in self.snapshot.demands if d.id == demand_id), None)
        if self.ledger.get(demand_id) is not None:
            return f"lease {demand_id} was already granted"
        if demand is None or not self.ledger.has_demand(demand_id):
            raise StoreError(f"demand {demand_id} is gone (withdrawn meanwhile)")
        now = self.now()
        spec = self.profile.services[action.service]
        lease = Lease(
            id=demand.id, service=action.service, holder=demand.holder, gpu=action.gpu, gpus=action.gpus,
            mb=action.mb or 0,
            model=action.model or demand.model,
            expires_at=now + timedelta(seconds=demand.ttl_s) if demand.ttl_s is not None else None,
        )
        if not self.ledger.grant(lease, capacity(spec), demand_id=demand.id, now=now):
            raise StoreError(f"lease {demand.id} refused: {action.service} already holds {capacity(spec)} "
                             f"lease(s) (max_concurrent)")
        self.lifecycle.events.publish(EventKind.LEASE_GRANTED, service=action.service, lease=lease.id,
                                      holder=lease.holder)
        self.on_grant(lease)
        until = f" until {iso_utc(lease.expires_at, timespec='seconds')}" if lease.expires_at else ""
        return f"granted lease {lease.id} on {action.service}{until}"

    async def _release(self, action: Action) -> str:
        if action.lease is not None:
            lease = self.ledger.release(action.lease, self.now())
            if lease is None:
                return f"lease {action.lease} had already ended"
            self.lifecycle.events.publish(EventKind.LEASE_RELEASED, service=action.service, lease=lease.id)
            return f"released lease {lease.id}"
        instance = self.store.get_instance(action.service)
        if instance is None:
            return f"{action.service} is not in the inventory any more"
        if instance.origin != "adopted":
            raise DriverError(f"{who(instance)} was started by us; a release never lets go of our own process")
        self.store.remove_instance(action.service)
        self.lifecycle.events.publish(EventKind.INSTANCE_RELEASED, service=action.service,
                                      message=f"released {who(instance)}")
        return f"forgot adopted {who(instance)}; it keeps running"
