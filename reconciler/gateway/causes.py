"""Which gateway requests caused a start, a model switch or an eviction — read from the plans.

A request that finds its model warm causes nothing. One that does not
becomes a demand, and a pass plans it: a ``lease`` action that requires a
``start`` (or a ``restart`` with another model: a switch), which may
require ``evict`` actions. :class:`Causes` watches every finished pass (the
runtime's :attr:`~reconciler.runtime.Runtime.passed` signal), and for each
``lease`` action of a gateway demand (its holder starts with ``gateway``)
collects what it requires, transitively, from the plan that pass carried
out. A start that several waiting requests need is the first one's doing
(the oldest demand): the others only waited for it.

A pass grants a demand while it runs — before the plan it carries out is
the last pass's — so the request that was granted says so
(:meth:`Causes.granted`, with a callback) and goes on to its upstream at
once; when that pass ends, the callback gets what the demand caused, for
its ``gateway.cold`` event and the per-model counts
(:mod:`reconciler.runtime.traffic`). A demand's entry goes then, or after
:data:`FORGET_AFTER_S` (a demand withdrawn because its client went away is
never granted).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from reconciler.core.plan import Action, Plan, action_id
from reconciler.core.snapshot import Snapshot
from reconciler.gateway.leases import HOLDER
from reconciler.runtime import Runtime

FORGET_AFTER_S = 900.0

log = logging.getLogger("reconciler.gateway")


@dataclass(frozen=True)
class Caused:
    """One action a request's demand caused."""

    kind: str  # start | switch | restart | evict
    service: str
    model: str | None
    action: str  # the plan action's id
    reason: str

    def words(self) -> str:
        if self.kind == "start":
            return f"started {self.service}" + (f" with {self.model}" if self.model else "")
        if self.kind == "switch":
            return f"switched {self.service} to {self.model}"
        if self.kind == "evict":
            return f"evicted {self.service}"
        return f"restarted {self.service}"


def caused_by(plan: Plan, snapshot: Snapshot, demand_id: str, taken: set[str]) -> list[Caused]:
    """The starts, switches, restarts and evictions the ``lease`` of ``demand_id`` requires in ``plan``
    (transitively), leaving out the action ids in ``taken`` (and adding the others to it)."""
    actions = {a.id: a for a in plan.actions}
    lease = actions.get(action_id("lease", demand_id))
    if lease is None:
        return []
    serving = {i.service: i.model for i in snapshot.instances}
    found: list[Caused] = []
    todo, seen = list(lease.requires), set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        action: Action | None = actions.get(current)
        if action is None:
            continue
        todo.extend(action.requires)
        if action.kind not in ("start", "restart", "evict") or current in taken:
            continue
        taken.add(current)
        kind: str = action.kind
        if kind == "restart" and action.model is not None and action.model != serving.get(action.service):
            kind = "switch"
        found.append(Caused(kind, action.service, action.model, action.id, action.reason))
    order = {"evict": 0, "start": 1, "switch": 1, "restart": 1}
    return sorted(found, key=lambda c: (order[c.kind], c.service))


class Causes:
    """What each gateway demand caused, from the passes that planned it; :meth:`start` it, :meth:`close` it."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._caused: dict[str, tuple[float, list[Caused]]] = {}  # demand id → (first seen, what it caused)
        self._granted: dict[str, Callable[[list[Caused]], None]] = {}  # granted, reported at the pass's end
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def granted(self, demand_id: str, then: Callable[[list[Caused]], None]) -> None:
        """The demand (the id of the lease it was granted as) was granted: ``then(what it caused)`` once the
        pass that granted it has ended."""
        self._granted[demand_id] = then

    async def _watch(self) -> None:
        while True:
            await self.runtime.passed.current().wait()
            last = self.runtime.last_pass()
            if last is not None:
                self.scan(last.plan, last.snapshot)
            for demand_id, then in list(self._granted.items()):
                del self._granted[demand_id]
                entry = self._caused.pop(demand_id, None)
                try:
                    then(entry[1] if entry is not None else [])
                except Exception:  # noqa: BLE001 - one bad callback must not end the watch
                    log.exception("gateway: reporting what demand %s caused failed", demand_id)

    def scan(self, plan: Plan, snapshot: Snapshot) -> None:
        """Record what the gateway demands of one pass's plan caused."""
        now = self.runtime.clock.monotonic()
        ours = sorted((d for d in snapshot.demands if d.holder.startswith(HOLDER)),
                      key=lambda d: (d.requested_at is None, d.requested_at, d.id))
        taken: set[str] = set()
        for demand in ours:
            found = caused_by(plan, snapshot, demand.id, taken)
            first, before = self._caused.get(demand.id, (now, []))
            known = {c.action for c in before}
            self._caused[demand.id] = (first, before + [c for c in found if c.action not in known])
        for demand_id, (first, _) in list(self._caused.items()):
            if now - first > FORGET_AFTER_S:
                del self._caused[demand_id]


__all__ = ["Caused", "Causes", "caused_by"]
