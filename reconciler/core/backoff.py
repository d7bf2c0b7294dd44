"""Backoff: how a failing service is retried, and when it is called stalled (invariant 6).

A start (or restart) that fails — the process exits, never gets healthy, or
cannot be launched — and a started instance that dies on its own or keeps
failing its probes count one failure for the service. After the n-th failure
in a row the next attempt waits ``min(base_s · factor^(n-1), max_s)``: 10 s,
20 s, 40 s … up to 5 min with :data:`DEFAULT_POLICY`. From ``stall_after``
failures on (5) the service is *stalled*: still retried at the capped
interval, never hot-looped, and reported with its last error. A service that
stays healthy for ``reset_after_s`` (10 min), or whose launch spec changes
(an edit is a fresh start), counts from zero again. Once it is healthy again
it is no longer stalled (the views drop the tag and the old error at once),
but its count stays until that healthy spell is long enough, so a service
that comes up and falls over again keeps backing off where it was.
``reconciler reset SERVICE`` deletes the record: tried at the next pass.

:class:`Backoff` is one service's record; :func:`after_failure` and
:func:`after_healthy` are the only ways it changes. The store keeps the
records (:mod:`reconciler.store`); the runtime decides with them
(:mod:`reconciler.runtime.backoff`). This module is the one place the policy
and its defaults are written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from reconciler.core.clock import iso_utc


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential, capped backoff; see the module docstring."""

    base_s: float = 10.0
    factor: float = 2.0
    max_s: float = 300.0
    stall_after: int = 5
    reset_after_s: float = 600.0

    def delay(self, failures: int) -> timedelta:
        if failures <= 0:
            return timedelta(0)
        return timedelta(seconds=min(self.base_s * self.factor ** (failures - 1), self.max_s))


DEFAULT_POLICY = BackoffPolicy()


@dataclass(frozen=True)
class Backoff:
    """One service's failure record."""

    service: str
    failures: int = 0
    next_attempt_at: datetime | None = None
    stalled: bool = False
    last_error: str | None = None
    spec_hash: str | None = None  # the launch digest the failures were counted for
    healthy_since: datetime | None = None

    def may_attempt(self, now: datetime) -> bool:
        return self.next_attempt_at is None or now >= self.next_attempt_at

    def for_spec(self, digest: str | None) -> Backoff:
        """This record as it applies to a launch with ``digest``: another spec starts afresh."""
        if digest is not None and self.spec_hash not in (None, digest):
            return Backoff(self.service, spec_hash=digest)
        return self


def after_failure(old: Backoff, error: str, digest: str, now: datetime, policy: BackoffPolicy) -> Backoff:
    """The record after one more failure: a changed spec or a long healthy spell counts from zero."""
    failures = old.failures
    if old.spec_hash != digest or (
        old.healthy_since and (now - old.healthy_since).total_seconds() >= policy.reset_after_s
    ):
        failures = 0
    failures += 1
    return Backoff(
        old.service, failures, now + policy.delay(failures), failures >= policy.stall_after, error, digest, None
    )


def after_healthy(old: Backoff, digest: str, now: datetime, policy: BackoffPolicy) -> Backoff:
    """The record after a healthy observation; ``reset_after_s`` of health clears the count."""
    if old.spec_hash != digest:
        old = Backoff(old.service, spec_hash=digest)
    since = old.healthy_since or now
    if (now - since).total_seconds() >= policy.reset_after_s:
        return Backoff(old.service, 0, None, False, old.last_error, digest, since)
    return replace(old, spec_hash=digest, healthy_since=since, stalled=False)  # healthy now: not stalled


def describe(backoff: Backoff, now: datetime) -> str:
    """Why a service waits, in words."""
    plural = "s" if backoff.failures != 1 else ""
    head = f"stalled after {backoff.failures} failure{plural}" if backoff.stalled else (
        f"backing off after {backoff.failures} failure{plural}")
    parts = [head]
    if backoff.last_error:
        parts.append(f"last: {backoff.last_error}")
    if backoff.next_attempt_at is not None and backoff.next_attempt_at > now:
        wait = (backoff.next_attempt_at - now).total_seconds()
        parts.append(f"next attempt in {wait:.0f} s (at {iso_utc(backoff.next_attempt_at, timespec='seconds')})")
    return "; ".join(parts)


def backing_off(backoff: Backoff, now: datetime) -> str | None:
    """Why the service's next start is held back now, or None when it may start."""
    if not backoff.failures or backoff.next_attempt_at is None or backoff.next_attempt_at <= now:
        return None
    return (f"{backoff.service} is backing off after {backoff.failures} failed start(s) "
            f"({backoff.last_error or 'no error recorded'})")
