"""HTTP health probes: ``GET http://127.0.0.1:{host_port}{health_path}``, 2xx = healthy.

A probe is one short HTTP/1.1 exchange on a connection of its own
(``Connection: close``): a request line and three headers out, a status line
and the headers back (and, for an Ollama, the body, by ``Content-Length``,
chunks, or to the end). A new connection every time is the point: a service
that stops accepting connections (its listener closed, its accept queue
full) is unhealthy at the next probe, which a kept-alive connection would
hide. A watch probes every running service every ``probe_interval_s``, the
demo three of them every second, and through ``httpx`` (its pool, ``anyio``,
``h11``, the URL and cookie models) each probe cost more CPU than the rest of
the pass. Now it is a bare non-blocking socket driven by the event loop's
``sock_*`` calls: no transport, protocol or stream objects, and no wait on the
loop for a connection that is already made — on loopback the kernel has
completed the handshake, or refused it, by the time ``connect`` returns, so
the socket is asked (``SO_ERROR``, ``getpeername``) before the loop is
(:func:`_connect`); the request goes out at once and the loop is waited on
only for the answer. Measured on the demo's services: 30 % less user CPU per
probe than on asyncio's streams; the kernel's share (connect, send, receive,
close: ~0.17 ms) is unchanged. A host given by name is still resolved and
connected through asyncio's streams. No proxy is ever asked: a proxy from the
environment must never see, or break, loopback probes.

:class:`Prober` also holds one ``httpx.AsyncClient`` for its whole life (made
on first use inside the running event loop, closed by ``aclose()``): the
loopback HTTP of the other host modules (the Ollama API), which reuses its
connections. A prober given a client of its own probes through it (a
caller's transport, a test's). Each probe has its own timeout (the service's
``probe_timeout_s``), and all probes of one round run concurrently. A probe
never raises: what went wrong is in :class:`Probe.error`.

An Ollama's probe (``kind="ollama"``, its ``GET /api/tags``) is healthy only
when the answer *is* an Ollama's — a JSON object with a ``models`` list — so a
web server that happens to answer 200 on that path is not taken for one (and
adopted); the installed models' names go into :attr:`Probe.models`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import quote

import httpx

from reconciler.core.profile import Service, is_ollama
from reconciler.core.snapshot import Probe

DEFAULT_TIMEOUT_S = 2.0
MAX_HEAD_BYTES = 64 * 1024  # a status line and headers longer than this are not a health answer
MAX_BODY_BYTES = 4 * 1024 * 1024  # an Ollama's model list, read for an ollama probe only


def _stop_sniffio_lookups() -> None:
    """Make httpcore's per-request ``import sniffio`` fail at once when sniffio is not installed.

    httpcore 1.0.x imports ``sniffio`` inside ``current_async_library()``, which
    runs several times per request, and falls back to asyncio on ImportError.
    anyio >= 4.11 no longer installs sniffio, and Python does not cache a failed
    import, so every request searched ``sys.path`` again (about 5 ``stat`` calls
    each): most of a probe's CPU time (encode/httpcore#1103). ``None`` in
    ``sys.modules`` is Python's documented "not importable" marker: the import
    raises ImportError without a search, and httpcore picks asyncio as before.
    When sniffio is installed, nothing changes.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        # typeshed types sys.modules' values as modules only, without this documented None marker
        sys.modules["sniffio"] = None  # type: ignore[assignment]


_stop_sniffio_lookups()


@dataclass(frozen=True)
class Target:
    """Where and how to probe one service."""

    port: int
    path: str = "/health"
    timeout_s: float = DEFAULT_TIMEOUT_S
    host: str = "127.0.0.1"
    kind: Literal["http", "ollama"] = "http"  # ollama: the answer must be {"models": [...]}

    @property
    def url(self) -> str:
        path = self.path if self.path.startswith("/") else "/" + self.path
        return f"http://{self.host}:{self.port}{path}"


