"""The wait for a freshly started instance to become healthy.

While an instance is starting it is probed often — every ``interval_s``
(100 ms), much faster than the running probe interval — at
``GET http://127.0.0.1:{host_port}{health_path}``, and its process is checked
on every tick: a start ends as soon as the probe answers 2xx (healthy), the
process exits (crashed), or ``start_timeout_s`` passes. A service without a
port is healthy once its process survived a short grace period (to catch an
immediate crash). Clock and sleep are injectable, so tests run on a fake clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from reconciler.host.probes import Prober, Target

START_PROBE_INTERVAL_S = 0.1
NO_PORT_GRACE_S = 0.5

Verdict = Literal["healthy", "exited", "timeout", "deadline"]


@dataclass(frozen=True)
class HealthResult:
    verdict: Verdict
    detail: str
    waited_s: float

    @property
    def healthy(self) -> bool:
        return self.verdict == "healthy"


@dataclass
class HealthWaiter:
    prober: Prober
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    interval_s: float = START_PROBE_INTERVAL_S
    grace_s: float = NO_PORT_GRACE_S

    async def wait(
        self,
        target: Target | None,
        alive: Callable[[], Awaitable[bool]],
        timeout_s: float,
        deadline: float | None = None,
    ) -> HealthResult:
        """Probe ``target`` (None: no port) until healthy, dead, ``timeout_s`` or the caller's ``deadline``.

        ``deadline`` is a ``clock()`` value after which the caller stops waiting
        although the start itself has not timed out (verdict ``deadline``).
        """
        began = self.clock()
        last = "no probe answered yet"
        while True:
            elapsed = self.clock() - began
            if target is not None:
                probe = await self.prober.probe(target)
                if probe.healthy:
                    return HealthResult("healthy", f"healthy after {elapsed:.1f} s ({target.url})", elapsed)
                last = probe.error or f"HTTP {probe.status}"
            if not await alive():
                return HealthResult("exited", f"exited after {elapsed:.1f} s before it was healthy", elapsed)
            if target is None and elapsed >= self.grace_s:
                return HealthResult("healthy", f"alive after {elapsed:.1f} s (no port to probe)", elapsed)
            if elapsed >= timeout_s:
                return HealthResult(
                    "timeout", f"not healthy within start_timeout_s {timeout_s:g} s (last probe: {last})", elapsed
                )
            if deadline is not None and self.clock() >= deadline:
                return HealthResult("deadline", f"still starting after {elapsed:.1f} s (last probe: {last})", elapsed)
            await self.sleep(self.interval_s)
