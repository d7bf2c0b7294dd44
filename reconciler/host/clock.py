"""The host's clock: the real :class:`~reconciler.core.clock.Clock`.

``now()`` is the system's wall time in UTC, ``monotonic()`` the kernel's
monotonic clock, ``sleep()`` asyncio's. The command line makes one and hands
it down; everything below reads time through it (:mod:`reconciler.core.clock`
says why), and tests hand down the fakes of :mod:`reconciler.testing.clock`
instead.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime


class SystemClock:
    """Wall time, monotonic time and sleeping, as the host keeps them."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
