"""One response, one send: a response's head and body leave in one system call.

uvicorn writes a response in two pieces — the status line and headers when the
application starts its response, then the body — and asyncio's transport sends
each at once. On a keep-alive connection that is two ``send`` calls and two TCP
segments per answer, and on loopback (a client beside the server, the usual case
for the lease API) the kernel does the receiver's work inside each ``send``: in a
profile of the VRAM lease endpoint, writing answers was a fifth of the server's
time, more than the lease itself and its SQLite commit together.

:class:`CoalescingTransport` stands between a connection's protocol (and so each of its
response cycles) and its transport: every write and close of the connection passes
through it, the protocol's own too (uvicorn's shutdown, a parse error's 400, the
connection guard's 408/503), so none can overtake or drop a held write. The first
write of a turn of the event loop is held; a
second write in the same turn (the body, written right after the head by the same
task) goes out together with it, in one ``send``; a write left alone (the head of a
streamed response, or one chunk of it) goes out at the end of the turn
(``call_soon``), so nothing waits longer than the loop's current turn. Closing
(or aborting) sends what is held first. Everything else is the connection's transport's own:
flow control still reaches the response through the protocol (the real transport calls
its ``pause_writing``, and uvicorn's flow control holds the real transport).
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    """A connection's transport as its protocol and response cycles see it (see the module docstring)."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = data
            self._loop.call_soon(self._flush)
            return
        held, self._held = self._held, None
        self._transport.write(held + data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:  # the guard's 503 is written just before it aborts: that write goes first
        self._flush()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, pause_reading, …: the connection's own
        return getattr(self._transport, name)
