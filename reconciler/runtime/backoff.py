"""Backoff in the runtime: which starts wait, and which services are stalled (invariant 6).

A start (or restart) that fails — the process exits, never gets healthy, or
the driver cannot launch it — and a started instance that dies on its own
count one failure for the service. The next attempt waits 10 s, doubling up
to 5 min; ten minutes of health, or a different launch spec, start the count
over. From five consecutive failures on the service is *stalled*: still
retried at the capped interval, never hot-looped, and reported with its last
error.

:func:`hold_back` takes a plan and returns the actions to defer this pass: the
start/restart of every service whose next attempt is not due yet, everything
that (transitively) requires one, and evictions that only such actions
needed (nothing is evicted for a start that will not happen).
"""

from __future__ import annotations

from datetime import datetime

from reconciler.core.launch import launch_spec
from reconciler.core.plan import Action, Plan
from reconciler.core.profile import Profile
from reconciler.store.base import Backoff, BackoffPolicy, Store, spec_hash

BACKOFF_POLICY = BackoffPolicy(base_s=10, factor=2, max_s=300, reset_after_s=600, stall_after=5)


def action_spec_hash(profile: Profile, action: Action) -> str:
    """The spec hash of what a start/restart action would launch."""
    spec = profile.services[action.service]
    return spec_hash(launch_spec(action.service, spec, action.gpu, action.model))


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
        stamp = backoff.next_attempt_at.isoformat(timespec="seconds").replace("+00:00", "Z")
        parts.append(f"next attempt in {wait:.0f} s (at {stamp})")
    return "; ".join(parts)


def hold_back(plan: Plan, profile: Profile, store: Store, now: datetime) -> tuple[dict[str, str], dict[str, str]]:
    """(deferred action id → reason, stalled service → reason) for this pass."""
    deferred: dict[str, str] = {}
    stalled: dict[str, str] = {}
    for action in plan.actions:
        if action.kind not in ("start", "restart") or action.service not in profile.services:
            continue
        backoff = store.get_backoff(action.service, action_spec_hash(profile, action))
        if backoff.stalled or not backoff.may_attempt(now):
            stalled[action.service] = describe(backoff, now)
        if not backoff.may_attempt(now):
            deferred[action.id] = f"{action.service} is {describe(backoff, now)}"
    if not deferred:
        return deferred, stalled
    required_by: dict[str, set[str]] = {}
    for action in plan.actions:
        for required in action.requires:
            required_by.setdefault(required, set()).add(action.id)
    changed = True
    while changed:
        changed = False
        for action in plan.actions:
            if action.id in deferred:
                continue
            blocked = next((r for r in action.requires if r in deferred), None)
            if blocked is not None:
                deferred[action.id] = f"requires {blocked}, which is deferred"
                changed = True
            elif action.kind == "evict":
                users = required_by.get(action.id, set())
                needed = {u for u in users if not u.startswith("release:")}  # its own lease releases
                if needed and needed <= deferred.keys():
                    deferred[action.id] = f"only {', '.join(sorted(needed))} needed it, which is deferred"
                    changed = True
    return deferred, stalled