def service_target(service: Service) -> Target | None:
    """How to probe a managed service of the profile (None: it has no port, or is unmanaged)."""
    managed = service.managed
    if managed is None or service.probe_port is None:
        return None
    ollama = is_ollama(service) and managed.health_path.rstrip("/") == "/api/tags"
    return Target(port=service.probe_port, path=managed.health_path, timeout_s=service.probe_timeout_s,
                  kind="ollama" if ollama else "http", host=service.url_host)


def ollama_models(response: httpx.Response | bytes) -> list[str] | None:
    """The model names of an Ollama's ``/api/tags`` answer (a response, or its body); None when it is not one."""
    try:
        data = json.loads(response) if isinstance(response, bytes) else response.json()
    except ValueError:
        return None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    return [str(m.get("name") or m.get("model")) for m in models if isinstance(m, dict) and (m.get("name") or
                                                                                             m.get("model"))]


class Prober:
    """Concurrent health probes over one shared HTTP client."""

    def __init__(self, client: httpx.AsyncClient | None = None):
        self._client = client
        self._through_client = client is not None  # a given client is probed through; else the lean path

    @property
    def client(self) -> httpx.AsyncClient:
        """The shared client; loopback HTTP for other host modules (e.g. the Ollama API) too."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                trust_env=False,
                timeout=DEFAULT_TIMEOUT_S,
                # Probes go to many different ports at once; don't queue them behind a pool limit.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self._client

    async def probe(self, target: Target) -> Probe:
        if not self._through_client:
            return await lean_probe(target)
        try:
            response = await self.client.get(target.url, timeout=target.timeout_s)
        except httpx.TimeoutException:
            return Probe(healthy=False, error=f"no answer within {target.timeout_s:g}s")
        except httpx.ConnectError:
            return Probe(healthy=False, error=f"connection refused on port {target.port}")
        except httpx.HTTPError as exc:
            return Probe(healthy=False, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        healthy = response.is_success
        error = None if healthy else f"HTTP {response.status_code}"
        if healthy and target.kind == "ollama":
            models = ollama_models(response)
            if models is None:
                return Probe(healthy=False, status=response.status_code,
                             error=f"answers {target.path} but not as an Ollama does (no \"models\" list)")
            return Probe(healthy=True, status=response.status_code, models=models)
        return Probe(healthy=healthy, status=response.status_code, error=error)

    async def probe_all(self, targets: Mapping[str, Target]) -> dict[str, Probe]:
        """Probe every target at once; results by the same keys."""
        names = list(targets)
        results = await asyncio.gather(*(self.probe(targets[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _BadAnswer(Exception):
    """The peer answered, but not in HTTP/1.x (or beyond the size limits)."""


async def lean_probe(target: Target) -> Probe:
    """One probe on a connection of its own, on a bare non-blocking socket (see the module docstring)."""
    host = target.host.strip("[]")
    family = _literal_family(host)
    try:
        async with asyncio.timeout(target.timeout_s):
            if family is None:  # a name: asyncio resolves it and tries each address, as before
                return await _stream_probe(target, host)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                request = _request(target)
                try:
                    await _connect(sock, (host, target.port))
                except OSError:
                    return Probe(healthy=False, error=f"connection refused on port {target.port}")
                reader = _SocketReader(sock)
                await reader.send(request)
                return await _answer(target, reader)
            finally:
                sock.close()
    except TimeoutError:
        return Probe(healthy=False, error=f"no answer within {target.timeout_s:g}s")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return Probe(healthy=False, error="the connection closed before a complete answer")
    except (_BadAnswer, ValueError) as exc:
        return Probe(healthy=False, error=f"not an HTTP answer ({exc})")
    except OSError as exc:
        return Probe(healthy=False, error=f"{type(exc).__name__}: {exc}".rstrip(": "))


def _literal_family(host: str) -> socket.AddressFamily | None:
    """The address family of an IP literal (``127.0.0.1``, ``::1``); None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


