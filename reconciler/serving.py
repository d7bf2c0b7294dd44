"""What the API and the model gateway share about serving HTTP: a quiet uvicorn server.

Both listeners run uvicorn inside the reconciler's own event loop, beside the
control loop, so two things of uvicorn's own server do not fit: its signal
handlers (the watch loop owns SIGINT and SIGTERM and stops the servers itself)
and its main loop, which wakes every 0.1 s to see whether to stop — ten turns of
the event loop a second for an idle server, a visible share of an idle
reconciler's CPU. :class:`QuietServer` takes neither: it stops as soon as it
is asked, and does not wake otherwise. The ``Date`` header, which uvicorn
renews in that tick, is renewed when a response reads it
(:class:`DatedState`): an idle server never wakes (it woke once a second, two
servers in ``serve --gateway``), and a busy one formats the date once a
second, as before.

A module of its own, in a layer between the two listeners and the rest
(``.importlinter``): the API and the gateway are independent of each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Generator
from email.utils import formatdate

import uvicorn
from uvicorn.server import ServerState


class DatedState(ServerState):
    """uvicorn's shared server state, whose ``default_headers`` carry the ``Date`` of the second they are read.

    uvicorn renews the header in its tick (it assigns ``default_headers`` once a second) and every request
    reads it. Here the read renews it when the second has changed since the last read, so the server needs no
    tick for it: an idle server never wakes, and a busy one formats the date once a second, as before."""

    def __init__(self) -> None:
        self._rest: list[tuple[bytes, bytes]] = []  # the headers but the date
        self._dated = False  # whether uvicorn wants a Date header at all (``date_header``)
        self._second = -1
        self._headers: list[tuple[bytes, bytes]] = []
        super().__init__()

    @property  # an attribute in uvicorn, a property here (read and assigned alike)
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        if self._dated:
            now = time.time()
            if int(now) != self._second:
                self._second = int(now)
                self._headers = [(b"date", formatdate(now, usegmt=True).encode()), *self._rest]
        return self._headers

    @default_headers.setter
    def default_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._dated = any(name == b"date" for name, _ in headers)
        self._rest = [(name, value) for name, value in headers if name != b"date"]
        self._headers = list(self._rest)
        self._second = -1


class QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers and without a tick (see the module docstring)."""

    _exit: asyncio.Event | None = None

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.server_state = DatedState()

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
        header): ten wake-ups a second of an idle server, each a turn of the event loop. Here the header is
        renewed when read (:class:`DatedState`) and the loop waits for ``should_exit`` alone. What else
        uvicorn's tick does — ``limit_max_requests``, ``callback_notify`` — is not used by the reconciler; a
        configuration that asks for it gets the tick back, once a second."""
        if self._exit is None:
            self._exit = asyncio.Event()
        ticking = self.config.limit_max_requests is not None or self.config.callback_notify is not None
        counter = 0
        while not await self.on_tick(counter):  # the first one sets the headers (and the date's wish)
            counter = (counter + 10) % 864000  # a multiple of 10: on_tick renews the Date header
            if not ticking:
                await self._exit.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)
