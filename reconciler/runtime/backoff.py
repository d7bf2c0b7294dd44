"""Backoff in the runtime: which starts wait this pass, and which services are stalled (invariant 6).

The policy — how long a failing service waits, when it is stalled, what
resets the count — is :mod:`reconciler.core.backoff`'s; the records are the
store's. Here the runtime applies them to a plan:

:func:`hold_back` returns the actions to defer this pass: the start/restart of
every service whose next attempt is not due yet, everything that
(transitively) requires one, and evictions that only such actions needed
(nothing is evicted for a start that will not happen).
"""

from __future__ import annotations

from datetime import datetime

from reconciler.core.backoff import describe
from reconciler.core.launch import launch_digest, launch_spec
from reconciler.core.plan import Action, Plan
from reconciler.core.profile import Profile
from reconciler.store.base import Store


def action_spec_hash(profile: Profile, action: Action) -> str:
    """The launch digest of what a start/restart action would launch."""
    spec = profile.services[action.service]
    return launch_digest(launch_spec(action.service, spec, action.gpu_set or action.gpu, action.model))


def hold_back(plan: Plan, profile: Profile, store: Store, now: datetime) -> tuple[dict[str, str], dict[str, str]]:
    """(deferred action id → reason, stalled service → reason) for this pass."""
    deferred: dict[str, str] = {}
    stalled: dict[str, str] = {}
    for action in plan.actions:
        if action.kind not in ("start", "restart") or action.service not in profile.services:
            continue
        backoff = store.get_backoff(action.service).for_spec(action_spec_hash(profile, action))
        if backoff.stalled:  # only after the policy's number of failures; a backoff before that is not a stall
            stalled[action.service] = describe(backoff, now)
        if not backoff.may_attempt(now):
            deferred[action.id] = f"{action.service} is {describe(backoff, now)}"
    if not deferred:
        return deferred, stalled
    kinds = {action.id: action.kind for action in plan.actions}
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
                needed = {u for u in users if kinds.get(u) != "release"}  # its own lease releases
                if needed and needed <= deferred.keys():
                    deferred[action.id] = f"only {', '.join(sorted(needed))} needed it, which is deferred"
                    changed = True
    return deferred, stalled
