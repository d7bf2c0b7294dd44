"""A store that cannot be written (another process holds its write lock) refuses the lease routes with 503 and
leaves memory as if the requests never happened: a grouped commit that fails is undone whole."""

from __future__ import annotations

import sqlite3

from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host, host  # noqa: F401


def test_a_locked_store_refuses_vram_grant_and_release_and_memory_is_unchanged(host: Host) -> None:
    host.write(profile(service("llm", host.port(), mb=3000)))
    run = ApiRun(host)
    try:
        run.wait_status(lambda s: s["gpus"], "the GPU observed")
        kept = run.http.post("/api/leases", json={"node_id": "local", "gpu_id": 0, "mb": 100, "service": "keep",
                                                  "priority": 2, "ttl_s": 0})
        assert kept.status_code == 200, kept.text
        kept_id = kept.json()["lease"]["lease_id"]
        before = sorted(x["id"] for x in run.status()["leases"])
        locker = sqlite3.connect(host.state_dir / "state.db", isolation_level=None, timeout=5)
        try:
            locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock: every write fails
            refused = run.http.post("/api/leases", json={"node_id": "local", "gpu_id": 0, "mb": 200,
                                                         "service": "new", "priority": 2, "ttl_s": 0})
            assert refused.status_code == 503, refused.text
            gone = run.http.delete(f"/api/leases/{kept_id}")
            assert gone.status_code == 503, gone.text
            assert sorted(x["id"] for x in run.status()["leases"]) == before  # nothing granted, nothing released
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert run.http.delete(f"/api/leases/{kept_id}").status_code == 200
        assert [x for x in run.status()["leases"] if x["id"] == kept_id] == []
    finally:
        run.close()
