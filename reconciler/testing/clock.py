"""Clocks for tests: time that moves only when a test says so.

Everything in the reconciler reads time through one injected
:class:`~reconciler.core.clock.Clock`; these stand in for the host's:

* :class:`FakeClock` — wall and monotonic time both move only by
  :meth:`~FakeClock.advance`; :meth:`~FakeClock.sleep` advances them and yields
  to the event loop, so a wait of an hour takes no time at all. For logic that
  only waits (backoff, settle windows, health waits against a fake probe).
* :class:`SteppedClock` — like :class:`FakeClock`, but a sleep waits until a
  test advances the clock past its end: for "nothing happens before the
  window ends, then it does", decided by the test and not by how fast the
  machine is.
* :class:`ManualWallClock` — the wall (what is written down: lease expiry,
  backoff, idle times) moves only when told, while waits are real: for tests
  that drive real processes but judge time-based decisions exactly.
* :class:`ComposedClock` — a wall from one, monotonic time and sleep from
  another (a fake monotonic clock for health waits beside a manual wall).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

T0 = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)


class FakeClock:
    """Wall and monotonic time that move together, only when told (or slept on)."""

    def __init__(self, start: datetime = T0, monotonic_start: float = 1000.0):
        self._now = start
        self._mono = monotonic_start
        self.slept: list[float] = []  # every sleep asked for, in order

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


class SteppedClock(FakeClock):
    """A fake clock whose sleeps end only when :meth:`advance` moves time past them."""

    def __init__(self, start: datetime = T0, monotonic_start: float = 1000.0):
        super().__init__(start, monotonic_start)
        self._sleepers: list[tuple[float, float, asyncio.Future[None]]] = []  # (ends at, asked for, waiter)
        self._changed = asyncio.Event()

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        for end, _asked, waiter in list(self._sleepers):
            if end <= self._mono and not waiter.done():
                waiter.set_result(None)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._mono + max(0.0, seconds), seconds, waiter)
        self._sleepers.append(entry)
        self._changed.set()
        try:
            if seconds <= 0:
                await asyncio.sleep(0)
                return
            await waiter
        finally:
            self._sleepers.remove(entry)

    async def sleeping(self, seconds: float, timeout_s: float = 10.0) -> None:
        """Wait (really, at most ``timeout_s``) until someone sleeps ``seconds`` on this clock."""
        async def wait() -> None:
            while not any(asked == seconds and not w.done() for _end, asked, w in self._sleepers):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout_s)


class ManualWallClock:
    """Wall time that moves only by :meth:`advance`; monotonic time and sleep are the host's."""

    def __init__(self, start: datetime = T0):
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ComposedClock:
    """Wall time from ``wall``; monotonic time and sleep from the given callables."""

    def __init__(self, wall: Callable[[], datetime], monotonic: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]]):
        self._wall, self._monotonic, self._sleep = wall, monotonic, sleep

    def now(self) -> datetime:
        return self._wall()

    def monotonic(self) -> float:
        return self._monotonic()

    async def sleep(self, seconds: float) -> None:
        await self._sleep(seconds)
