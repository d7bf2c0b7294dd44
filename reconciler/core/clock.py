"""Time, declared once: the clock every decision reads, and how a time is written.

Whatever in the reconciler decides by time — the planner's ``now``, a lease's
expiry, backoff, idle stops, the wait for a start to become healthy, the
settle window of the profile watcher, the stamps the store keeps — reads one
:class:`Clock`, injected from the top (:mod:`reconciler.host.clock` has the
real one, :mod:`reconciler.testing.clock` the fakes). Nothing below the CLI
calls ``time.monotonic()``, ``datetime.now()`` or ``asyncio.sleep(n)`` on its
own, so a test can move time by hand and a timing test never waits on the
wall.

A clock answers three questions:

* :meth:`Clock.now` — the wall time, timezone-aware UTC: what is written down
  (a lease's ``expires_at``, an event's ``ts``, a backoff's next attempt);
* :meth:`Clock.monotonic` — seconds on a clock that never jumps: what
  measures waits and deadlines;
* :meth:`Clock.sleep` — wait that long on *this* clock (a fake clock moves
  itself instead of waiting).

Times are written as ISO 8601 in UTC with a ``Z`` (:func:`iso_utc`), the way
snapshots, plans, events and the API show them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """The one clock, injected wherever a decision depends on time."""

    def now(self) -> datetime:
        """Wall time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock."""
        ...


def iso_utc(dt: datetime, *, timespec: str = "auto") -> str:
    """ISO 8601 in UTC with a ``Z``: ``2026-11-22T16:00:00Z``."""
    if dt.tzinfo is None:
        raise ValueError(f"naive datetime {dt!r}: the reconciler writes timezone-aware UTC times only")
    return dt.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
