"""Connections to the model servers: a lean HTTP/1.1 client, one keep-alive pool per instance.

Every proxied request goes through the :class:`Upstream` of its instance,
so consecutive requests reuse its connections (no TCP handshake, no new
socket per request). A pool belongs to one instance: when the process that
answers on a service's port is another one (a restart, a model switch, an
eviction and a start), the old pool is closed and a new one made
(:meth:`Upstreams.of` with the instance's pid, which the gateway reads when
a request had to wait for a pass — only a pass starts or restarts an
instance).

**Why not httpx here.** The warm path's cost is the gateway's CPU per
request, and httpx with httpcore was 40 % of it (py-spy, ``./dev bench
gateway``): a request object, URL merging, cookies, anyio's cancel scopes
and locks around every read and write, the request's head and body written
in two system calls, and a scan of the pool per request. A model server on
loopback needs none of it: one :class:`asyncio.Protocol` per connection,
the request written in one call, the answer parsed by ``httptools`` (the C
parser uvicorn uses: status, headers, ``Content-Length``, chunked or
until-close bodies) and handed over piece by piece as it arrives. With it
the serving process's CPU per warm request fell from about 2.2 to 1.3 ms
(its CPU time over the benchmark's warm rounds). The info routes (an
Ollama's tags, ps, version, show), rare and not latency-bound, keep httpx.

**Streaming and backpressure.** :meth:`Response.pieces` yields the body as
the socket delivers it — nothing is gathered; when more than
:data:`HIGH_WATER` bytes wait unread (the gateway's client is slower than
the model), the connection stops reading from its socket, so TCP pushes
back on the model server, and reads again once they were taken.

**Ends.** :meth:`Response.close` gives a connection whose answer ended
cleanly (and that the server keeps alive) back to the pool; one closed in
the middle of an answer — the client went away, the task was cancelled —
is closed, which is how llama-server and vLLM learn to stop generating. A
connection the server closed while idle is dropped from the pool at once
(its ``connection_lost``); one that breaks before any byte of the answer on
its first reuse is retried once on a fresh connection (the server closed it
between two requests: it never saw the request).

At most :data:`KEEPALIVE` idle connections are kept per instance, each for
at most :data:`KEEPALIVE_EXPIRY_S`; the rest are closed when their answer
ends. The pool is a stack (the newest idle connection is taken; nothing is
scanned), so keeping many costs nothing per request — httpcore looked at
every pooled connection per request, which is why 8 were kept with it; at
50 concurrent clients 64 kept cost 0.38 to 0.39 ms of CPU per request
here, 8 kept 0.43 to 0.56 (reconnecting the rest).

Timeouts: connecting :data:`CONNECT_S` (the instance is healthy when its
lease is granted, so a refused connection is a failure, answered 502),
and a read may wait :data:`READ_S` between two pieces of the answer (a long
prompt's first token). Answers are asked for uncompressed, so the bytes
relayed are the bytes the client reads. Failures are :class:`UpstreamError`,
whose text says what happened at which address.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

CONNECT_S = 10.0
READ_S = 600.0
KEEPALIVE = 64  # idle connections kept per instance (the pool is a stack: taking one costs the same with 64)
KEEPALIVE_EXPIRY_S = 30.0
HIGH_WATER = 256 * 1024  # unread answer bytes past which the socket is not read (backpressure)


class UpstreamError(Exception):
    """The model server could not be reached, or broke off its answer."""


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; at most one request on it at a time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._response: Response | None = None

    # --- the protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._response._fail(UpstreamError(f"{self.address} answered something that is not HTTP ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response.complete:
            if response._headers_done and response._until_close:
                response._finish()  # an answer delimited by the end of the connection
            else:
                why = f": {exc}" if exc else ""
                response._fail(UpstreamError(f"{self.address} closed the connection before the answer "
                                             f"ended{why}"), before_answer=not response._headers_done)

    # --- httptools callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._response is not None
        self._response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        response.status = self._parser.get_status_code()
        response._headers_done = True
        names = {name for name, _ in response.headers}
        response._until_close = b"content-length" not in names and b"transfer-encoding" not in names
        response._wake()

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response._piece(body)

    def on_message_complete(self) -> None:
        assert self._response is not None
        self._response._keep = self._parser.should_keep_alive()
        self._response._finish()

    # --- the client's side ----------------------------------------------------------------

    def send(self, head: bytes, body: bytes, response: Response) -> None:
        assert self.transport is not None
        self._response = response
        response._connection = self
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def done(self) -> None:
        """The answer was read: ready for the next request."""
        self._response = None
        self._parser = httptools.HttpResponseParser(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """An answer as it arrives: :attr:`status` and :attr:`headers` once :meth:`Upstream.send` returns,
    then the body through :meth:`pieces`; :meth:`close` it (``finally``) in every case."""

    def __init__(self, upstream: Upstream) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # names lowercased
        self.complete = False
        self._upstream = upstream
        self._connection: _Connection | None = None
        self._headers_done = False
        self._until_close = False
        self._keep = False
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._error: UpstreamError | None = None
        self._before_answer = False
        self._waiter: asyncio.Future[None] | None = None

    # --- fed by the connection ---------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _piece(self, body: bytes) -> None:
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._connection is not None:
            self._paused = True
            self._connection.pause()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError, *, before_answer: bool = False) -> None:
        if self._error is None:
            self._error, self._before_answer = error, before_answer
        self._wake()

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(READ_S, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            address = self._connection.address if self._connection is not None else "the model server"
            self._fail(UpstreamError(f"{address} sent nothing for {READ_S:g} s"))

    # --- read by the gateway -------------------------------------------------------------

    async def _head(self) -> None:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as it arrives (chunked framing removed); UpstreamError when it breaks off.

        What has arrived since the last piece was taken comes as one piece: a model that writes faster than
        the client reads (many small chunks per read of the socket) is relayed a read at a time, not a chunk
        at a time — the same bytes, never held back, a fraction of the writes."""
        while True:
            if self._pieces:
                if len(self._pieces) == 1:
                    piece = self._pieces.popleft()
                else:
                    piece = b"".join(self._pieces)
                    self._pieces.clear()
                self._buffered -= len(piece)
                if self._paused and self._buffered <= HIGH_WATER // 2 and self._connection is not None:
                    self._paused = False
                    self._connection.resume()
                yield piece
                continue
            if self.complete:
                return
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self.pieces()])

    def close(self) -> None:
        """Back to the pool when the answer ended cleanly and the server keeps the connection; else closed."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self.complete and self._keep and not self._pieces and not connection.closed:
            connection.done()
            self._upstream._idle(connection)
        else:
            connection.close()


class Upstream:
    """The pool of one instance at ``http://host:port``: its idle connections, newest first."""

    def __init__(self, url: str, pid: int | None = None) -> None:
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.pid = pid
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.address = f"{self.host}:{self.port}"
        self._host_header = f"Host: {parts.netloc}\r\n".encode("latin-1")
        self._pool: list[_Connection] = []
        self._closed = False

    async def send(self, method: str, path: str, body: bytes = b"",
                   content_type: bytes = b"application/json") -> Response:
        """Send one request; the answer's status and headers are in once this returns (UpstreamError if not)."""
        head = b"".join((
            method.encode("ascii"), b" ", path.encode("latin-1"), b" HTTP/1.1\r\n", self._host_header,
            b"Content-Type: ", content_type, b"\r\nContent-Length: ", str(len(body)).encode("ascii"),
            b"\r\nAccept-Encoding: identity\r\nUser-Agent: reconciler-gateway\r\n\r\n"))
        for attempt in (0, 1):
            connection = await self._connection()
            response = Response(self)
            connection.send(head, body, response)
            try:
                await response._head()
                return response
            except UpstreamError:
                response.close()
                if attempt == 0 and connection.reused and response._before_answer:
                    continue  # closed by the server between two requests: it never saw this one
                raise
            except BaseException:
                response.close()
                raise
        raise AssertionError("unreachable")

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._pool:
            connection = self._pool.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_EXPIRY_S:
                connection.reused = True
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self.address), self.host, self.port), CONNECT_S)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {self.address}: "
                                f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__}"
                                ) from None
        return connection

    def _idle(self, connection: _Connection) -> None:
        if self._closed or len(self._pool) >= KEEPALIVE:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._pool.append(connection)

    def close(self) -> None:
        """Close the idle connections now; those in use close when their answers end."""
        self._closed = True
        for connection in self._pool:
            connection.close()
        self._pool.clear()


class Upstreams:
    """Service → the pool of its current instance."""

    def __init__(self) -> None:
        self._pools: dict[str, Upstream] = {}

    def of(self, service: str, url: str, pid: int | None = None) -> Upstream:
        """The pool for ``service`` at ``url``; a new one when ``pid`` (when known) or ``url`` changed."""
        pool = self._pools.get(service)
        if pool is not None and pool.url == url.rstrip("/") and (pid is None or pid == pool.pid):
            return pool
        if pool is not None:
            pool.close()
        pool = self._pools[service] = Upstream(url, pid)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


__all__ = ["CONNECT_S", "KEEPALIVE", "READ_S", "Response", "Upstream", "UpstreamError", "Upstreams"]
