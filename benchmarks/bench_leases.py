"""Lease latency (issue 4): ``reconciler serve`` as a subprocess, real HTTP on loopback, simulated GPU.

(1) fast path: a shared service that is already running and healthy
    (``max_concurrent`` large enough for every request); 1, 10 and 50
    clients (keep-alive connections from this process, see :class:`Connection`) each take a
    lease (``POST /v1/leases``, timed) and release it (``DELETE``, not
    timed), back to back. Latency = the POST's round trip; throughput =
    leases granted per second of the round (each also released, so the
    server answers twice as many requests). Client and server share the
    machine's cores; the client is kept lean so that it is the server that
    is measured.
(2) cold lease overhead: a service that is not running (it idle-stops
    0.2 s after its last lease ends), started by the lease request. Overhead =
    (grant − request) − the service's own time to become healthy, which is
    measured apart: the same program and arguments spawned directly by the
    benchmark, from ``Popen`` to the first 200 of its health endpoint (polled
    every 2 ms), median of as many runs (psutil's ``create_time`` is not
    comparable with the wall clock in some containers). What remains is the
    reconciler's: wake, observe, plan, spawn, noticing health, the grant and
    the answer. Target: median < 300 ms.

Everything started here is killed by pid (or process group) at the end; the
services run in a simulation scope of their own (``RECONCILER_SIM_SCOPE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.timing import percentile
from reconciler.testing.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP_DELAY_S = 0.5
COLD_ROUNDS = int(os.environ.get("BENCH_COLD_ROUNDS", "10"))
FAST_REQUESTS = {1: 300, 10: 1500, 50: 3000}
WAIT_S = 30.0

PROFILE = """\
schema_version: 1
name: bench-leases
vram_total_mb: 8192
eviction_timeout_s: 2
services:
  warm:
    max_mb: 2000
    priority: 1
    shared: true
    max_concurrent: 100000
    always_on: true
    probe_interval_s: 0.5
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.service --port {{port}} --name warm"
      port: {warm}
  cold:
    max_mb: 2000
    priority: 2
    idle_stop_after_s: 0.2
    probe_interval_s: 0.2
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.service --port {{port}} --name cold --startup-delay {delay}"
      port: {cold}
"""


def _stats(samples_ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(samples_ms), "p95_ms": percentile(samples_ms, 95),
            "p99_ms": percentile(samples_ms, 99)}


class Server:
    """``reconciler serve`` on a free port, its state and profile in a tmp directory."""

    def __init__(self, root: Path):
        self.root = root
        self.ports = {"warm": free_port(), "cold": free_port()}
        profile = root / "profile.yaml"
        profile.write_text(PROFILE.format(delay=STARTUP_DELAY_S, **self.ports))
        env = {**os.environ, "RECONCILER_PYTHON": sys.executable,
               "RECONCILER_SIM_SCOPE": f"bench-{uuid.uuid4().hex[:8]}", "PYTHONPATH": str(ROOT)}
        self.log = open(root / "serve.log", "wb")  # noqa: SIM115 - the server's log while it runs; closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "serve", "--profile", str(profile), "--gpu", "sim:8192",
             "--state-dir", str(root / "state"), "--listen", "127.0.0.1:0", "--events", "json"],
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, env=env, cwd=root,
            start_new_session=True)
        self.url = self._wait_started()
        self.http = httpx.Client(base_url=self.url, timeout=WAIT_S + 10)

    def _wait_started(self) -> str:
        deadline = time.monotonic() + WAIT_S
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)
            if event.get("kind") == "api.started":
                threading.Thread(target=self._drain, daemon=True).start()
                return event["url"]
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"serve did not start: {(self.root / 'serve.log').read_text()[-2000:]}")

    def _drain(self) -> None:
        for _ in self.process.stdout:  # keep the pipe flowing
            pass

    def status(self) -> dict[str, Any]:
        return self.http.get("/v1/status").json()

    def wait(self, predicate, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.02)
        raise RuntimeError(f"{what}: not within {WAIT_S} s")

    def release_all(self) -> None:
        for lease in self.status()["leases"]:
            self.http.delete(f"/v1/leases/{lease['id']}")

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
    """A minimal keep-alive HTTP/1.1 client connection (asyncio streams).

    httpx costs more CPU per request than the server does here; on a
    two-core machine shared with the server that would measure the client.
    This one only writes a request and reads a Content-Length answer.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        self.writer.write(head + data)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), json.loads(payload) if payload else None

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def on_connections(url: str, clients: int, worker: Callable[[int, Connection], Awaitable[None]]) -> float:
    """Run ``worker(n, connection)`` on ``clients`` keep-alive connections at once; the wall seconds it took."""
    connections = [await Connection.open(url) for _ in range(clients)]
    try:
        began = time.perf_counter()
        await asyncio.gather(*(worker(n, c) for n, c in enumerate(connections)))
        return time.perf_counter() - began
    finally:
        for connection in connections:
            await connection.close()


