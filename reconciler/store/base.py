"""The state store interface: what the reconciler remembers between runs (DESIGN §5, §6).

The store holds the inventory of instances (one per service), granted leases,
waiting demands, per-service backoff, an append-only event log, and intents
(an action written down *before* it is taken, finished after), so that a
reconciler that crashed or restarted finds its own processes again and keeps
its leases (invariant 5). Lease grants are atomic against ``max_concurrent``
(invariant 4). SQLite implements it on one host (:mod:`.sqlite`); a distributed
store for clusters can implement the same :class:`Store` protocol later.

All times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, runtime_checkable

from reconciler.core.snapshot import Demand, Instance, Launch, Lease


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def spec_hash(launch: Launch | None) -> str:
    """A stable digest of a launch spec; a different spec resets the backoff."""
    data = launch.model_dump(mode="json") if launch is not None else None
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Event:
    id: int
    ts: datetime
    kind: str
    service: str | None
    message: str
    data: dict[str, Any] = field(default_factory=dict)


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
class BackoffPolicy:
    """Exponential, capped backoff (invariant 6).

    After the n-th consecutive failure the next attempt waits
    ``min(base_s * factor**(n-1), max_s)``; from ``stall_after`` failures on the
    service is reported as stalled. A service that stayed healthy for
    ``reset_after_s`` starts counting from zero again.
    """

    base_s: float = 5.0
    factor: float = 2.0
    max_s: float = 300.0
    stall_after: int = 5
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> timedelta:
        if failures <= 0:
            return timedelta(0)
        return timedelta(seconds=min(self.base_s * self.factor ** (failures - 1), self.max_s))


@dataclass(frozen=True)
class Backoff:
    service: str
    failures: int = 0
    next_attempt_at: datetime | None = None
    stalled: bool = False
    last_error: str | None = None
    spec_hash: str | None = None
    healthy_since: datetime | None = None

    def may_attempt(self, now: datetime) -> bool:
        return self.next_attempt_at is None or now >= self.next_attempt_at


def after_failure(old: Backoff, error: str, spec_hash: str, now: datetime, policy: BackoffPolicy) -> Backoff:
    """The backoff after one more failure: a changed spec or a long healthy spell counts from zero."""
    failures = old.failures
    if old.spec_hash != spec_hash:
        failures = 0
    elif old.healthy_since and (now - old.healthy_since).total_seconds() >= policy.reset_after_s:
        failures = 0
    failures += 1
    return Backoff(
        old.service, failures, now + policy.delay(failures), failures >= policy.stall_after, error, spec_hash, None
    )


def after_healthy(old: Backoff, spec_hash: str, now: datetime, policy: BackoffPolicy) -> Backoff:
    """The backoff after a healthy observation; ``reset_after_s`` of health clears the count."""
    if old.spec_hash != spec_hash:
        old = Backoff(old.service, spec_hash=spec_hash)
    since = old.healthy_since or now
    if (now - since).total_seconds() >= policy.reset_after_s:
        return Backoff(old.service, 0, None, False, old.last_error, spec_hash, since)
    return replace(old, spec_hash=spec_hash, healthy_since=since)


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

    # leases (invariant 4) and demands
    def grant_lease(
        self, lease: Lease, max_concurrent: int, *, demand_id: str | None = None, now: datetime | None = None
    ) -> bool: ...
    def renew_lease(self, lease_id: str, expires_at: datetime | None) -> Lease | None: ...
    def release_lease(self, lease_id: str, now: datetime | None = None) -> Lease | None: ...
    def expire_leases(self, now: datetime) -> list[Lease]: ...
    def leases(self, service: str | None = None) -> list[Lease]: ...
    def add_demand(self, demand: Demand) -> None: ...
    def remove_demand(self, demand_id: str) -> Demand | None: ...
    def demands(self, service: str | None = None) -> list[Demand]: ...
    def state(self) -> StoredState: ...

    # backoff (invariant 6)
    def get_backoff(self, service: str, spec_hash: str | None = None) -> Backoff: ...
    def record_failure(
        self, service: str, error: str, spec_hash: str, now: datetime, policy: BackoffPolicy = ...
    ) -> Backoff: ...
    def record_healthy(self, service: str, spec_hash: str, now: datetime, policy: BackoffPolicy = ...) -> Backoff: ...
    def reset_backoff(self, service: str) -> None: ...

    # event log
    def record_event(
        self, kind: str, service: str | None = None, message: str = "",
        data: Mapping[str, Any] | None = None, ts: datetime | None = None,
    ) -> int: ...
    def events(self, since_id: int = 0, limit: int = 100, service: str | None = None) -> list[Event]: ...

    # intents (invariant 5)
    def begin_intent(self, action_id: str, kind: str, service: str | None, data: Mapping[str, Any] | None = None) -> int: ...
    def update_intent(self, intent_id: int, data: Mapping[str, Any]) -> Intent: ...
    def finish_intent(self, intent_id: int, outcome: str, data: Mapping[str, Any] | None = None) -> Intent: ...
    def open_intents(self) -> list[Intent]: ...
    def get_intent(self, intent_id: int) -> Intent | None: ...

    def close(self) -> None: ...
