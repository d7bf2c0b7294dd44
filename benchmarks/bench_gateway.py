"""The model gateway against the same upstream directly, side by side in one run (the gateway issue).

``reconciler serve --gateway`` as a subprocess (simulated GPU, real HTTP on
loopback) with two services of :mod:`reconciler.testing.fake_openai` (an
OpenAI-compatible model server on asyncio, fast enough that the gateway's
own cost shows): ``warm`` (always on, ``max_concurrent`` large) and ``cold``
(stopped 0.2 s after its last request, healthy 0.5 s after it starts).
Each measurement runs against the gateway and against the upstream's own
port, in alternating rounds (so that a busy moment of the shared machine
hits both), with the same lean client (:class:`Connection`: keep-alive
HTTP/1.1 on asyncio streams, chunked or Content-Length answers — httpx
would cost more CPU than what is measured, on two cores shared with the
servers):

(1) warm non-streaming ``POST /v1/chat/completions``: latency p50 and p99 at
    1 and 50 clients; added = gateway − direct. Target: added p50 ≤ 1 ms.
(2) time to the first streamed chunk (``"stream": true``, the first
    ``data:`` line). Target: added p50 ≤ 1 ms.
(3) streamed throughput of a long stream, chunks per second: 20 000 chunks
    as fast as the upstream writes them (three busy processes then share
    the machine's cores: the client, the gateway and the upstream), and
    2 000 chunks paced by the upstream 1 ms apart (a fast model's rate).
    Target: ≥ 95 % of direct.
(4) cold request: the service stopped; request → answer, less the
    upstream's own time from spawn to healthy (the same program spawned
    here, polled every 2 ms, median of as many runs). What remains is the
    reconciler's: demand, wake, observe, plan, spawn, noticing health, the
    grant, the proxying. Target: ≤ 100 ms median.

The server runs as deployed, printing its events as text (``--events
json`` would add a JSON line per lease event to every request: the
printer's cost, not the gateway's). Beside the latencies, the serving
process's CPU time per warm request (user + system, over the gateway's
rounds at 1 client, psutil) is reported: on a shared two-core machine it
moves far less than a latency does.

The latencies are measured twice: with the state directory on disk, as
deployed, and on tmpfs (``/dev/shm``, when there is one), where the store's
fsyncs cost little — every request's implicit lease is a grant and a
release in the store, with their events recorded, which on a slow disk is
most of what the gateway adds. Every process started here is killed at the
end; the services run in a simulation scope of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.timing import percentile
from reconciler.testing.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 30.0
STARTUP_DELAY_S = 0.5
ROUNDS = 2  # alternating rounds of each measurement, gateway and direct
WARM = {1: 250, 50: 1500}  # clients → requests per round
TTFB_REQUESTS = 250
LONG_STREAM = 20_000  # chunks, as fast as the upstream writes them
PACED_STREAM, PACE_S = 2_000, 0.001  # chunks, seconds between two (a fast model: ~1000 tokens/s at most)
COLD_ROUNDS = int(os.environ.get("BENCH_COLD_ROUNDS", "8"))
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}

PROFILE = """\
schema_version: 1
name: bench-gateway
vram_total_mb: 8192
eviction_timeout_s: 2
services:
  warm:
    max_mb: 2000
    priority: 1
    shared: true
    max_concurrent: 100000
    always_on: true
    model: m
    max_queued: 100000
    probe_interval_s: 1
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.fake_openai --port {{port}} --model m"
      port: {warm}
  cold:
    max_mb: 2000
    priority: 2
    idle_stop_after_s: 0.2
    probe_interval_s: 0.2
    model: c
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.fake_openai --port {{port}} --model c --startup-delay {delay}"
      port: {cold}