async def _connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect ``sock`` (non-blocking). On loopback the kernel has finished the handshake — or been refused —
    by the time ``connect`` returns, though it says "in progress": ask the socket before waiting on the loop
    for it to become writable (which costs a registration, a turn of the loop and an unregistration)."""
    try:
        sock.connect(address)
        return
    except BlockingIOError:
        pass
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))
    try:
        sock.getpeername()
        return  # connected already
    except OSError:
        pass  # still connecting (a busy machine, a remote host): wait until it is writable, then ask again
    loop = asyncio.get_running_loop()
    writable = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


class _SocketReader:
    """The few reads a probe needs (as :class:`asyncio.StreamReader` has them, with its errors) over a bare
    non-blocking socket: a read that would block waits on the loop for that one descriptor."""

    def __init__(self, sock: socket.socket, limit: int = MAX_HEAD_BYTES):
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._eof = False
        self._limit = limit

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self._sock, data)

    async def _fill(self) -> None:
        if self._eof:
            return
        chunk = await self._loop.sock_recv(self._sock, 65536)  # a read first; waits on the loop only if empty
        if chunk:
            self._buffer += chunk
        else:
            self._eof = True

    async def readuntil(self, separator: bytes) -> bytes:
        start = 0
        while (found := self._buffer.find(separator, start)) < 0:
            if len(self._buffer) > self._limit:
                raise asyncio.LimitOverrunError("separator not found within the limit", len(self._buffer))
            if self._eof:
                partial = bytes(self._buffer)
                self._buffer.clear()
                raise asyncio.IncompleteReadError(partial, None)
            start = max(0, len(self._buffer) - len(separator) + 1)
            await self._fill()
        if found > self._limit:
            raise asyncio.LimitOverrunError("separator found past the limit", found)
        end = found + len(separator)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                partial = bytes(self._buffer)
                self._buffer.clear()
                raise asyncio.IncompleteReadError(partial, n)
            await self._fill()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read(self, n: int) -> bytes:
        if not self._buffer:
            await self._fill()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


async def _stream_probe(target: Target, host: str) -> Probe:
    """A probe of a host given by name, over asyncio's streams (asyncio resolves the name)."""
    try:
        reader, writer = await asyncio.open_connection(host, target.port, limit=MAX_HEAD_BYTES)
    except OSError:
        return Probe(healthy=False, error=f"connection refused on port {target.port}")
    try:
        writer.write(_request(target))
        return await _answer(target, reader)
    finally:
        writer.close()


def _request(target: Target) -> bytes:
    path = quote(target.path if target.path.startswith("/") else "/" + target.path, safe="/?&=%:@!$'()*+,;~")
    return (f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nAccept: */*\r\n"
            f"User-Agent: reconciler-probe\r\nConnection: close\r\n\r\n").encode("latin-1")


class _Reader(Protocol):
    async def readuntil(self, separator: bytes) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...

    async def read(self, n: int) -> bytes: ...


async def _answer(target: Target, reader: _Reader) -> Probe:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *header_lines = head[:-4].split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1."):
        raise _BadAnswer(f"status line {status_line[:40]!r}")
    status = int(rest[:3])
    healthy = 200 <= status < 300
    if not healthy or target.kind != "ollama":
        return Probe(healthy=healthy, status=status, error=None if healthy else f"HTTP {status}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    models = ollama_models(await _body(reader, headers))
    if models is None:
        return Probe(healthy=False, status=status,
                     error=f"answers {target.path} but not as an Ollama does (no \"models\" list)")
    return Probe(healthy=True, status=status, models=models)


async def _body(reader: _Reader, headers: dict[str, str]) -> bytes:
    """The body after the head: by ``Content-Length``, in chunks, or up to the end (``Connection: close``)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            length = int(line.split(b";", 1)[0].strip(), 16)
            if length == 0:
                return b"".join(chunks)
            size += length
            if size > MAX_BODY_BYTES:
                raise _BadAnswer("body over the size limit")
            chunks.append(await reader.readexactly(length))
            await reader.readexactly(2)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_BODY_BYTES:
            raise _BadAnswer("body over the size limit")
        return await reader.readexactly(length)
    body = await reader.read(MAX_BODY_BYTES + 1)
    while len(body) <= MAX_BODY_BYTES and (more := await reader.read(MAX_BODY_BYTES + 1 - len(body))):
        body += more
    if len(body) > MAX_BODY_BYTES:
        raise _BadAnswer("body over the size limit")
    return body
