"""Connections: no client can take the file descriptors the control loop needs.

The API shares its process, and so its file descriptor limit (``RLIMIT_NOFILE``),
with the control loop: the store, the profile watcher, service logs, the pipes
of a start, health probes. A connection is a descriptor from the moment it is
accepted, and HTTP gives a client no reason to ever finish its request: 300
connections that each sent a request line and a few headers, never the blank
line that ends the head, once took every descriptor of a process limited to
256 — every pass then failed with "Too many open files", and the API stopped
answering (the token does not help: it is read from the head). uvicorn offers
``timeout_keep_alive`` (idle connections *between* requests) and
``limit_concurrency`` (a 503 once a complete head has arrived, which such a
client never sends), but no timeout for reading a request and no bound on
connections. This module adds both, in the server's own process:

**Timeouts** (:class:`GuardedH11Protocol`, uvicorn's h11 protocol with a
watchdog). A new connection must deliver a complete request head within
:data:`HEAD_TIMEOUT_S`, and so must a kept-alive one once the first byte of
its next head has arrived; else it is answered ``408`` and closed. A body
must keep arriving: :data:`BODY_TIMEOUT_S` without a byte of it (while the
server is ready to read it) is a ``408`` too. A slow client that keeps
sending is not cut off. A connection idle between requests is closed after
:data:`KEEP_ALIVE_S`, silently, as uvicorn does. A head larger than
:data:`MAX_HEAD_BYTES` is a ``400``. What happens after the head — a lease
request waiting up to ``wait_s``, an event stream — has no timeout here.

**A cap** (:class:`ConnectionGuard`, consulted by the listening socket's
``accept``, :class:`GuardedSocket`). At most ``max_connections`` accepted
connections are open at once. A connection past the cap makes room by
closing (``503``) the one that has waited longest for a request head —
half-sent or idle, the cheapest to lose and the likeliest to be abusive — so
a real client, which sends its head at once, still gets in during such a
flood; connections with a request in progress are never closed to make room.
When every connection is busy with a request, the new one is answered ``503``
and closed at once. Connections are accepted :data:`ACCEPT_BATCH` at a time
per turn of the event loop, so the loop reads the heads of those it took
before taking more, and a burst cannot outrun the closes (which free their
descriptor on the next turn): at most ``max_connections + ACCEPT_BATCH``
descriptors are ever the API's.

**Sizing** (:func:`size`). At start-up the soft ``RLIMIT_NOFILE`` is raised to
the hard one (at most :data:`NOFILE_TARGET`; the services the reconciler
starts inherit it). Of that limit, a reserve of a quarter, at least
:data:`RESERVE_MIN`, stays the control loop's (it needs ~15 descriptors at
rest and a few per start or probe in flight); the API may have the rest less
one accept batch, between :data:`MIN_CONNECTIONS` and
:data:`MAX_CONNECTIONS`. So a limit of 256 gives 144 connections, 1024 gives
752, and 65536 gives 4096. ``api.started`` says the numbers (``nofile``,
``max_connections``); ``/metrics`` counts what was closed and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http
import json
import resource
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is a dependency; a build without it falls back to h11
    HttpToolsProtocol = None  # type: ignore[assignment,misc]
from uvicorn.server import ServerState

from reconciler.api.coalescing import CoalescingTransport

HEAD_TIMEOUT_S = 5.0  # a request head must be complete this long after the connection (or its first byte)
BODY_TIMEOUT_S = 5.0  # a body may pause this long between bytes
KEEP_ALIVE_S = 5  # an idle connection between requests is closed after this (uvicorn's timeout_keep_alive)
MAX_HEAD_BYTES = 16 * 1024  # a longer head is a 400 (h11's default, said here)
NOFILE_TARGET = 65536  # the soft RLIMIT_NOFILE is raised to the hard one, up to this
RESERVE_MIN = 96  # descriptors always left to the control loop…
RESERVE_SHARE = 4  # …or a quarter of the limit, whichever is more
ACCEPT_BATCH = 16  # connections accepted per turn of the event loop
MIN_CONNECTIONS = 8
MAX_CONNECTIONS = 4096
CLOSE_REASONS = ("refused", "evicted", "head_timeout", "body_timeout", "idle")


@dataclass(frozen=True)
class Sizing:
    nofile: int  # the soft RLIMIT_NOFILE in force
    reserve: int  # descriptors left to the control loop
    max_connections: int  # the API's connections at most (plus one accept batch while closes complete)


def size(nofile: int) -> Sizing:
    """How many connections the API may hold under a descriptor limit of ``nofile`` (see the module's text)."""
    reserve = max(RESERVE_MIN, nofile // RESERVE_SHARE)
    connections = min(MAX_CONNECTIONS, max(MIN_CONNECTIONS, nofile - reserve - ACCEPT_BATCH))
    return Sizing(nofile=nofile, reserve=reserve, max_connections=connections)


def raise_nofile() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one (at most :data:`NOFILE_TARGET`); the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, NOFILE_TARGET)
    if soft == resource.RLIM_INFINITY:
        return NOFILE_TARGET
    if soft < target:
        with contextlib.suppress(ValueError, OSError):  # not allowed here: live with the soft limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def raw_response(status: int, detail: str) -> bytes:
    """A whole ``Connection: close`` answer, written below h11 (it may precede any request on the connection)."""
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


REFUSED = raw_response(503, "the API is at its connection limit and every connection is busy with a request; "
                            "retry in a moment")
EVICTED = raw_response(503, "closed to make room: the API is at its connection limit and this connection had "
                            "not sent a complete request; send the whole request head at once")
HEAD_TIMED_OUT = raw_response(408, f"the request head was not complete within {HEAD_TIMEOUT_S:g} s of the "
                                   "connection (or of its first byte); send the whole head at once")
HEAD_TOO_LARGE = raw_response(400, f"the request head is larger than {MAX_HEAD_BYTES} bytes")
BODY_TIMED_OUT = raw_response(408, f"the request body stalled: nothing of it arrived for {BODY_TIMEOUT_S:g} s")


class ConnectionGuard:
    """The API's connections: how many are open, which wait for a head (longest first), what was closed."""

    def __init__(self, sizing: Sizing):
        self.sizing = sizing
        self.sockets: dict[int, socket.socket | None] = {}  # fd → the accepted socket (None: seen by a protocol)
        self.waiting: dict[_Watchdog, None] = {}  # waiting for a request head, longest-waiting first
        self.closed: Counter[str] = Counter()  # why connections were closed by us
        self._batch = 0

    @property
    def open(self) -> int:
        return len(self.sockets)

    # --- the listening socket's side --------------------------------------------------------------

    def take_turn(self) -> bool:
        """May one more connection be accepted in this turn of the event loop?"""
        if self._batch == 0:
            asyncio.get_running_loop().call_soon(self._new_turn)
        if self._batch >= ACCEPT_BATCH:
            return False
        self._batch += 1
        return True

    def _new_turn(self) -> None:
        self._batch = 0

    def admit(self, conn: socket.socket) -> bool:
        """Keep ``conn`` (making room if need be), or answer it 503 and close it now."""
        if self.open >= self.sizing.max_connections:
            self._prune()
        if self.open < self.sizing.max_connections or self._evict_one():
            self.sockets[conn.fileno()] = conn
            return True
        self.closed["refused"] += 1
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(REFUSED)
        conn.close()
        return False

    def _prune(self) -> None:
        """Forget accepted sockets closed without a protocol ever seeing them."""
        for fd, sock in list(self.sockets.items()):
            if sock is not None and sock.fileno() == -1:
                del self.sockets[fd]

    def _evict_one(self) -> bool:
        while self.waiting:
            protocol = next(iter(self.waiting))
            del self.waiting[protocol]
            if protocol.evict():
                return True
        return False

    # --- the protocols' side ----------------------------------------------------------------------

    def opened(self, protocol: _Watchdog, fd: int) -> bool:
        """A protocol took a connection; False when it must close it at once (over the cap, and not accepted
        through :class:`GuardedSocket`: another event loop's accept)."""
        if fd not in self.sockets and self.open >= self.sizing.max_connections + ACCEPT_BATCH:
            self.closed["refused"] += 1
            return False
        self.sockets[fd] = None
        self.waiting[protocol] = None
        return True

    def lost(self, protocol: _Watchdog, fd: int) -> None:
        self.sockets.pop(fd, None)
        self.waiting.pop(protocol, None)

    def wait_for_head(self, protocol: _Watchdog) -> None:
        self.waiting.pop(protocol, None)
        self.waiting[protocol] = None  # last: it has waited least

    def busy(self, protocol: _Watchdog) -> None:
        self.waiting.pop(protocol, None)

    def protocol_class(self) -> type[GuardedHttpToolsProtocol] | type[GuardedH11Protocol]:
        """uvicorn's ``http`` protocol class, bound to this guard: httptools' where it can be imported, else h11's
        (see :func:`http_parser`)."""
        guard = self
        base: type[GuardedHttpToolsProtocol] | type[GuardedH11Protocol] = (
            GuardedHttpToolsProtocol if http_parser() == "httptools" else GuardedH11Protocol)

        class Bound(base):  # type: ignore[valid-type,misc]  # one of the two, chosen at run time
            pass

        Bound.guard = guard
        return Bound


def http_parser() -> str:
    """``httptools`` (llhttp, in C: a lease request costs about half the CPU) when it is installed, else ``h11``."""
    return "httptools" if HttpToolsProtocol is not None else "h11"


class GuardedSocket(socket.socket):
    """A listening socket whose ``accept`` (called by asyncio's loop) asks the guard first."""

    guard: ConnectionGuard | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        guard = self.guard
        if guard is None:
            return super().accept()
        while True:
            if not guard.take_turn():  # asyncio reads this as "none left": it asks again next turn
                raise BlockingIOError(errno.EAGAIN, "more connections next turn of the event loop")
            conn, address = super().accept()
            if guard.admit(conn):
                return conn, address


class _Watchdog:
    """The watchdog of :class:`GuardedHttpToolsProtocol` and :class:`GuardedH11Protocol` (module text): a
    request head, and a body, must keep coming. The protocol says where it is in a request through
    :meth:`_waiting_for_head`, :meth:`_partial_head` and :meth:`_in_body`."""

    guard: ClassVar[ConnectionGuard]
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any
    flow: Any

    def _init_watchdog(self) -> None:
        self._fd = -1
        self._wait_since: float | None = None  # when the wait for the current request head began
        self._partial = False  # part of that head has arrived
        self._served = 0  # requests answered on this connection
        self._body_since: float | None = None  # the body's last progress
        self._timer: asyncio.TimerHandle | None = None

    # --- uvicorn's protocol, observed ---------------------------------------------------------------

    def _waiting_for_head(self) -> bool:
        raise NotImplementedError

    def _partial_head(self) -> bool:
        raise NotImplementedError

    def _in_body(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]  # the protocol's, next in the MRO
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._wait_since = self.loop.time()
        if not self.guard.opened(self, self._fd):
            self._close(REFUSED, abort=True)
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        now = self.loop.time()
        self._body_since = now if self._in_body() else None
        self._sync(now)

    def on_response_complete(self) -> None:
        self._served += 1
        super().on_response_complete()  # type: ignore[misc]
        self._sync(self.loop.time())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.lost(self, self._fd)
        super().connection_lost(exc)  # type: ignore[misc]

    # --- the watchdog -------------------------------------------------------------------------------

    def _sync(self, now: float) -> None:
        """After h11 has seen new data or a response ended: waiting for a head (since when), or busy."""
        if self.transport.is_closing():
            return
        if self._waiting_for_head():
            if self._wait_since is None:
                self._wait_since = now
                self.guard.wait_for_head(self)
            partial = self._partial_head()
            if partial and not self._partial and self._served:
                self._wait_since = now  # a kept-alive connection's next head began: it has the whole timeout
            self._partial = partial
        else:
            self._wait_since = None
            self._partial = False
            self.guard.busy(self)
        self._arm()

    def _deadline(self) -> float | None:
        if self.transport.is_closing():
            return None
        if self._wait_since is not None:
            idle = self._served and not self._partial  # between requests: uvicorn's keep-alive
            return self._wait_since + (KEEP_ALIVE_S if idle else HEAD_TIMEOUT_S)
        if self._in_body() and self._body_since is not None:
            if self.flow.read_paused:  # we are not reading: not the client's delay
                self._body_since = self.loop.time()
            return self._body_since + BODY_TIMEOUT_S
        return None

    def _arm(self) -> None:
        deadline = self._deadline()
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None and self._timer.when() <= deadline:
            return  # fires no later than needed; _expire looks again then
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        deadline = self._deadline()
        if deadline is None:
            return
        if self.loop.time() < deadline:
            self._arm()
            return
        if self._wait_since is not None:
            if self._served and not self._partial:
                self.guard.closed["idle"] += 1
                self._close(None)
            else:
                self.guard.closed["head_timeout"] += 1
                self._close(HEAD_TIMED_OUT)
        else:
            self.guard.closed["body_timeout"] += 1
            answered = self.cycle is not None and self.cycle.response_started
            self._close(None if answered else BODY_TIMED_OUT)

    def evict(self) -> bool:
        """Close this connection to make room (it waits for a head); False when it is closing already."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.guard.closed["evicted"] += 1
        self._close(EVICTED if self._partial or not self._served else None, abort=True)
        return True

    def _close(self, answer: bytes | None, *, abort: bool = False) -> None:
        """Say ``answer`` (when there is one) and close; a request still reading its body sees a disconnect."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.busy(self)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # nothing the application sends now is written
            self.cycle.message_event.set()
        if answer is not None:
            self.transport.write(answer)
        if abort:
            self.transport.abort()
        else:
            self.transport.close()


class GuardedHttpToolsProtocol(_Watchdog, HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, in C) with the watchdog, a bound on the head's size, and each
    response's writes coalesced (:mod:`reconciler.api.coalescing`)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._init_watchdog()
        self._phase = "idle"  # idle (between requests) → head → body → idle; closed (the head was too large)
        self._head_bytes = 0  # bytes received since the head began (while it has no end)
        self._fields = 0  # bytes of its request line and header fields

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        super().connection_made(transport)
        # every write and close of the connection, the protocol's and the guard's too, passes through the
        # coalescing view (reconciler.api.coalescing): a close in the turn of a held write sends it first
        self.transport = CoalescingTransport(self.transport, self.loop)  # type: ignore[assignment]

    def _waiting_for_head(self) -> bool:
        return self._phase != "body" and (self.cycle is None or self.cycle.response_complete)

    def _partial_head(self) -> bool:
        return self._phase == "head"

    def _in_body(self) -> bool:
        return self._phase == "body"

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._phase == "head":  # a head with no end yet: bound the bytes sent (llhttp keeps no bound)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._too_large()

    def _too_large(self) -> None:
        if not self.transport.is_closing():
            self.guard.busy(self)
            self.transport.write(HEAD_TOO_LARGE)
            self.transport.close()
        self._phase = "closed"

    def on_message_begin(self) -> None:
        self._phase, self._head_bytes, self._fields = "head", 0, 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._fields += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._fields > MAX_HEAD_BYTES:  # a whole head that arrived at once: bound its fields
            self._too_large()
        if self._phase == "closed":
            return
        self._phase = "body"
        super().on_headers_complete()  # the new cycle writes through self.transport, the coalescing view

    def on_body(self, body: bytes) -> None:
        if self._phase != "closed":
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._phase == "closed":
            return
        self._phase = "idle"
        super().on_message_complete()


class GuardedH11Protocol(_Watchdog, H11Protocol):  # type: ignore[misc]  # uvicorn types transport loosely
    """uvicorn's h11 protocol (pure Python) with the watchdog: where httptools cannot be had."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._init_watchdog()

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _partial_head(self) -> bool:
        return bool(self.conn.trailing_data[0])

    def _in_body(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY
