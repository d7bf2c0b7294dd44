"""What waits on passes: the last pass's account, and the signals others wait for between passes.

The runtime acts in passes; the leasing service and the status document
answer between them. They read what the last pass saw and decided through
:class:`LastPass` (the snapshot it planned from and the plan it carried
out), and they wait for two things, each a typed signal rather than an event
string to listen for:

* :class:`PassSignal` — "a pass has finished": a waiter takes
  :meth:`PassSignal.current` and awaits it; every finished pass sets it and
  starts a new one, so no pass is missed between looking and waiting;
* :class:`GrantWatch` — "demand D was granted": a waiter registers the
  demand's id before it waits, the pass that grants the lease sets it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from reconciler.core.plan import DemandVerdict, Plan
from reconciler.core.snapshot import Lease, Snapshot


@dataclass(frozen=True)
class LastPass:
    """What the last pass observed (before it acted) and the plan it carried out."""

    snapshot: Snapshot
    plan: Plan

    def verdict(self, demand_id: str) -> DemandVerdict | None:
        """What the plan said about a demand: pending with a reason, planned, or nothing."""
        return self.plan.verdict(demand_id)


class PassSignal:
    """Set once each time a pass finishes."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        """The event the next finished pass sets (take it before deciding to wait)."""
        return self._event

    def finished(self) -> None:
        passed, self._event = self._event, asyncio.Event()
        passed.set()


class GrantWatch:
    """Demand id → an event set when a pass grants that demand's lease."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Event] = {}

    def watch(self, demand_id: str) -> asyncio.Event:
        return self._waiting.setdefault(demand_id, asyncio.Event())

    def forget(self, demand_id: str) -> None:
        self._waiting.pop(demand_id, None)

    def granted(self, lease: Lease) -> None:
        """A pass granted ``lease`` (its id is its demand's)."""
        waiter = self._waiting.get(lease.id)
        if waiter is not None:
            waiter.set()
