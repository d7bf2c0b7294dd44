"""`reconciler observe` as a real command: simulated GPU, real service, store inventory."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import psutil
from ruamel.yaml import YAML

from reconciler.core.snapshot import Demand, Instance, Lease, Snapshot
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.store import open_store
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)


def reconciler(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args], capture_output=True, text=True, timeout=60
    )


def write_profile(tmp_path, port: int):
    path = tmp_path / "profile.yaml"
    path.write_text(
        "schema_version: 1\nname: demo\nvram_total_mb: 8192\nservices:\n"
        "  vllm:\n    max_mb: 3000\n    priority: 2\n"
        f"    managed: {{type: process, exec_path: /opt/vllm, port: {port}}}\n"
    )
    return path


def test_observe_prints_a_snapshot(spawner, tmp_path):
    svc = spawner.service(env={"RECONCILER_SIM_GPU_MB": "3000"})
    profile = write_profile(tmp_path, svc.port)
    state = tmp_path / "state"
    result = reconciler("observe", "--profile", str(profile), "--gpu", "sim:8192", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    snapshot = Snapshot.model_validate_json(result.stdout)
    assert [(g.total_mb, g.uuid) for g in snapshot.gpus] == [(8192, "SIM-GPU-0")]
    assert (svc.pid, 3000) in [(p.pid, p.used_mb) for p in snapshot.gpus[0].processes]
    assert snapshot.probes["vllm"].healthy
    assert svc.pid in [p.pid for p in snapshot.processes]
    assert (snapshot.instances, snapshot.leases, snapshot.demands) == ([], [], [])
    assert not state.exists()  # observing never creates a store


def test_observe_reads_the_store_inventory_and_writes_yaml(spawner, tmp_path):
    svc = spawner.service()
    profile = write_profile(tmp_path, svc.port)
    now = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)
    instance = Instance(service="vllm", origin="started", pid=svc.pid, gpu=0,
                        create_time=psutil.Process(svc.pid).create_time(), since=now)
    lease = Lease(id="L1", service="vllm", holder="kiwi", gpu=0, mb=3000, expires_at=now)
    demand = Demand(id="D1", service="vllm", holder="batch", requested_at=now, ttl_s=None)
    with open_store(tmp_path / "state", SYSTEM_CLOCK) as store:
        store.put_instance(instance)
        assert store.grant_lease(lease, 1, now=now)
        store.add_demand(demand)
    result = reconciler("observe", "--profile", str(profile), "--gpu", "sim", "--state-dir",
                        str(tmp_path / "state"), "--node", "box", "--format", "yaml")
    assert result.returncode == 0, result.stderr
    snapshot = Snapshot.model_validate(YAML(typ="safe").load(result.stdout))
    assert snapshot.node == "box"
    assert [g.total_mb for g in snapshot.gpus] == [8192]  # bare sim: the profile's vram_total_mb
    assert [i.pid for i in snapshot.instances] == [svc.pid]
    assert [x.id for x in snapshot.leases] == ["L1"]
    assert snapshot.demands[0].ttl_s is None  # a null that means "none" survives the round trip


def test_bad_gpu_spec_is_an_error_without_traceback(tmp_path):
    profile = write_profile(tmp_path, 18080)
    result = reconciler("observe", "--profile", str(profile), "--gpu", "cuda:0")
    assert result.returncode == 1
    assert "unknown GPU backend 'cuda:0'" in result.stderr and "sim:8192" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
