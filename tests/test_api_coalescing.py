"""A response's writes leave in one send (reconciler.api.coalescing), and a lone write waits one loop turn at most."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from reconciler.api.coalescing import CoalescingTransport
from reconciler.api.connections import ConnectionGuard, size


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return "peer" if name == "peername" else default


async def _scenarios() -> None:
    loop = asyncio.get_running_loop()
    real = Recording()
    coalescing = CoalescingTransport(real, loop)
    coalescing.write(b"HTTP/1.1 200 OK\r\n\r\n")
    coalescing.write(b"{}")
    assert real.sent == [b"HTTP/1.1 200 OK\r\n\r\n{}"]  # head and body: one send
    coalescing.write(b"chunk")  # alone in its turn (a streamed chunk): out at the end of the turn
    assert real.sent[1:] == []
    await asyncio.sleep(0)
    assert real.sent[1:] == [b"chunk"]
    coalescing.write(b"last")
    coalescing.close()  # what is held goes first
    assert real.sent[2:] == [b"last"] and real.closed and coalescing.is_closing()
    await asyncio.sleep(0)
    assert len(real.sent) == 3  # the turn's flush finds nothing more to send
    assert coalescing.get_extra_info("peername") == "peer"  # the rest is the connection's


@contextmanager
def serving(app: FastAPI) -> Iterator[tuple[uvicorn.Server, int]]:
    """``app`` served by uvicorn with the guarded protocol on a free loopback port, in a thread, once started."""
    guard = ConnectionGuard(size(1024))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=guard.protocol_class(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_writes_in_one_turn_are_one_send_and_none_waits_past_the_turn() -> None:
    asyncio.run(_scenarios())


def test_a_served_answer_and_a_streamed_one_arrive_whole() -> None:
    """Through the guarded httptools protocol of a real uvicorn server: a JSON answer, a chunked stream, and a
    connection closed after its answer (HTTP/1.0) each arrive complete."""
    app = FastAPI()

    @app.get("/one")
    async def one() -> dict[str, str]:
        return {"answer": "x" * 100}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            for n in range(5):
                yield f"{n}\n".encode()
                await asyncio.sleep(0.01)
        return StreamingResponse(parts(), media_type="text/plain")

    with serving(app) as (_, port):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(20):  # kept alive: each answer whole, in order
                answer = client.get("/one")
                assert answer.status_code == 200 and answer.json() == {"answer": "x" * 100}
            assert client.get("/stream").text == "0\n1\n2\n3\n4\n"
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.sendall(b"GET /one HTTP/1.0\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := raw.recv(65536):  # HTTP/1.0: the server closes after the answer, which is complete
            received += chunk
        raw.close()
        assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b'{"answer":"' + b"x" * 100 + b'"}')


def test_a_close_by_the_server_in_the_same_turn_still_sends_what_is_held() -> None:
    """The protocol closes the connection itself, not through the response's view of it: uvicorn's graceful
    shutdown (``Server.shutdown`` → each connection's ``shutdown()``: a connection whose response is complete is
    closed at once), and the guard's timeouts and evictions. When that happens in the same turn of the event loop
    as a response's last write (held until the turn ends), the last write must still leave before the close.
    Here the stream's generator schedules the server's own shutdown step just before it ends, so the shutdown
    runs after the stream's last write and before the turn's flush: the response must arrive complete."""
    app = FastAPI()
    state: dict[str, Any] = {}

    def shut_down_connections() -> None:  # what uvicorn.Server.shutdown does to each open connection
        for connection in list(state["server"].server_state.connections):
            connection.shutdown()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def parts() -> AsyncIterator[bytes]:
            yield b"first\n"
            await asyncio.sleep(0.01)  # the last write alone in its turn: held until the turn ends
            asyncio.get_running_loop().call_soon(shut_down_connections)
        return StreamingResponse(parts(), media_type="text/plain")

    with serving(app) as (server, port):
        state["server"] = server
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := raw.recv(65536):  # the server closes once the stream ended
            received += chunk
        raw.close()
        assert received.startswith(b"HTTP/1.1 200 OK"), received
        assert received.endswith(b"6\r\nfirst\n\r\n0\r\n\r\n"), received  # the last chunk too
