"""End to end: a GPU booked beyond its total is never "converged" (issue 8.2), and a kill -9 in the middle
of an eviction leaves nothing over-committed, duplicated or orphaned (invariants 4 and 5).

Real ``watch --api`` servers, real service processes, a simulated 8 GB GPU. Over-commits are made
the way a host makes them: a foreign process that grows (the simulation counts a process declaring
``RECONCILER_SIM_GPU_MB``, in this test's scope, as using that much). While a service of ours is
evicted, what the GPU holds is sampled every 100 ms from outside the reconciler
(:class:`Sampler`: the processes' memory plus the unmanaged slot's active lease): it never exceeds
8192 MB, and no service ever has two live processes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx

from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.host.sim import EnvScanner, SimBackend, parse_sim_spec
from reconciler.store import open_store
from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host, alive, host, wait_until  # noqa: F401

GPU_MB = 8192


def over_conditions(status: dict) -> list[dict]:
    return [c for c in status["conditions"] if c["type"] == "over_committed"]


def converged(status: dict) -> bool:
    return next(c for c in status["conditions"] if c["type"] in ("converged", "observed"))["ok"]


def cli(api: ApiRun, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reconciler", *args, "--url", api.url],
                          capture_output=True, text=True, timeout=30)


class Sampler:
    """The simulated GPU's use (what live processes of this test declare) every 100 ms, and which
    services had two live processes at once."""

    def __init__(self, host: Host):
        self.host = host
        self.backend = SimBackend(parse_sim_spec(str(GPU_MB)), EnvScanner(host.scope))
        self.peaks: list[int] = []
        self.duplicates: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            [gpu] = self.backend.read()
            self.peaks.append(gpu.used_mb + self.slots())
            names: list[str] = []
            for proc in self.host.our_processes():
                try:
                    cmdline = proc.cmdline()
                except Exception:  # gone meanwhile
                    continue
                if "--name" in cmdline:
                    names.append(cmdline[cmdline.index("--name") + 1])
            self.duplicates |= {n for n in names if names.count(n) > 1}
            time.sleep(0.1)

    def slots(self) -> int:
        """What the unmanaged slot's active leases book (once, whatever their number), read-only from the store."""
        path = self.host.state_dir / "state.db"
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as conn:
            rows = conn.execute("SELECT data FROM leases WHERE service = 'batch'").fetchall()
        now = datetime.now(UTC)
        active = [lease for (data,) in rows if (lease := json.loads(data)).get("expires_at") is None
                  or datetime.fromisoformat(lease["expires_at"].replace("Z", "+00:00")) > now]
        return 2048 if active else 0

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join(5)


def actions(api: ApiRun) -> list[tuple[str, str | None]]:
    """(kind, action) of every event the server printed so far (all of them once it is dead)."""
    if api.run.process.poll() is not None:
        while api.run.next(1) is not None:
            pass
    return [(e["kind"], e.get("action")) for e in api.run.events]


def ask(url: str, name: str) -> None:
    """A lease request whose server may die under it (the connection then just ends)."""
    with httpx.Client(base_url=url, timeout=30) as http, contextlib.suppress(httpx.HTTPError):
        http.post("/v1/leases", json={"service": name, "holder": "e2e", "ttl_s": 120, "wait_s": 20})


