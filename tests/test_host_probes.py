"""Health probes over one shared client: real services, real HTTP, 200 at once."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from reconciler.host.probes import Prober, Target
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)
from reconciler.testing.ports import free_port


async def probe_once(target: Target):
    prober = Prober()
    try:
        return await prober.probe(target)
    finally:
        await prober.aclose()


def test_healthy_unhealthy_and_absent(spawner):
    ok = spawner.service()
    starting = spawner.service(startup_delay=60)
    custom = spawner.service(health_path="/ready")
    targets = {
        "ok": Target(ok.port),
        "starting": Target(starting.port),
        "custom": Target(custom.port, "/ready"),
        "wrong-path": Target(custom.port, "/health"),
        "absent": Target(free_port()),
    }

    async def run():
        prober = Prober()
        try:
            return await prober.probe_all(targets)
        finally:
            await prober.aclose()

    probes = asyncio.run(run())
    assert (probes["ok"].healthy, probes["ok"].status, probes["ok"].error) == (True, 200, None)
    assert (probes["starting"].healthy, probes["starting"].status, probes["starting"].error) == (
        False, 503, "HTTP 503",
    )
    assert probes["custom"].healthy and not probes["wrong-path"].healthy
    assert probes["wrong-path"].status == 404
    assert (probes["absent"].healthy, probes["absent"].status) == (False, None)
    assert "refused" in probes["absent"].error


def test_a_host_given_by_name_is_resolved(spawner):
    """An IP literal is probed on a bare socket; a name goes through asyncio's resolver (either way a real GET)."""
    svc = spawner.service()
    assert asyncio.run(probe_once(Target(svc.port, host="localhost"))).healthy
    assert not asyncio.run(probe_once(Target(free_port(), host="localhost"))).healthy


def test_a_service_that_stops_listening_is_unhealthy_at_the_next_probe():
    """Every probe is a connection of its own: nothing kept open hides a listener that went away."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]

        async def answer_once():
            conn, _ = await asyncio.get_running_loop().sock_accept(listener)
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

        async def first():
            listener.setblocking(False)
            served = asyncio.ensure_future(answer_once())
            probe = await probe_once(Target(port))
            await served
            return probe

        assert asyncio.run(first()).healthy
    second = asyncio.run(probe_once(Target(port)))
    assert not second.healthy and "refused" in second.error


def test_a_connect_still_in_progress_is_waited_for(spawner, monkeypatch):
    """Where the handshake is not done when connect returns (a remote host, a busy machine), the probe waits on the
    loop for the socket to become writable and asks it again: connected, or refused."""
    svc = spawner.service()

    def not_yet(self):
        raise OSError(107, "Transport endpoint is not connected")

    monkeypatch.setattr(socket.socket, "getpeername", not_yet)
    assert asyncio.run(probe_once(Target(svc.port))).healthy
    refused = asyncio.run(probe_once(Target(free_port())))
    assert not refused.healthy and "refused" in refused.error


def test_timeout_is_per_target():
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        probe = asyncio.run(probe_once(Target(silent.getsockname()[1], timeout_s=0.2)))
    assert (probe.healthy, probe.status, probe.error) == (False, None, "no answer within 0.2s")


def test_environment_proxy_is_ignored(spawner, monkeypatch):
    svc = spawner.service()
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert asyncio.run(probe_once(Target(svc.port))).healthy


def test_two_hundred_probes_run_at_once_over_one_client(monkeypatch):
    """Each server answers only once all 200 requests have arrived: queued probes would time out."""
    count, clients_made = 200, []
    real_client = httpx.AsyncClient

    def counting_client(*args, **kwargs):
        clients_made.append(kwargs)
        return real_client(*args, **kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", counting_client)

    async def run():
        arrived, everyone = 0, asyncio.Event()

        async def handle(reader, writer):
            nonlocal arrived
            await reader.readuntil(b"\r\n\r\n")
            arrived += 1
            if arrived == count:
                everyone.set()
            await everyone.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

        servers = [await asyncio.start_server(handle, "127.0.0.1", 0) for _ in range(count)]
        targets = {f"s{i}": Target(s.sockets[0].getsockname()[1], timeout_s=5) for i, s in enumerate(servers)}
        prober = Prober()
        try:
            first = await prober.probe_all(targets)
            client = prober.client
            arrived, everyone = 0, asyncio.Event()  # a second round reuses the client
            second = await prober.probe_all(targets)
            assert prober.client is client
        finally:
            await prober.aclose()
            for server in servers:
                server.close()
                await server.wait_closed()
        return first, second

    first, second = asyncio.run(run())
    assert sorted(first) == sorted(f"s{i}" for i in range(count))
    assert all(p.healthy for p in first.values()), [p.error for p in first.values() if not p.healthy][:3]
    assert all(p.healthy for p in second.values())
    assert len(clients_made) == 1 and clients_made[0]["trust_env"] is False


@pytest.mark.parametrize("path, url", [("health", "http://127.0.0.1:8000/health"), ("/", "http://127.0.0.1:8000/")])
def test_target_url(path, url):
    assert Target(8000, path).url == url


@pytest.mark.parametrize("framing", ["content-length", "chunked", "to-the-end"])
def test_an_ollama_answer_is_read_however_it_is_framed(framing):
    """An Ollama probe reads the body of /api/tags by Content-Length, in chunks, or up to the close."""
    body = b'{"models": [{"name": "llama3.2:3b"}, {"model": "qwen2.5:7b"}]}'

    async def run():
        async def handle(reader, writer):
            request = await reader.readuntil(b"\r\n\r\n")
            assert request.startswith(b"GET /api/tags HTTP/1.1\r\n") and b"Connection: close" in request
            if framing == "content-length":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            elif framing == "chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:]))
                             + b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            prober = Prober()
            target = Target(server.sockets[0].getsockname()[1], "/api/tags", kind="ollama")
            return await prober.probe(target)
        finally:
            server.close()
            await server.wait_closed()

    probe = asyncio.run(run())
    assert (probe.healthy, probe.status, probe.models) == (True, 200, ["llama3.2:3b", "qwen2.5:7b"])


def test_a_peer_that_is_not_http_is_unhealthy_not_an_error():
    async def run():
        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            return await Prober().probe(Target(server.sockets[0].getsockname()[1]))
        finally:
            server.close()
            await server.wait_closed()

    probe = asyncio.run(run())
    assert not probe.healthy and probe.status is None and probe.error.startswith("not an HTTP answer")
