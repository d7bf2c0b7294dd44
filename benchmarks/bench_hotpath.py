"""The lease hot path (issue 10): server CPU per request, throughput and latency, next to the framework floor.

What it measures, in one run on one machine:

* **lease endpoints**: cf-orch's VRAM lease (``POST /api/leases`` then
  ``DELETE /api/leases/{id}``) and the native service lease (``POST`` then
  ``DELETE /v1/leases``) of a real ``reconciler serve`` (simulated GPU,
  a warm shared service), at 1 and 50 keep-alive connections, with 0 and
  1,000 leases already held. A request is one ``POST`` or one ``DELETE``;
  p50/p99 are the ``POST``'s round trip (the grant), throughput counts both.
  Server CPU per request is read from ``/proc/PID/stat`` (user + system
  time of the server process, threads included) over the round.
* **the CLI**: ``reconciler plan`` on a tiny golden scenario and on
  :mod:`.bench_planner`'s 8 GPUs × 200 services (written out as YAML and
  JSON), wall time from process start to exit (imports included).
* **the floor**: the same two routes in a FastAPI app that does nothing
  (:mod:`benchmarks.floor_app`), on the same HTTP stack. cf-orch
  (circuitforge-core) cannot be installed on this machine (it is not on the
  package index this machine reaches), so the floor stands in for it; the
  last side-by-side measurement with cf-orch is in the README
  ("Performance"). The ratio column is our CPU per request over the floor's.

The client is a lean asyncio HTTP/1.1 client (:class:`benchmarks.bench_leases.Connection`)
in this process; client and server share the machine's two cores.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench_leases import ROOT, Connection, Server, on_connections
from benchmarks.timing import percentile
from reconciler.testing.ports import free_port

TICKS = os.sysconf("SC_CLK_TCK")
REQUESTS = {1: 1500, 50: 5000}  # POST+DELETE pairs per round
HELD = (0, 1000)
GPU = 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _vram_body(n: int) -> dict[str, Any]:
    return {"node_id": "local", "gpu_id": GPU, "mb": 1, "service": f"bench-{n}", "priority": 2, "ttl_s": 0}


async def _round(url: str, clients: int, pairs: int, kind: str) -> tuple[list[float], float, int]:
    samples: list[float] = []
    failures = 0

    async def worker(n: int, connection: Connection) -> None:
        nonlocal failures
        for _ in range(pairs // clients):
            began = time.perf_counter()
            if kind == "native":
                status, body = await connection.request(
                    "POST", "/v1/leases", {"service": "warm", "holder": f"b{n}", "ttl_s": 600})
                lease_id = body.get("id") if status == 200 else None
                path = "/v1/leases/"
            else:
                status, body = await connection.request("POST", "/api/leases", _vram_body(n))
                lease_id = body["lease"]["lease_id"] if status == 200 else None
                path = "/api/leases/"
            samples.append((time.perf_counter() - began) * 1000)
            if lease_id is None:
                failures += 1
                continue
            status, _ = await connection.request("DELETE", f"{path}{lease_id}")
            failures += status != 200

    wall = await on_connections(url, clients, worker)
    return samples, wall, failures


def measure(url: str, pid: int, clients: int, kind: str) -> dict[str, Any]:
    pairs = REQUESTS[clients]
    asyncio.run(_round(url, clients, min(200, pairs), kind))  # warm up
    before = cpu_s(pid)
    samples, wall, failures = asyncio.run(_round(url, clients, pairs, kind))
    used = cpu_s(pid) - before
    requests = 2 * len(samples)
    return {"median_ms": statistics.median(samples), "p99_ms": percentile(samples, 99),
            "throughput_rps": requests / wall, "cpu_ms": 1000 * used / requests, "failures": failures}


def hold(url: str, kind: str, count: int) -> list[str]:
    """Take ``count`` leases that stay held through the round."""
    with httpx.Client(base_url=url, timeout=30) as http:
        ids = []
        for n in range(count):
            if kind == "native":
                ids.append(http.post("/v1/leases", json={"service": "warm", "holder": f"h{n}"}).json()["id"])
            else:
                ids.append(http.post("/api/leases", json=_vram_body(n)).json()["lease"]["lease_id"])
        return ids


def drop(url: str, kind: str, ids: list[str]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        for lease_id in ids:
            http.delete(f"{'/v1/leases/' if kind == 'native' else '/api/leases/'}{lease_id}")


class Floor:
    """:mod:`benchmarks.floor_app` under uvicorn, on the stack ``reconciler serve`` uses."""

    def __init__(self) -> None:
        from reconciler.api.server import http_stack  # the loop and parser serve runs with

        loop, http = http_stack()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks.floor_app:app", "--port", str(port), "--loop", loop,
             "--http", http, "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.delete(f"{self.url}/api/leases/x", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the floor app did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def plan_cli(profile: Path, snapshot: Path, runs: int = 11) -> float:
    """Median wall seconds of ``reconciler plan`` on a profile and snapshot, from process start to exit.

    What an installed reconciler costs: pip compiles its bytecode at install, so the child runs without
    ``PYTHONDONTWRITEBYTECODE`` (set in some sandboxes, where every start would compile our sources again,
    ≈ 50 to 70 ms), and one run before the timed ones writes any bytecode that is missing.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    command = [sys.executable, "-m", "reconciler", "plan", "--profile", str(profile), "--snapshot", str(snapshot)]
    times = []
    for run in range(runs + 1):
        began = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if run:  # the first compiles what is not compiled yet
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def large_scenario(folder: Path) -> tuple[Path, Path]:
    """bench_planner's 8 GPUs × 200 services written out: the profile as YAML, the snapshot as JSON."""
    from ruamel.yaml import YAML

    from benchmarks.bench_planner import large_cluster_box
    from reconciler.loading import dump_snapshot

    profile, snapshot = large_cluster_box()
    profile_path, snapshot_path = folder / "profile.yaml", folder / "snapshot.json"
    with profile_path.open("w") as out:
        YAML().dump(profile.model_dump(mode="json", exclude_defaults=True), out)
    snapshot_path.write_text(dump_snapshot(snapshot))
    return profile_path, snapshot_path


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    golden = ROOT / "golden" / "03-start-always-on"
    tiny = plan_cli(golden / "profile.yaml", golden / "snapshot.yaml")
    rows.append({"benchmark": "`reconciler plan`, tiny scenario (golden 03), wall", "median_ms": 1000 * tiny,
                 "target": "≤ 150 ms", "ok": tiny <= 0.150})
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        large = plan_cli(*large_scenario(Path(tmp)))
    rows.append({"benchmark": "`reconciler plan`, 8 GPUs x 200 services, wall", "median_ms": 1000 * large,
                 "value": f"+{1000 * (large - tiny):.0f} ms over tiny", "target": "≤ tiny + 60 ms",
                 "ok": large - tiny <= 0.060})
    floor = Floor()
    try:
        floors = {c: measure(floor.url, floor.process.pid, c, "vram") for c in REQUESTS}
    finally:
        floor.close()
    for clients, m in floors.items():
        rows.append({"benchmark": f"floor: FastAPI route doing nothing, {clients} conn", "median_ms": m["median_ms"],
                     "p99_ms": m["p99_ms"], "throughput_rps": m["throughput_rps"],
                     "value": f"{m['cpu_ms']:.3f} ms CPU/req", "target": "(reference)"})
    with tempfile.TemporaryDirectory(prefix="bench-hotpath-") as tmp:
        server = Server(Path(tmp))
        try:
            server.wait(lambda s: any(i["service"] == "warm" and i["healthy"] for i in s["instances"])
                        and s["plan"] is not None and not s["plan"]["actions"], "warm running")
            pid = server.process.pid
            for kind, label in (("vram", "cf-orch /api/leases"), ("native", "native /v1/leases")):
                cost: dict[int, float] = {}
                for held in HELD:
                    ids = hold(server.url, kind, held)
                    for clients in REQUESTS:
                        m = measure(server.url, pid, clients, kind)
                        if clients == 1:
                            cost[held] = m["cpu_ms"]
                        ratio = m["cpu_ms"] / floors[clients]["cpu_ms"]
                        target, ok = "(info)", m["failures"] == 0
                        if clients == 1 and held == 0:
                            target = "p50 ≤ 0.5 ms, p99 ≤ 2 ms"
                            ok = ok and m["median_ms"] <= 0.5 and m["p99_ms"] <= 2
                        rows.append({
                            "benchmark": f"{label}, {clients} conn, {held} held", "median_ms": m["median_ms"],
                            "p99_ms": m["p99_ms"], "throughput_rps": m["throughput_rps"],
                            "value": f"{m['cpu_ms']:.3f} ms CPU/req ({ratio:.1f}× floor)"
                                     + (f", {m['failures']} failed" if m["failures"] else ""),
                            "target": target, "ok": ok})
                    drop(server.url, kind, ids)
                flat = cost[1000] / cost[0]
                rows.append({"benchmark": f"{label}: CPU/req with 1000 held ÷ with 0", "value": f"{flat:.2f}",
                             "target": "0.8 to 1.2", "ok": 0.8 <= flat <= 1.2})
        finally:
            server.close()
    return rows
