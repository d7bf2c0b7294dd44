"""End to end (issue 8.9): another process holding the SQLite write lock blocks nothing that must answer.

A ``sqlite3`` shell (here: the test's own connection) opens a write transaction on
``state.db`` and keeps it for a few seconds, while lease requests keep asking and
passes keep running. The loop's store fails fast on a locked database (a busy
timeout of 0.1 s, :data:`reconciler.runtime.assembly.LOOP_BUSY_TIMEOUT_S`)
instead of waiting up to 10 s with the event loop stuck behind it, so:
``/api/health`` and ``/v1/status`` keep answering at once, a lease request that
needs a write is refused with a 503 that names the lock (never a hang), the
failure is reported once as ``store.failed``, the services keep running, and
once the lock is gone the loop carries on by itself (``store.recovered``, the
next lease granted). After the first write that met the lock, the others do
not wait for it at all (``busy_timeout = 0`` until a write gets through, see
:mod:`reconciler.store.sqlite`): without that, two clients' lease requests
kept the event loop waiting 0.1 s each and health took 0.3 s. The bounds
(median 0.25 s, max 1 s) are far above the few ms measured here and far
below what the defect does; the measured figures are printed.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import httpx

from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host, alive, host  # noqa: F401

HOLD_S = 4.0


def test_health_and_status_answer_at_once_while_another_process_holds_the_write_lock(host: Host) -> None:
    host.write(profile(service("alpha", host.port(), always_on=True), service("beta", host.port(), max_concurrent=8)))
    api = ApiRun(host, "--resync", "0.5")  # a pass every half second: each needs the store
    stop = threading.Event()
    answers: list[int] = []

    def traffic() -> None:  # lease requests all along: each one is a write
        with httpx.Client(base_url=api.url, timeout=30) as http:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    answers.append(http.post("/v1/leases", json={"service": "beta", "holder": "t", "ttl_s": 1,
                                                                 "wait_s": 1}).status_code)
                time.sleep(0.05)

    try:
        pid = api.wait_converged()["instances"][0]["pid"]
        shell = sqlite3.connect(host.state_dir / "state.db", timeout=0, isolation_level=None)
        workers = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
        for worker in workers:
            worker.start()
        health: list[float] = []
        status: list[float] = []
        try:
            shell.execute("BEGIN IMMEDIATE")  # the write lock, held as a forgotten sqlite3 shell would
            locked = time.monotonic()
            while time.monotonic() - locked < HOLD_S:
                began = time.monotonic()
                assert api.http.get("/api/health").status_code == 200
                health.append(time.monotonic() - began)
                began = time.monotonic()
                assert api.http.get("/v1/status").status_code == 200
                status.append(time.monotonic() - began)
                time.sleep(0.02)
            refused = api.lease("beta", holder="t", wait_s=1)
            assert refused.status_code == 503, refused.text
            assert "locked" in refused.json()["detail"], refused.text
        finally:
            shell.execute("ROLLBACK")
            shell.close()
        failed = api.run.wait_kind("store.failed")
        assert "locked" in failed["message"], failed
        api.run.wait_kind("store.recovered")
        stop.set()
        for worker in workers:
            worker.join(30)
        granted = api.lease("beta", holder="t", ttl_s=5, wait_s=10)
        assert granted.status_code == 200, granted.text
        print(f"\nwrite lock held {HOLD_S:g} s: {len(health)} health answers, max {1000 * max(health):.0f} ms, "
              f"median {1000 * sorted(health)[len(health) // 2]:.1f} ms; status max {1000 * max(status):.0f} ms; "
              f"lease answers {sorted(set(answers))}")
        assert sorted(health)[len(health) // 2] < 0.25, health  # ms here; 0.29 s before the fix
        assert max(health) < 1.0, health
        assert max(status) < 1.0, status
        assert 503 in answers  # the traffic met the lock, and was answered
        assert api.run.process.poll() is None and alive(pid)
        assert "Traceback" not in api.run.stderr()
    finally:
        stop.set()
        api.close()