"""


class Server:
    """``reconciler serve --gateway`` on free ports, its state and profile in a tmp directory."""

    def __init__(self, root: Path, state_dir: Path):
        self.root = root
        self.ports = {"warm": free_port(), "cold": free_port()}
        api, gateway = free_port(), free_port()
        self.url, self.gateway = f"http://127.0.0.1:{api}", f"http://127.0.0.1:{gateway}"
        profile = root / "profile.yaml"
        profile.write_text(PROFILE.format(delay=STARTUP_DELAY_S, **self.ports))
        env = {**os.environ, "RECONCILER_PYTHON": sys.executable,
               "RECONCILER_SIM_SCOPE": f"bench-{uuid.uuid4().hex[:8]}", "PYTHONPATH": str(ROOT)}
        self.log = open(root / "serve.log", "wb")  # noqa: SIM115 - the server's log while it runs; closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "serve", "--profile", str(profile), "--gpu", "sim:8192",
             "--state-dir", str(state_dir), "--listen", f"127.0.0.1:{api}", "--gateway", f"127.0.0.1:{gateway}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root,
            start_new_session=True)
        self.http = httpx.Client(base_url=self.url, timeout=WAIT_S + 10)
        self._wait_started()

    def _wait_started(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/v1/status").status_code == 200 and httpx.get(self.gateway).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"serve did not start: {(self.root / 'serve.log').read_text()[-2000:]}")

    def cpu_s(self) -> float:
        """The serving process's CPU time so far (user + system), seconds."""
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.http.get("/v1/status").json()
        return status

    def wait(self, predicate: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.02)
        raise RuntimeError(f"{what}: not within {WAIT_S} s")

    def close(self) -> None:
        pids = []
        with contextlib.suppress(httpx.HTTPError):
            pids = [i["pid"] for i in self.status()["instances"] if i["origin"] == "started" and i["pid"]]
        self.http.close()
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
        self.log.close()


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection: a request, then a Content-Length or chunked answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, float | None, int]:
        """POST; (status, seconds to the first ``data:`` chunk of a stream, SSE events read)."""
        data = json.dumps(body).encode()
        began = time.perf_counter()
        self.writer.write((f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(data)}\r\n\r\n").encode() + data)
        status_line = await self.reader.readline()
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        status = int(status_line.split()[1])
        if not chunked:
            await self.reader.readexactly(length)
            return status, None, 0
        first: float | None = None
        events, carry = 0, b""
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return status, first, events
            chunk = await self.reader.readexactly(size)
            await self.reader.readexactly(2)
            if first is None and b"data:" in chunk:
                first = time.perf_counter() - began
            joined = carry + chunk  # a relayed chunk may end inside an event: count across the boundary
            events += joined.count(b"data: {")
            carry = joined[-6:]  # shorter than the marker: never counted twice

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def _ms(samples: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples), "p95_ms": percentile(samples, 95),
            "p99_ms": percentile(samples, 99)}


