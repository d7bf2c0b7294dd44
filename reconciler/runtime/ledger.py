"""The lease ledger: granting, renewing, ending and expiring leases, and what that means for idleness.

Every lease operation of the runtime — a pass granting a demand, the leasing
service's warm grant and VRAM leases, a holder's release, a pass expiring the
leases whose time is up — goes through :class:`Ledger`, which keeps the
store's leases and the instances' idle times true together (DESIGN §3,
"Wanted"):

* a *service* lease granted makes its service's instance busy: its
  ``idle_since`` is cleared;
* when a service's last service lease ends — released, or expired at its
  ``expires_at`` — its instance is idle from that moment;
* a *VRAM* lease (cf-orch's bare reservation) never makes a service busy or
  idle.

Grants stay atomic against ``max_concurrent`` (the store counts and inserts
in one transaction, invariant 4). Times come from the caller (the pass's
``now``) or the runtime's clock.
"""

from __future__ import annotations

from datetime import datetime

from reconciler.core.clock import Clock
from reconciler.core.snapshot import Lease
from reconciler.store.base import Store


class Ledger:
    """Leases in the store, with the idle-time rule kept alongside."""

    def __init__(self, store: Store, clock: Clock):
        self.store = store
        self.clock = clock

    def grant(self, lease: Lease, max_concurrent: int, *, now: datetime, demand_id: str | None = None) -> bool:
        """Grant ``lease`` unless its service holds ``max_concurrent`` already (False: refused, nothing changed)."""
        granted = self.store.grant_lease(lease, max_concurrent, demand_id=demand_id, now=now)
        if granted and lease.kind == "service":
            self.store.set_idle_since(lease.service, None)
        return granted

    def renew(self, lease_id: str, expires_at: datetime | None) -> Lease | None:
        return self.store.renew_lease(lease_id, expires_at)

    def release(self, lease_id: str, now: datetime | None = None) -> Lease | None:
        """End a lease now; None when there is no such lease (it ended already)."""
        lease = self.store.release_lease(lease_id)
        if lease is not None and lease.kind == "service":
            self._ended(lease.service, now or self.clock.now())
        return lease

    def expire(self, now: datetime) -> list[Lease]:
        """End every lease whose time is up at ``now``; a service is idle from its last lease's end."""
        expired = self.store.expire_leases(now)
        ends: dict[str, datetime] = {}
        for lease in expired:
            if lease.kind == "service" and lease.expires_at is not None:
                ends[lease.service] = max(lease.expires_at, ends.get(lease.service, lease.expires_at))
        for service in sorted(ends):
            self._ended(service, ends[service])
        return expired

    def get(self, lease_id: str) -> Lease | None:
        return next((lease for lease in self.store.leases() if lease.id == lease_id), None)

    def _ended(self, service: str, when: datetime) -> None:
        if not any(lease.kind == "service" for lease in self.store.leases(service)):
            self.store.set_idle_since(service, when)
