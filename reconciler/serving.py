"""What the API and the model gateway share about serving HTTP: a quiet uvicorn server.

Both listeners run uvicorn inside the reconciler's own event loop, beside the
control loop, so two things of uvicorn's own server do not fit: its signal
handlers (the watch loop owns SIGINT and SIGTERM and stops the servers itself)
and its main loop, which wakes every 0.1 s to see whether to stop — ten turns of
the event loop a second for an idle server, a visible share of an idle
reconciler's CPU. :class:`QuietServer` takes neither: it renews the ``Date``
header once a second, as uvicorn does, and stops as soon as it is asked.

A module of its own, in a layer between the two listeners and the rest
(``.importlinter``): the API and the gateway are independent of each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator

import uvicorn


class QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers, ticking once a second (see the module docstring)."""

    _exit: asyncio.Event | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the watch loop handles signals; uvicorn must not take them over

    @property
    def should_exit(self) -> bool:
        return self._exit is not None and self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if self._exit is None:
            self._exit = asyncio.Event()
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    async def main_loop(self) -> None:
        """uvicorn's loop wakes every 0.1 s to see whether to stop (and every tenth time renews the Date
        header): ten wake-ups a second of an idle server, each a turn of the event loop. This one renews
        the header once a second, as before, and stops as soon as ``should_exit`` is set."""
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # a multiple of 10: on_tick renews the Date header
            if self._exit is None:
                self._exit = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)
