"""The state store interface: what the reconciler remembers between runs (DESIGN §5, §6).

The store holds the inventory of instances (one per service), granted leases,
waiting demands, per-service backoff records, the services an operator holds
stopped (``reconciler stop``; they stay stopped across restarts until
``reconciler start``), an append-only event log, and
intents (an action written down *before* it is taken, finished after), so
that a reconciler that crashed or restarted finds its own processes again and
keeps its leases (invariant 5). Lease grants are atomic against
``max_concurrent`` (invariant 4). SQLite implements it on one host
(:mod:`.sqlite`); a distributed store for clusters can implement the same
:class:`Store` protocol.

The store only persists. It decides nothing: what a failure does to a
backoff record (:mod:`reconciler.core.backoff`), when an instance becomes
idle (:mod:`reconciler.runtime.ledger`) are the callers' rules, handed in as
values or as a change to apply in one transaction. It has no clock of its
own either: the stamps it writes (when an intent began, when an instance
record changed) come from the clock it is opened with, the runtime's. All
times are timezone-aware UTC datetimes.

Nor does it report. What it has to say about itself — it failed (the file
named, what to do), it works again, its file was deleted or replaced while
open and it wrote its state back — it keeps as :class:`StoreNotice` values
until :meth:`Store.take_notices`; the runtime's event bus publishes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from reconciler.core.backoff import Backoff
from reconciler.core.snapshot import Demand, Instance, Lease


@dataclass(frozen=True)
class Event:
    id: int
    ts: datetime
    kind: str
    service: str | None
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hold:
    """A service an operator stopped (``reconciler stop``, ``down``): not wanted until ``reconciler start``."""

    service: str
    since: datetime
    reason: str  # who asked, in words: "reconciler stop", "reconciler down"


@dataclass(frozen=True)
class Intent:
    """An action written down before it was taken. ``outcome`` is None while it is open."""

    id: int
    action_id: str
    kind: str
    service: str | None
    data: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None = None
    outcome: str | None = None


@dataclass(frozen=True)
class StoreNotice:
    """Something the store has to say about itself, for the runtime to report (an event, a log line).

    ``failed``: it cannot be read or written (the first failure of a streak; ``message``
    names the file and what to do). ``recovered``: it works again. ``restored``: its
    file was deleted or replaced while open, and it wrote its state back.
    """

    kind: Literal["failed", "recovered", "restored"]
    message: str
    path: str


@dataclass(frozen=True)
class StoredState:
    """The persisted part of a snapshot (DESIGN §2: instances, leases, demands)."""

    instances: list[Instance]
    leases: list[Lease]
    demands: list[Demand]


@runtime_checkable
class Store(Protocol):
    """What the reconciler needs from its state store. Errors raise ``StoreError``."""

    # inventory: one instance per service
    def put_instance(self, instance: Instance) -> None: ...
    def get_instance(self, service: str) -> Instance | None: ...
    def instances(self) -> list[Instance]: ...
    def remove_instance(self, service: str) -> Instance | None: ...
    def set_idle_since(self, service: str, when: datetime | None) -> None: ...

    # leases (invariant 4) and demands
    def grant_lease(
        self, lease: Lease, max_concurrent: int, *, demand_id: str | None = None, now: datetime | None = None
    ) -> bool: ...
    def put_lease(self, lease: Lease, *, demand_id: str | None = None, now: datetime | None = None) -> None: ...
    def renew_lease(self, lease_id: str, expires_at: datetime | None) -> Lease | None: ...
    def release_lease(self, lease_id: str) -> bool: ...
    def expire_leases(self, now: datetime) -> list[Lease]: ...
    def leases(self, service: str | None = None) -> list[Lease]: ...
    def add_demand(self, demand: Demand) -> None: ...
    def remove_demand(self, demand_id: str) -> Demand | None: ...
    def demands(self, service: str | None = None) -> list[Demand]: ...
    def state(self) -> StoredState: ...

    # backoff records (invariant 6; the rules are reconciler.core.backoff's)
    def get_backoff(self, service: str) -> Backoff: ...
    def update_backoff(self, service: str, change: Callable[[Backoff], Backoff]) -> Backoff: ...
    def reset_backoff(self, service: str) -> None: ...

    # what an operator asked for: services held stopped until started again; facts for other commands
    def hold(self, service: str, reason: str) -> bool: ...
    def unhold(self, service: str) -> bool: ...
    def holds(self) -> dict[str, Hold]: ...
    def set_meta(self, key: str, value: str | None) -> None: ...
    def get_meta(self, key: str) -> str | None: ...

    # event log
    def record_event(
        self, kind: str, service: str | None = None, message: str = "",
        data: Mapping[str, Any] | None = None, *, ts: datetime | None = None,
    ) -> int: ...
    def record_events(self, events: Sequence[Event]) -> None: ...
    def last_event_id(self) -> int: ...
    def events(self, since_id: int = 0, limit: int = 100, service: str | None = None) -> list[Event]: ...

    # intents (invariant 5)
    def begin_intent(
        self, action_id: str, kind: str, service: str | None, data: Mapping[str, Any] | None = None
    ) -> int: ...
    def update_intent(self, intent_id: int, data: Mapping[str, Any]) -> Intent: ...
    def finish_intent(self, intent_id: int, outcome: str, data: Mapping[str, Any] | None = None) -> Intent: ...
    def open_intents(self) -> list[Intent]: ...
    def get_intent(self, intent_id: int) -> Intent | None: ...

    # what the store has to say about itself since the last call (failures, recoveries, a restored file)
    def take_notices(self) -> list[StoreNotice]: ...

    # many writes, one transaction (each write inside is undone alone when it fails; whole=True: all or nothing)
    def batch(self, *, whole: bool = False) -> AbstractContextManager[None]: ...

    def close(self) -> None: ...
