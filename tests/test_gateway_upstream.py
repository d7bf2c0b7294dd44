"""The gateway's lean HTTP/1.1 client (:mod:`reconciler.gateway.upstream`) against real servers on loopback.

The end-to-end tests (``test_gateway_*.py``) drive it through ``reconciler
serve --gateway`` — streams, backpressure, a client that goes away; here the
connection handling that they cannot steer: keep-alive reuse, a server that
closes its connections between requests, bodies framed by Content-Length,
chunks or the end of the connection, and a server that is not there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from reconciler.gateway.upstream import Upstream, UpstreamError, Upstreams
from reconciler.testing.ports import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


async def serve(handler: Handler) -> tuple[asyncio.Server, list[int]]:
    """An HTTP/1.1 server on loopback: reads each request (head and Content-Length body), lets ``handler`` answer
    (False: close the connection); counts the connections it accepted."""
    accepted = [0]

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                if not await handler(reader, writer, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    return server, accepted


def url_of(server: asyncio.Server) -> str:
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
    data = json.dumps({"got": json.loads(body)}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Seen: yes\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    await writer.drain()
    return True


def test_answers_are_read_whole_and_one_connection_serves_them_all() -> None:
    async def scenario() -> None:
        server, accepted = await serve(echo)
        upstream = Upstream(url_of(server))
        try:
            for i in range(50):
                response = await upstream.send("POST", "/v1/chat/completions", json.dumps({"n": i}).encode())
                try:
                    assert response.status == 200 and (b"x-seen", b"yes") in response.headers  # names lowercased
                    assert json.loads(await response.read()) == {"got": {"n": i}}
                finally:
                    response.close()
            assert accepted[0] == 1  # kept alive: no new connection per request
        finally:
            upstream.close()
            server.close()

    asyncio.run(scenario())


def test_a_server_that_closes_each_connection_after_its_answer_costs_a_new_connection_not_an_error() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        await echo(reader, writer, body)
        return False  # closed without saying so (no "Connection: close"), as a server's keep-alive timeout does

    async def scenario() -> None:
        server, accepted = await serve(once)
        upstream = Upstream(url_of(server))
        try:
            for i in range(20):
                response = await upstream.send("POST", "/x", json.dumps({"n": i}).encode())
                assert json.loads(await response.read()) == {"got": {"n": i}}
                response.close()
            assert accepted[0] == 20
        finally:
            upstream.close()
            server.close()

    asyncio.run(scenario())


def test_chunked_and_until_close_bodies_arrive_piece_by_piece() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            piece = f"data: {i}\n\n".encode()
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n")  # Ollama's fake: HTTP/1.0
        for i in range(3):
            writer.write(json.dumps({"status": i}).encode() + b"\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        return False

    async def pieces_of(handler: Handler) -> list[bytes]:
        server, _ = await serve(handler)
        upstream = Upstream(url_of(server))
        try:
            response = await upstream.send("POST", "/s", b"{}")
            try:
                return [piece async for piece in response.pieces()]
            finally:
                response.close()
        finally:
            upstream.close()
            server.close()

    assert asyncio.run(pieces_of(chunked)) == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert b"".join(asyncio.run(pieces_of(until_close))).splitlines() == [b'{"status": 0}', b'{"status": 1}',
                                                                          b'{"status": 2}']


def test_a_server_that_is_not_there_or_breaks_off_is_an_upstream_error_naming_it() -> None:
    async def breaks_off(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        return False

    async def scenario() -> None:
        port = free_port()
        with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
            await Upstream(f"http://127.0.0.1:{port}").send("POST", "/x", b"{}")
        server, _ = await serve(breaks_off)
        upstream = Upstream(url_of(server))
        try:
            response = await upstream.send("POST", "/x", b"{}")
            with pytest.raises(UpstreamError, match="closed the connection before the answer ended"):
                await response.read()
            response.close()
        finally:
            upstream.close()
            server.close()

    asyncio.run(scenario())


def test_a_new_instance_gets_a_new_pool() -> None:
    pools = Upstreams()
    first = pools.of("llm", "http://127.0.0.1:8080", pid=10)
    assert pools.of("llm", "http://127.0.0.1:8080") is first  # pid not known (a warm request): the same
    assert pools.of("llm", "http://127.0.0.1:8080/", pid=10) is first
    assert pools.of("llm", "http://127.0.0.1:8080", pid=11) is not first  # another process answers there
    pools.close()