def test_an_over_commit_nothing_can_relieve_is_a_condition_in_status_why_and_the_gpu_figures(host: Host) -> None:
    """Two always_on services fill the GPU; a foreign process then takes 1024 MB more. Nothing may be
    evicted, so the plan says why — and status, ``why`` and the GPU figures the dashboard and metrics
    read all say the GPU is over-committed, by how much; never "converged". It clears once the foreign
    process is gone, with the services untouched."""
    host.write(profile(service("tts", host.port(), mb=4096, priority=3, always_on=True),
                       service("comfyui", host.port(), mb=4096, priority=5, always_on=True)))
    api = ApiRun(host)
    try:
        status = api.wait_converged()
        assert over_conditions(status) == [] and status["gpus"][0]["over_committed_mb"] == 0 and converged(status)
        pids = host.pids()

        foreign = host.start_foreign("reconciler.testing.service", "--port", str(host.port()), "--name", "other",
                                     sim_mb=1024)
        status = api.wait_status(lambda s: bool(over_conditions(s)), "an over_committed condition")
        [condition] = over_conditions(status)
        assert condition["gpu"] == 0 and not condition["ok"]
        assert condition["message"].startswith(
            "GPU 0 is over-committed: 9216 MB booked on 8192 MB, 1024 MB too many; nothing is evicted: "), condition
        assert "always_on" in condition["message"]
        assert status["gpus"][0]["over_committed_mb"] == 1024
        assert 'reconciler_gpu_overcommit_bytes{gpu="0"} 1.073741824e+09' in api.http.get("/metrics").text
        assert not converged(status)
        assert "GPU 0 over-committed" in next(c for c in status["conditions"] if c["type"] == "converged")["message"]

        printed = cli(api, "status")
        assert printed.returncode == 0
        assert "over_committed: GPU 0 is over-committed: 9216 MB booked on 8192 MB" in printed.stdout, printed.stdout
        why = cli(api, "why", "comfyui")
        assert why.returncode == 0
        assert "Its GPU 0 is over-committed: 9216 MB booked on 8192 MB, 1024 MB too many" in why.stdout, why.stdout

        foreign.kill()
        foreign.wait(10)
        status = api.wait_status(lambda s: not over_conditions(s) and converged(s), "the over-commit cleared")
        assert status["gpus"][0]["over_committed_mb"] == 0
        assert host.pids() == pids and all(alive(pid) for pid in pids.values())  # nothing was signalled
    finally:
        api.close()


def test_an_over_commit_is_relieved_by_evicting_the_least_important(host: Host) -> None:
    """The same growth beside a service that is not always_on: the plan evicts it, with the numbers in
    its reason, and the GPU is within its total again; the always_on service is untouched."""
    host.write(profile(service("tts", host.port(), mb=4096, priority=3, always_on=True),
                       service("comfyui", host.port(), mb=4096, priority=5)))
    api = ApiRun(host)
    try:
        api.wait_converged()
        lease = api.lease("comfyui", holder="e2e", ttl_s=60, wait_s=10)
        assert lease.status_code == 200, lease.text
        assert api.http.delete(f"/v1/leases/{lease.json()['id']}").status_code in (200, 204)
        status = api.wait_converged()  # comfyui stays: idle_stop_after_s 0 never idle-stops it
        assert {i["service"] for i in status["instances"]} == {"tts", "comfyui"}
        tts = host.pids()["tts"]

        host.start_foreign("reconciler.testing.service", "--port", str(host.port()), "--name", "other", sim_mb=1024)
        evicted = api.run.wait_kind("action.finished", action="evict:comfyui")
        assert evicted["status"] == "done", evicted
        started = api.run.seen("action.started", action="evict:comfyui")
        assert "GPU 0 is over-committed (9216 MB booked on 8192 MB)" in started[0]["message"], started
        status = api.wait_status(lambda s: not over_conditions(s) and converged(s), "relieved and converged")
        assert status["gpus"][0]["over_committed_mb"] == 0
        assert host.pids() == {"tts": tts}
    finally:
        api.close()


SLOT = """\
  batch:
    max_mb: 2048
    priority: 2
    shared: true
    max_concurrent: 4
"""


