"""The runtime: observe → plan → apply, one pass at a time, with crash recovery.

A pass reads the inventory from the store, expires leases whose time is up,
observes the host, tidies the inventory against what it saw (dead instances
are pruned, finished starts promoted), plans, holds back the starts of
services that are backing off (and whatever needs them), and runs the rest
of the plan's ``requires`` DAG with the executor. Passes never overlap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from reconciler.core.plan import Plan
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot
from reconciler.host.gpu import GpuBackend
from reconciler.runtime.events import EventBus
from reconciler.runtime.report import PassReport
from reconciler.store.base import Store, utcnow as utc_now


class Runtime:
    def __init__(
        self,
        *,
        store: Store,
        gpu_backend: GpuBackend,
        state_dir: Path,
        node: str = "local",
        sim: bool = False,
        clock: Callable[[], datetime] = utc_now,
        events: EventBus | None = None,
        drivers=None,
    ):
        self.store = store
        self.gpu_backend = gpu_backend
        self.state_dir = Path(state_dir)
        self.node = node
        self.sim = sim
        self.clock = clock
        self.events = events or EventBus(store, clock=clock)
        self.drivers = drivers
        self.last_plan: Plan | None = None
        self.last_snapshot: Snapshot | None = None
        self._woken = asyncio.Event()

    async def recover(self) -> None:
        """Startup: resolve open intents, re-find our instances."""
        raise NotImplementedError

    async def reconcile(self, profile: Profile) -> PassReport:
        """One observe → plan → apply pass."""
        raise NotImplementedError

    async def converge(self, profile: Profile, timeout_s: float) -> PassReport:
        """Passes until no action is left to take now (pending may remain) or ``timeout_s`` passes."""
        raise NotImplementedError

    def wake(self) -> None:
        """Ask the loop for a pass soon."""
        self._woken.set()

    async def wait_woken(self, timeout_s: float | None = None) -> bool:
        """Wait until :meth:`wake` is called (True) or ``timeout_s`` passes (False); clears the request."""
        try:
            await asyncio.wait_for(self._woken.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        self._woken.clear()
        return True

    async def aclose(self) -> None:
        raise NotImplementedError
