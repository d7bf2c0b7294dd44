"""The lease ledger: leases and demands in memory, persisted write-through, with the idle-time rule.

Every lease operation of the runtime — a pass granting a demand, the leasing
service's warm grant and VRAM leases, a holder's release, a pass expiring the
leases whose time is up — goes through :class:`Ledger`. It is the single
source of truth for leases and demands while the process runs: the planner's
snapshot, the status document and the lease routes read them here, from
memory, and the store is where they are made durable.

**Write-through, one transaction per change.** A change is written to the
store first — the lease and the demand it satisfies, one statement — and
applied to memory only once that commit succeeded. So an answer given after a grant
is durable (the store runs SQLite's write-ahead log with ``synchronous =
NORMAL``: a commit reaches the operating system before it returns, so a
``kill -9`` right after it loses nothing; only a power cut can take the last
commits), and a store that fails leaves memory unchanged: the caller gets the
store's error, nothing was granted. Reads never touch the store.

**Grouped commits.** A request that waits for its answer — the lease
routes' grants and releases (:meth:`grant_durably`, :meth:`release_durably`)
— changes memory at once and adds its write to the group of the current
turn of the event loop; the group commits once, in one transaction, when the
turn's other callbacks have run (``call_soon``), and each request is answered
only after that commit: a ``kill -9`` right after a 200 loses nothing. Under
load, the requests that arrived together (fifty connections: a dozen per
turn) cost one commit, which is where a lease's time in SQLite went (a
commit writes the pages it changed to the write-ahead log; ten grants change
the same pages); alone, a request costs one more turn of the loop. A group
commits or fails whole: when a write or the commit fails, every change of
the group is undone in memory, newest first, and each of its requests gets
the store's error. Memory changes before the commit, so the group's
requests see each other's changes (a release's freed memory granted again
in the same turn); they are undone together, so nothing is ever left
counting memory that a failed release did not free. Every other change of
the ledger — a pass's grant, an expiry, a memory-only lease, a demand —
first commits the group (:meth:`settle`), so no change outside a group
builds on one that may yet be undone, and the store sees the changes in the
order memory did; so does :meth:`flush`, which a pass calls before it reads
the inventory. A failed group is its own requests' error only: the change
that merely committed it goes on, with memory as if the group never
happened. A request cancelled while its grant waits (the server stops) has
the grant released after the commit: nobody would learn its id.

**O(1) per request.** Leases are kept by id and by (service, kind); a grant
counts its service's leases by the length of that set, and only when the set
is full counts the unexpired ones precisely (expired leases only ever make
room). Each GPU's VRAM-lease megabytes are kept as a running sum
(:meth:`vram_mb`), so a VRAM lease's check does not walk the leases. The
earliest expiry is kept in a heap (:meth:`next_expiry`).

**Held in memory only.** A lease granted with ``durable=False`` — the
model gateway's implicit lease of one request — is never written to the
store: its holder is a connection of this very process, so it cannot outlive
it, and a reconciler that restarts should find it gone, not hold the
instance busy for its time to live. It counts, shows and is planned with
like any other (every reader reads memory); only its grant and release
cost no transaction.

**Idle times written behind.** The idle time a lease changes (busy at its
grant when the service held no lease, idle at its release when it was the
last) is written behind, within :data:`IDLE_FLUSH_S`, all waiting changes
in one transaction (:meth:`flush`) — and at once before a pass reads the
inventory (:meth:`~reconciler.runtime.Runtime.state` flushes first), before
any write of the store's own idle time for that service, and on close. This
holds for durable leases too: the idle time is bookkeeping for the idle
stop, which only looks at an instance that holds no lease, so a grant needs
only its lease row to be durable; and a service leased by one client after
another flips busy and idle per request, which written behind is one write
per window instead of two statements per request (a warm service lease
costs one statement, as a VRAM lease does). A crash loses at most that
window's idle times: the instance then counts as idle since its previous
idle time, or its start — idle longer than it was, so an idle stop may come
early after a crash, never late, and a later request starts it again.

**The idle-time rule** (DESIGN §3, "Wanted"): a *service* lease granted makes
its service's instance busy (``idle_since`` cleared); when a service's last
service lease ends — released, or expired at its ``expires_at`` — its
instance is idle from that moment; a *VRAM* lease (cf-orch's bare
reservation) never makes a service busy or idle.

**Fences.** A pass that stops, evicts or restarts an instance decided so from
the leases it saw. Grants happen between and during passes (the leasing
service takes no lock that a pass holds), so the executor, before it ends an
instance, *fences* its service (:meth:`fence`): from then until the action
is over no warm grant goes to it, and if a lease was granted on it since the
plan's snapshot the action is not taken (the next pass decides again, with
that lease in view). Both steps are synchronous — no await between checking
and fencing — so on the event loop's one thread they are atomic.

All of it runs on the event loop's thread; times come from the caller (the
pass's ``now``) or the runtime's clock.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from reconciler.core.clock import Clock
from reconciler.core.snapshot import Demand, Instance, Lease
from reconciler.errors import StoreError
from reconciler.store.base import Store

IDLE_FLUSH_S = 0.05  # the longest a memory-only lease's idle-time change waits to be written

log = logging.getLogger("reconciler.ledger")


_NOTHING = object()  # no idle time was waiting to be written


@dataclass
class _Group:
    """The writes of one turn of the event loop, committed together (:meth:`Ledger.settle`): each with the undo
    of its change in memory and the future its request waits on (its error, or None once durable)."""

    handle: asyncio.Handle  # the commit, scheduled after the turn's other callbacks
    writes: list[tuple[Callable[[], object], Callable[[], None], asyncio.Future[BaseException | None]]] = field(
        default_factory=list)


def _active(lease: Lease, now: datetime) -> bool:
    return lease.expires_at is None or lease.expires_at > now


class Ledger:
    """Leases and demands in memory, written through to the store; the idle-time rule kept alongside."""

    def __init__(self, store: Store, clock: Clock):
        self.store = store
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._by_service: dict[tuple[str, str], dict[str, Lease]] = {}
        self._demands: dict[str, Demand] = {}
        self._demand_came = asyncio.Event()  # set by add_demand (:meth:`demand_waits`)
        self._vram: dict[int, int] = {}
        self._expiries: list[tuple[datetime, str]] = []
        self._fenced: set[str] = set()
        self._memory_only: set[str] = set()  # leases never written to the store (durable=False)
        self._idle_due: dict[str, datetime | None] = {}  # service → idle time still to write (None: busy)
        self._flushing: asyncio.TimerHandle | None = None
        self._group: _Group | None = None  # this turn's writes to commit together (see the module text)
        self.bookings = 0  # changes with every change to a lease that is not a VRAM lease (free-memory caches)
        state = store.state()  # the store's leases and demands at start: from here on, memory is the truth
        for lease in state.leases:
            self._add(lease)
        self._demands = {d.id: d for d in state.demands}

    # --- reads ---------------------------------------------------------------------------

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def leases(self, service: str | None = None) -> list[Lease]:
        """Leases held (expired ones too, until a pass ends them), oldest first."""
        if service is None:
            return list(self._leases.values())
        return [lease for lease in self._leases.values() if lease.service == service]

    def demands(self, service: str | None = None) -> list[Demand]:
        """Demands waiting, in the order they came."""
        if service is None:
            return list(self._demands.values())
        return [d for d in self._demands.values() if d.service == service]

    def memory_only(self, lease_id: str) -> bool:
        """Whether the lease is held in memory only (granted with ``durable=False``)."""
        return lease_id in self._memory_only

    def idle_since(self, instance: Instance) -> datetime | None:
        """The instance's idle time as it stands now: a change still to be written (see the module text) wins
        over the stored one. For readers that show it; a pass reads the store after :meth:`flush`."""
        return self._idle_due.get(instance.service, instance.idle_since)

    def has_demand(self, demand_id: str) -> bool:
        return demand_id in self._demands

    def waiting(self) -> bool:
        """Whether any demand waits."""
        return bool(self._demands)

    async def demand_waits(self) -> None:
        """Return once a demand waits (at once when one does): what watches for them sleeps meanwhile."""
        while not self._demands:
            self._demand_came.clear()
            await self._demand_came.wait()

    def queued(self, service: str) -> int:
        return sum(1 for d in self._demands.values() if d.service == service)

    def held(self, service: str, kind: str, now: datetime) -> int:
        """Unexpired leases of ``kind`` on ``service`` at ``now`` (O(1) unless some lease's time is up)."""
        same = self._by_service.get((service, kind), {})
        due = self.next_expiry()
        if due is None or due > now:
            return len(same)
        return sum(1 for lease in same.values() if _active(lease, now))

    def vram_mb(self) -> dict[int, int]:
        """GPU index → MB that VRAM leases hold (expired ones count until a pass ends them: conservative)."""
        return dict(self._vram)

    def next_expiry(self) -> datetime | None:
        """The earliest ``expires_at`` of a lease held, or None."""
        while self._expiries:
            when, lease_id = self._expiries[0]
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires_at == when:
                return when
            heapq.heappop(self._expiries)  # released or renewed since: a stale entry
        return None

    # --- fences --------------------------------------------------------------------------

    def fence(self, service: str, seen: Iterable[Lease]) -> bool:
        """Close ``service`` to new grants while an action ends its instance; False (and no fence) when a
        service lease not among ``seen`` (the plan's snapshot) was granted on it since."""
        known = {lease.id for lease in seen}
        if any(lid not in known for lid in self._by_service.get((service, "service"), {})):
            return False
        self._fenced.add(service)
        return True

    def unfence(self, service: str) -> None:
        self._fenced.discard(service)

    def fenced(self, service: str) -> bool:
        return service in self._fenced

    # --- changes -------------------------------------------------------------------------

    def grant(self, lease: Lease, max_concurrent: int, *, now: datetime, demand_id: str | None = None,
              durable: bool = True) -> bool:
        """Grant ``lease`` unless its service holds ``max_concurrent`` leases of its kind, or ``demand_id``
        was withdrawn (False: refused, nothing changed). Granting an id already held is a no-op (True).
        ``durable=False``: held in memory only (a service lease without a demand; see the module text)."""
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.settle()  # the turn's grouped writes first (see the module text)
        if lease.id in self._leases:
            return True
        if demand_id is not None and demand_id not in self._demands:
            return False
        if self.held(lease.service, lease.kind, now) >= max_concurrent:
            return False
        if not durable and (lease.kind != "service" or demand_id is not None):
            raise ValueError("only a service lease granted without a demand may be held in memory only")
        if durable:
            self.store.put_lease(lease, demand_id=demand_id, now=now)  # one statement, its own transaction
        else:
            self._memory_only.add(lease.id)
        if lease.kind == "service" and not self._by_service.get((lease.service, "service")):
            self._idle_later(lease.service, None)  # busy from now
        self._add(lease)
        if demand_id is not None:
            self._demands.pop(demand_id, None)
        return True

    async def grant_durably(self, lease: Lease, max_concurrent: int, *, now: datetime) -> bool:
        """:meth:`grant` (a lease without a demand), its write grouped with the others of this turn of the event
        loop (see the module text); returns once it is durable. A write that failed raises its
        :class:`~reconciler.errors.StoreError`, and the grant is undone."""
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if lease.id in self._leases:
            return True
        if self.held(lease.service, lease.kind, now) >= max_concurrent:
            return False
        was = self._idle_due.get(lease.service, _NOTHING)
        if lease.kind == "service" and not self._by_service.get((lease.service, "service")):
            self._idle_later(lease.service, None)
        self._add(lease)

        def undo() -> None:
            if lease.id in self._leases:
                self._remove(lease.id)
            self._restore_idle(lease.service, was)

        try:
            await self._grouped(lambda: self.store.put_lease(lease, now=now), undo)
        except asyncio.CancelledError:  # nobody will learn the lease's id (the server stops): leave nothing behind
            if lease.id in self._leases:
                try:
                    self.release(lease.id)  # (commits its group first: the store sees the grant, then this)
                except StoreError as exc:
                    log.warning("a lease granted to a request cancelled meanwhile could not be released (%s)", exc)
            raise
        return True

    async def release_durably(self, lease_id: str, now: datetime | None = None) -> Lease | None:
        """:meth:`release`, its write grouped with the others of this turn of the event loop; returns once it is
        durable. A write that failed raises its :class:`~reconciler.errors.StoreError`, and the lease is held
        again."""
        lease = self._leases.get(lease_id)
        if lease is None or lease_id in self._memory_only:
            return self.release(lease_id, now)
        was = self._idle_due.get(lease.service, _NOTHING)
        if lease.kind == "service" and len(self._by_service.get((lease.service, "service"), {})) == 1:
            self._idle_later(lease.service, now or self.clock.now())
        self._remove(lease_id)

        def undo() -> None:
            if lease_id not in self._leases:
                self._add(lease)
            self._restore_idle(lease.service, was)

        await self._grouped(lambda: self.store.release_lease(lease_id), undo)
        return lease

    def renew(self, lease_id: str, expires_at: datetime | None) -> Lease | None:
        """Move a lease's expiry; None when there is no such lease (it expired or was released)."""
        self.settle()
        if lease_id not in self._leases:
            return None
        lease: Lease | None
        if lease_id in self._memory_only:
            lease = self._leases[lease_id].model_copy(update={"expires_at": expires_at})
        else:
            lease = self.store.renew_lease(lease_id, expires_at)
        if lease is None:
            return None
        self._remove(lease_id)
        self._add(lease)
        return lease

    def release(self, lease_id: str, now: datetime | None = None) -> Lease | None:
        """End a lease now; None when there is no such lease (it ended already)."""
        self.settle()
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        idle = lease.kind == "service" and len(self._by_service.get((lease.service, "service"), {})) == 1
        if lease_id in self._memory_only:
            self._memory_only.discard(lease_id)
        else:
            self.store.release_lease(lease_id)
        if idle:
            self._idle_later(lease.service, now or self.clock.now())
        self._remove(lease_id)
        return lease

    def expire(self, now: datetime) -> list[Lease]:
        """End every lease whose time is up at ``now``; a service is idle from its last lease's end."""
        self.settle()
        due = self.next_expiry()
        if due is None or due > now:
            return []
        expired = sorted((lease for lease in self._leases.values()
                          if lease.expires_at is not None and lease.expires_at <= now),
                         key=lambda lease: (lease.expires_at, lease.id))
        ends: dict[str, datetime] = {}
        for lease in expired:
            if lease.kind == "service" and lease.expires_at is not None:
                ends[lease.service] = max(lease.expires_at, ends.get(lease.service, lease.expires_at))
        gone = {lease.id for lease in expired}
        idle = {service: when for service, when in ends.items()
                if all(lid in gone for lid in self._by_service.get((service, "service"), {}))}
        waiting = {service: self._idle_due.pop(service) for service in idle if service in self._idle_due}
        try:  # (those waiting are written now, in the same transaction)
            with self.store.batch():
                for lease in expired:
                    if lease.id not in self._memory_only:
                        self.store.release_lease(lease.id)
                for service in sorted(idle):
                    self.store.set_idle_since(service, idle[service])
        except BaseException:  # nothing expired: what waited to be written still waits (a grant's "busy")
            for service, when in waiting.items():
                self._idle_due.setdefault(service, when)
            raise
        for lease in expired:
            self._memory_only.discard(lease.id)
            self._remove(lease.id)
        return expired

    def add_demand(self, demand: Demand) -> None:
        self.settle()
        self.store.add_demand(demand)
        self._demands[demand.id] = demand
        self._demand_came.set()

    def remove_demand(self, demand_id: str) -> Demand | None:
        self.settle()
        if demand_id not in self._demands:
            return None
        self.store.remove_demand(demand_id)
        return self._demands.pop(demand_id)

    # --- idle times written behind (memory-only leases) ----------------------------------

    def _idle_later(self, service: str, when: datetime | None) -> None:
        self._idle_due[service] = when
        if self._flushing is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside an event loop: now
            self.flush()
            return
        self._flushing = loop.call_later(IDLE_FLUSH_S, self._flush_due)

    def _flush_due(self) -> None:
        self._flushing = None
        try:
            self.flush()
        except StoreError as exc:  # kept: the next change or the next pass (Runtime.state) writes them
            log.warning("writing idle times failed (%s); they are written again before the next pass", exc)

    def flush(self) -> None:
        """Write what waits: the grouped writes of this turn (:meth:`settle`), then the idle times, in one
        transaction (a store that fails keeps them for the next try)."""
        self.settle()
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        if not self._idle_due:
            return
        due, self._idle_due = self._idle_due, {}
        try:
            with self.store.batch():
                for service in sorted(due):
                    self.store.set_idle_since(service, due[service])
        except Exception:
            for service, when in due.items():
                self._idle_due.setdefault(service, when)
            raise

    def _restore_idle(self, service: str, was: object) -> None:
        """Put a service's idle time still to write back as it was before an undone change (``_NOTHING``: none
        was waiting)."""
        if was is None or isinstance(was, datetime):
            self._idle_due[service] = was
        else:
            self._idle_due.pop(service, None)

    # --- grouped commits -------------------------------------------------------------------

    async def _grouped(self, write: Callable[[], object], undo: Callable[[], None]) -> None:
        """Add ``write`` to this turn's group (opened, and its commit scheduled, by the first) and wait for the
        group's commit; raise the write's error, after ``undo``, when it failed."""
        group = self._group
        loop = asyncio.get_running_loop()
        if group is None:
            group = self._group = _Group(loop.call_soon(self._commit_due))
        done: asyncio.Future[BaseException | None] = loop.create_future()
        group.writes.append((write, undo, done))
        error = await done
        if error is not None:
            raise error

    def _commit_due(self) -> None:
        self.settle()

    def settle(self) -> None:
        """Commit this turn's grouped writes now, in one transaction. All or nothing: when a write or the commit
        fails, every change of the group is undone in memory, newest first, and each of its requests gets the
        error. Every other change of the ledger calls this first, so no change outside a group ever builds on one
        that may yet be undone, and the store sees changes in the order memory did. The group's error is its own
        requests': it is not raised to the caller that merely settled it (a memory-only release, a renewal, a
        pass), which goes on with memory as if the group never happened."""
        group, self._group = self._group, None
        if group is None:
            return
        group.handle.cancel()
        try:
            with self.store.batch(whole=True):
                for write, _, _ in group.writes:
                    write()
        except BaseException as exc:  # a StoreError, or anything else (a bug): never a request left waiting
            try:
                for _, undo, _ in reversed(group.writes):
                    undo()
            finally:
                self._answer(group, exc)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, StoreError):
                log.warning("a group of lease writes could not be committed (%s); each request was refused", exc)
            else:
                log.error("a group of lease writes failed; each request was refused", exc_info=exc)
            return
        self._answer(group, None)

    @staticmethod
    def _answer(group: _Group, error: BaseException | None) -> None:
        for _, _, done in group.writes:
            if not done.done():  # (a request cancelled meanwhile: the server stops)
                done.set_result(error)

    # --- memory ---------------------------------------------------------------------------

    def _add(self, lease: Lease) -> None:
        self._leases[lease.id] = lease
        self._by_service.setdefault((lease.service, lease.kind), {})[lease.id] = lease
        if lease.kind == "vram" and lease.gpu is not None:
            self._vram[lease.gpu] = self._vram.get(lease.gpu, 0) + lease.mb
        else:
            self.bookings += 1
        if lease.expires_at is not None:
            heapq.heappush(self._expiries, (lease.expires_at, lease.id))

    def _remove(self, lease_id: str) -> None:
        lease = self._leases.pop(lease_id)
        key = (lease.service, lease.kind)
        same = self._by_service[key]
        del same[lease_id]
        if not same:
            del self._by_service[key]
        if lease.kind == "vram" and lease.gpu is not None:
            self._vram[lease.gpu] -= lease.mb
        else:
            self.bookings += 1