def test_kill_9_mid_eviction_then_restart_finishes_it_without_ever_over_committing(host: Host) -> None:
    """The issue's scenario (golden 61, then a crash): a full GPU — ``keep`` (always_on) and ``comfyui``
    (priority 5, which ignores SIGTERM, so its eviction takes the whole eviction_timeout_s) — and ``tts``
    (always_on, priority 6: it may not evict comfyui) waiting for 2048 MB. A lease on the unmanaged
    slot ``batch`` evicts comfyui, and the 2048 MB that eviction frees beyond the slot's let ``tts``
    start in the same plan — only after the eviction (``[after: evict:comfyui]``). The reconciler is
    killed with SIGKILL in the middle of that eviction. The next one finds the interrupted eviction
    (comfyui still runs: undone, nothing waits for it any more), and once the client asks again, finishes
    it. Sampled every 100 ms throughout, from outside: the GPU's processes plus the slot's lease never book
    more than 8192 MB, no service has two processes; at the end nothing is orphaned, no intent is open,
    and the status is converged with no over-commit."""
    ports = {"keep": host.port(), "comfyui": host.port(), "tts": host.port()}
    blocks = [service("keep", ports["keep"], mb=4096, priority=3, always_on=True),
              service("comfyui", ports["comfyui"], mb=4096, priority=5, args="--ignore-sigterm")]
    host.write(profile(*blocks, SLOT))
    first = ApiRun(host)
    sampler = Sampler(host)
    with sampler.running():
        try:
            first.wait_converged()
            lease = first.lease("comfyui", holder="e2e", ttl_s=2)
            assert lease.status_code == 200, lease.text
            first.http.delete(f"/v1/leases/{lease.json()['id']}")
            first.wait_converged()  # comfyui stays (never idle-stopped): the GPU is full
            comfyui = host.pids()["comfyui"]
            host.write(profile(*blocks, service("tts", ports["tts"], mb=2048, priority=6, always_on=True), SLOT))
            first.wait_status(lambda s: any(p["service"] == "tts" for p in s["pending"]), "tts waits for room")

            asking = threading.Thread(target=ask, args=(first.url, "batch"), daemon=True)
            asking.start()
            first.run.wait_kind("action.started", action="evict:comfyui")
            time.sleep(0.5)  # SIGTERM sent (and ignored); the driver waits out eviction_timeout_s, 2 s
            first.run.kill()
            asking.join(30)
        finally:
            first.close()
        assert alive(comfyui) and "tts" not in host.pids()  # interrupted mid-eviction: nothing started for it
        assert ("action.started", "start:tts") not in actions(first)

        second = ApiRun(host)
        try:
            recovered = second.run.wait_kind("intent.recovered", service="comfyui")
            assert recovered["action"] == "evict:comfyui", recovered
            status = second.wait_status(lambda s: s["plan"] is not None and any(
                p["service"] == "tts" for p in s["pending"]), "tts waits again")
            assert host.pids()["comfyui"] == comfyui  # undone: nothing needs the eviction any more
            assert not over_conditions(status)
            granted = second.lease("batch", holder="e2e", ttl_s=120, wait_s=30)  # the client asks again
            assert granted.status_code == 200, granted.text
            status = second.wait_converged(30)
            assert not over_conditions(status) and status["gpus"][0]["over_committed_mb"] == 0
            # one plan evicted comfyui, granted the slot and started tts — tts only once the eviction was done
            second.run.wait_for(lambda e: e["kind"] == "pass.finished" and "start:tts" in e["actions"],
                                what="the pass that started tts")
            planned = set(second.run.events[-1]["actions"])
            assert {"evict:comfyui", "lease:" + granted.json()["id"], "start:tts"} <= planned, planned
            kinds = actions(second)
            assert kinds.index(("action.started", "start:tts")) > kinds.index(("action.finished", "evict:comfyui"))
            pids = host.pids()
            assert set(pids) == {"keep", "tts"} and not alive(comfyui)  # finished this time
            wait_until(lambda: sorted(p.pid for p in host.our_processes()) == sorted(pids.values()),
                       what="no orphan")
            with open_store(host.state_dir, SYSTEM_CLOCK) as store:
                assert store.open_intents() == []
        finally:
            second.close()
    assert sampler.peaks and max(sampler.peaks) <= GPU_MB, max(sampler.peaks)
    assert sampler.duplicates == set()