async def _fast_round(url: str, clients: int, total: int) -> tuple[list[float], float, int]:
    samples: list[float] = []
    failures = 0
    per_client = total // clients

    async def worker(n: int, connection: Connection) -> None:
        nonlocal failures
        for _ in range(per_client):
            began = time.perf_counter()
            status, lease = await connection.request(
                "POST", "/v1/leases", {"service": "warm", "holder": f"b{n}", "ttl_s": 600})
            samples.append((time.perf_counter() - began) * 1000)
            if status == 200:
                await connection.request("DELETE", f"/v1/leases/{lease['id']}")
            else:
                failures += 1

    wall = await on_connections(url, clients, worker)
    return samples, wall, failures


def fast_path(server: Server) -> list[dict[str, Any]]:
    server.wait(lambda s: any(i["service"] == "warm" and i["healthy"] for i in s["instances"])
                and s["plan"] is not None and not s["plan"]["actions"], "warm running")
    rows = []
    for clients, total in FAST_REQUESTS.items():
        samples, wall, failures = asyncio.run(_fast_round(server.url, clients, total))
        server.release_all()
        rows.append({
            "benchmark": f"fast-path lease, {clients} client{'s' if clients > 1 else ''} ({len(samples)} requests)",
            **_stats(samples), "throughput_rps": len(samples) / wall,
            "value": f"{len(samples) - failures} granted, {failures} refused", "target": "(info)",
            "ok": failures == 0,
        })
    return rows


def _healthy_after(port: int, argv: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning ``argv`` to the first 200 of its health endpoint (polled every 2 ms)."""
    began = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=0.5) as client:
            while time.perf_counter() - began < WAIT_S:
                try:
                    if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        return time.perf_counter() - began
                except httpx.HTTPError:
                    pass
                time.sleep(0.002)
        raise RuntimeError(f"{argv} not healthy within {WAIT_S} s")
    finally:
        process.terminate()
        process.wait(10)


def own_start_time(rounds: int) -> float:
    """The service's own time to become healthy: the same program, spawned here directly (median, s)."""
    samples = []
    for _ in range(rounds):
        port = free_port()
        argv = [sys.executable, "-m", "reconciler.testing.service", "--port", str(port), "--name", "cold",
                "--startup-delay", str(STARTUP_DELAY_S)]
        samples.append(_healthy_after(port, argv, {**os.environ, "PYTHONPATH": str(ROOT)}))
    return statistics.median(samples)


def cold_lease(server: Server, rounds: int) -> dict[str, Any]:
    own = own_start_time(rounds)
    totals = []
    for i in range(rounds):
        server.wait(lambda s: not any(x["service"] == "cold" for x in s["instances"]) and not s["leases"],
                    "cold stopped")
        began = time.perf_counter()
        response = server.http.post("/v1/leases", json={"service": "cold", "holder": f"cold{i}", "wait_s": WAIT_S})
        totals.append((time.perf_counter() - began) * 1000)
        if response.status_code != 200:
            raise RuntimeError(f"cold lease {i}: {response.status_code} {response.text}")
        server.http.delete(f"/v1/leases/{response.json()['id']}")
    overheads = [total - own * 1000 for total in totals]
    row = {"benchmark": f"cold lease overhead ({rounds} starts, service healthy after {STARTUP_DELAY_S:g} s)",
           **_stats(overheads),
           "value": f"request→grant median {statistics.median(totals):.0f} ms; service alone spawn→healthy "
                    f"{own * 1000:.0f} ms", "target": "< 300 ms median"}
    row["ok"] = row["median_ms"] < 300
    return row


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-leases-") as tmp:
        server = Server(Path(tmp))
        try:
            return [*fast_path(server), cold_lease(server, COLD_ROUNDS)]
        finally:
            server.close()


if __name__ == "__main__":
    for row in run():
        print(row)