async def _latencies(url: str, clients: int, total: int) -> list[float]:
    connections = [await Connection.open(url) for _ in range(clients)]
    samples: list[float] = []

    async def worker(connection: Connection) -> None:
        for _ in range(total // clients):
            began = time.perf_counter()
            status, _, _ = await connection.post("/v1/chat/completions", BODY)
            samples.append((time.perf_counter() - began) * 1000)
            if status != 200:
                raise RuntimeError(f"{url}: answered {status}")

    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for connection in connections:
            await connection.close()
    return samples


async def _first_chunks(url: str, total: int) -> list[float]:
    connection = await Connection.open(url)
    try:
        samples = []
        for _ in range(total):
            status, first, _ = await connection.post("/v1/chat/completions", {**BODY, "stream": True})
            if status != 200 or first is None:
                raise RuntimeError(f"{url}: a stream answered {status}")
            samples.append(first * 1000)
        return samples
    finally:
        await connection.close()


async def _throughput(url: str, chunks: int = LONG_STREAM, pace_s: float = 0.0) -> float:
    connection = await Connection.open(url)
    try:
        began = time.perf_counter()
        status, _, events = await connection.post(
            "/v1/chat/completions", {**BODY, "stream": True, "max_tokens": chunks, "fake_chunk_delay_s": pace_s})
        took = time.perf_counter() - began
        if status != 200 or events != chunks:
            raise RuntimeError(f"{url}: the long stream answered {status} with {events} chunks")
        return events / took
    finally:
        await connection.close()


def side_by_side(direct: str, gateway: str, measure: Any) -> tuple[list[float], list[float]]:
    """``measure(url)`` in alternating rounds; (direct samples, gateway samples)."""
    out: dict[str, list[float]] = {"direct": [], "gateway": []}
    for _ in range(ROUNDS):
        for name, url in (("direct", direct), ("gateway", gateway)):
            result = asyncio.run(measure(url))
            out[name] += result if isinstance(result, list) else [result]
    return out["direct"], out["gateway"]


def warm_rows(server: Server, direct: str, sizes: dict[int, int]) -> list[dict[str, Any]]:
    rows = []
    for clients, total in sizes.items():
        spent: dict[str, float] = {"cpu_s": 0.0, "requests": 0}

        async def measured(url: str, c: int = clients, t: int = total, spent: dict[str, float] = spent
                           ) -> list[float]:
            before = server.cpu_s() if url == server.gateway else 0.0
            samples = await _latencies(url, c, t)
            if url == server.gateway:  # the serving process's CPU over the gateway's rounds
                spent["cpu_s"] += server.cpu_s() - before
                spent["requests"] += len(samples)
            return samples

        plain, proxied = side_by_side(direct, server.gateway, measured)
        added = statistics.median(proxied) - statistics.median(plain)
        added_p99 = percentile(proxied, 99) - percentile(plain, 99)
        cpu_ms = 1000 * spent["cpu_s"] / max(1, spent["requests"])
        rows.append({
            "benchmark": f"warm request, {clients} client{'s' if clients > 1 else ''}: gateway "
                         f"({len(proxied)} requests)", **_ms(proxied),
            "value": f"direct p50 {statistics.median(plain):.2f} ms, p99 {percentile(plain, 99):.2f} ms; "
                     f"added p50 {added:+.2f} ms, p99 {added_p99:+.2f} ms; serving process CPU {cpu_ms:.2f} ms "
                     "per request",
            "target": "added p50 ≤ 1 ms", "ok": added <= 1.0})
    return rows


def ttfb_row(server: Server, direct: str) -> dict[str, Any]:
    plain, proxied = side_by_side(direct, server.gateway, lambda url: _first_chunks(url, TTFB_REQUESTS))
    added = statistics.median(proxied) - statistics.median(plain)
    return {"benchmark": f"time to first streamed chunk: gateway ({len(proxied)} streams)", **_ms(proxied),
            "value": f"direct p50 {statistics.median(plain):.2f} ms; added p50 {added:+.2f} ms",
            "target": "added p50 ≤ 1 ms", "ok": added <= 1.0}


def throughput_rows(server: Server, direct: str) -> list[dict[str, Any]]:
    rows = []
    for chunks, pace in ((LONG_STREAM, 0.0), (PACED_STREAM, PACE_S)):
        plain, proxied = side_by_side(direct, server.gateway, lambda url, c=chunks, p=pace: _throughput(url, c, p))
        ratio = statistics.median(proxied) / statistics.median(plain)
        how = "as fast as the upstream writes" if not pace else f"paced by the upstream, {pace * 1000:g} ms apart"
        rows.append({"benchmark": f"streamed throughput, {chunks} chunks {how}: gateway",
                     "throughput_rps": statistics.median(proxied),
                     "value": f"{statistics.median(proxied):.0f} chunks/s vs direct {statistics.median(plain):.0f}: "
                              f"{ratio:.1%}", "target": "≥ 95 % of direct", "ok": ratio >= 0.95})
    return rows


def own_start_time(rounds: int) -> float:
    """The upstream's own spawn → healthy time: the same program spawned here (median, s; polled every 2 ms)."""
    samples = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(rounds):
        port = free_port()
        began = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "reconciler.testing.fake_openai", "--port", str(port), "--model", "c",
             "--startup-delay", str(STARTUP_DELAY_S)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with httpx.Client(timeout=0.5) as client:
                while time.perf_counter() - began < WAIT_S:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                            samples.append(time.perf_counter() - began)
                            break
                    time.sleep(0.002)
        finally:
            process.terminate()
            process.wait(10)
    return statistics.median(samples)


def cold_row(server: Server, rounds: int) -> dict[str, Any]:
    own = own_start_time(rounds)
    totals = []
    with httpx.Client(base_url=server.gateway, timeout=WAIT_S) as client:
        for i in range(rounds):
            server.wait(lambda s: not any(x["service"] == "cold" for x in s["instances"]) and not s["leases"],
                        "cold stopped")
            began = time.perf_counter()
            response = client.post("/v1/chat/completions", json={**BODY, "model": "c"})
            totals.append((time.perf_counter() - began) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"cold request {i}: {response.status_code} {response.text}")
    overheads = [total - own * 1000 for total in totals]
    row = {"benchmark": f"cold request overhead ({rounds} starts, upstream healthy after {STARTUP_DELAY_S:g} s)",
           **_ms(overheads),
           "value": f"request→answer median {statistics.median(totals):.0f} ms; upstream alone spawn→healthy "
                    f"{own * 1000:.0f} ms", "target": "≤ 100 ms median"}
    row["ok"] = row["median_ms"] <= 100
    return row


def measure(root: Path, state_dir: Path, label: str, full: bool) -> list[dict[str, Any]]:
    server = Server(root, state_dir)
    try:
        server.wait(lambda s: any(i["service"] == "warm" and i["healthy"] for i in s["instances"])
                    and s["plan"] is not None and not s["plan"]["actions"], "warm running")
        direct = f"http://127.0.0.1:{server.ports['warm']}"
        asyncio.run(_latencies(server.gateway, 1, 50))  # warm up both paths (pools, caches)
        asyncio.run(_latencies(direct, 1, 50))
        rows = warm_rows(server, direct, WARM if full else {1: WARM[1]})
        rows.append(ttfb_row(server, direct))
        if full:
            rows += throughput_rows(server, direct)
        rows.append(cold_row(server, COLD_ROUNDS))
    finally:
        server.close()
    for row in rows:
        row["benchmark"] += label
    return rows


def run() -> list[dict[str, Any]]:
    """Everything with the state directory on disk (as deployed); then the latencies again with it on
    tmpfs, where the store's fsyncs (a lease granted, released, their events recorded) cost little."""
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        rows = measure(Path(tmp), Path(tmp) / "state", "", full=True)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp, \
                tempfile.TemporaryDirectory(prefix="bench-gateway-state-", dir=shm) as state:
            rows += measure(Path(tmp), Path(state), " [state on tmpfs]", full=False)
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
