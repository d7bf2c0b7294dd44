"""The observer end to end: real processes, probes and a fake Ollama, folded into a Snapshot."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import UTC, datetime

import psutil
import pytest

from reconciler.core.profile import Profile
from reconciler.core.snapshot import Demand, Gpu, GpuProcess, Instance, Lease, Snapshot
from reconciler.errors import GpuBackendError
from reconciler.host.gpu import open_gpu_backend
from reconciler.host.observer import Observer, is_ollama
from reconciler.host.ollama_api import OllamaApi
from reconciler.testing.clock import FakeClock
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)

NOW = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)


def profile(**services) -> Profile:
    return Profile.model_validate({"schema_version": 1, "name": "test", "services": services})


def managed(port: int, **extra) -> dict:
    return {"type": "process", "exec_path": "/opt/svc", "port": port, **extra}


def ollama_service(port: int) -> dict:
    return {
        "max_mb": 6000, "priority": 1,
        "managed": managed(port, exec_path="/usr/local/bin/ollama", args_template="serve",
                           adopt=True, health_path="/api/tags"),
    }


def adopted(service: str, pid: int, gpu: int | None = 0, create_time: float | None = None) -> Instance:
    return Instance(service=service, origin="adopted", pid=pid, gpu=gpu,
                    create_time=create_time if create_time is not None else psutil.Process(pid).create_time())


class FixedGpus:
    name = "fixed"

    def __init__(self, gpus):
        self.gpus, self.closed = gpus, False

    def read(self):
        return self.gpus

    def close(self):
        self.closed = True


def observe(prof, backend, instances=(), leases=(), demands=()) -> Snapshot:
    async def run():
        async with Observer(prof, backend, node="box", clock=FakeClock(NOW)) as observer:
            return await observer.observe(instances, leases, demands)
    return asyncio.run(run())


def test_snapshot_of_a_simulated_host(spawner):
    vllm = spawner.service(name="vllm", env={"RECONCILER_SIM_GPU_MB": "3000"})
    sick = spawner.service(name="sick", refuse_health=True)
    ollama = spawner.fake_ollama(models="qwen2.5:7b", vram_mb=5800)
    prof = profile(
        vllm={"max_mb": 3000, "priority": 2, "managed": managed(vllm.port)},
        sick={"max_mb": 0, "priority": 3, "managed": managed(sick.port)},
        ollama=ollama_service(ollama.port),
        slot={"max_mb": 500, "priority": 4},  # unmanaged: nothing to probe
    )
    started = Instance(service="vllm", origin="started", pid=vllm.pid, gpu=0,
                       create_time=psutil.Process(vllm.pid).create_time())
    lease = Lease(id="L1", service="vllm", holder="kiwi", gpu=0, mb=3000)
    demand = Demand(id="D1", service="sick", requested_at=NOW)
    snapshot = observe(prof, open_gpu_backend("sim:8192"), [started, adopted("ollama", ollama.pid)], [lease], [demand])

    assert (snapshot.format_version, snapshot.node, snapshot.now) == (1, "box", NOW)
    assert Snapshot.model_validate_json(snapshot.model_dump_json()) == snapshot
    [gpu] = snapshot.gpus
    usage = {p.pid: p.used_mb for p in gpu.processes}
    assert usage[vllm.pid] == 3000  # from the simulated environment
    assert usage[ollama.pid] == 5800  # attributed through /api/ps
    assert gpu.used_mb >= 8800 and gpu.free_mb == 0
    assert set(snapshot.probes) == {"vllm", "sick", "ollama"}
    assert snapshot.probes["vllm"].healthy and snapshot.probes["ollama"].healthy
    assert (snapshot.probes["sick"].healthy, snapshot.probes["sick"].status) == (False, 503)
    listening = {p.pid: p.listening for p in snapshot.processes}
    assert listening[vllm.pid] == [vllm.port] and listening[sick.pid] == [sick.port]
    assert listening[ollama.pid] == [ollama.port]
    assert (snapshot.instances[0], snapshot.leases, snapshot.demands) == (started, [lease], [demand])


def test_ollama_attribution_follows_its_models(spawner):
    ollama = spawner.fake_ollama(models="a,b", vram_mb=1000, unload_delay=0)  # unloads as it answers
    prof = profile(ollama=ollama_service(ollama.port))
    backend = FixedGpus([Gpu(index=0, total_mb=8192, used_mb=2100, processes=[GpuProcess(pid=1, used_mb=100)])])
    before = observe(prof, backend, [adopted("ollama", ollama.pid)])
    assert [(p.pid, p.used_mb) for p in before.gpus[0].processes] == [(1, 100), (ollama.pid, 2000)]
    assert (before.gpus[0].used_mb, before.gpus[0].free_mb) == (2100, 6092)  # already counted by NVML

    async def unload():
        async with OllamaApi(ollama.port) as api:
            await api.unload_all()
    asyncio.run(unload())
    after = observe(prof, backend, [adopted("ollama", ollama.pid)])
    assert (ollama.pid, 0) in [(p.pid, p.used_mb) for p in after.gpus[0].processes]  # attributed: nothing


def test_ollama_seen_by_nvml_is_not_asked(spawner):
    ollama = spawner.fake_ollama(vram_mb=5800)
    backend = FixedGpus([Gpu(index=0, total_mb=8192, used_mb=4000,
                             processes=[GpuProcess(pid=ollama.pid, used_mb=4000)])])
    snapshot = observe(profile(ollama=ollama_service(ollama.port)), backend, [adopted("ollama", ollama.pid)])
    assert [(p.pid, p.used_mb) for p in snapshot.gpus[0].processes] == [(ollama.pid, 4000)]


def test_ollama_runner_child_counts_as_attributed(spawner):
    """NVML sees the runner, a child of `ollama serve`: the lineage is in the snapshot, no API guess."""
    ollama = spawner.fake_ollama(vram_mb=5800)
    runner = subprocess.Popen(["sleep", "30"])  # stands in for a runner: its parent is this test
    try:
        backend = FixedGpus([Gpu(index=0, total_mb=8192, used_mb=700,
                                 processes=[GpuProcess(pid=runner.pid, used_mb=700)])])
        me = Instance(service="ollama", origin="adopted", pid=os.getpid(), gpu=0,
                      create_time=psutil.Process().create_time())
        prof = profile(ollama=ollama_service(ollama.port))
        snapshot = observe(prof, backend, [me])
        by_pid = {p.pid: p for p in snapshot.processes}
        assert by_pid[runner.pid].ppid == os.getpid() and os.getpid() in by_pid
        assert [(p.pid, p.used_mb) for p in snapshot.gpus[0].processes] == [(runner.pid, 700)]
    finally:
        runner.kill()
        runner.wait()


def test_dead_or_unhealthy_ollama_is_not_attributed(spawner):
    ollama = spawner.fake_ollama(vram_mb=5800)
    backend = FixedGpus([Gpu(index=0, total_mb=8192)])
    prof = profile(ollama=ollama_service(ollama.port))
    stale = adopted("ollama", ollama.pid, create_time=psutil.Process(ollama.pid).create_time() - 100)
    assert observe(prof, backend, [stale]).gpus[0].processes == []
    sick = spawner.service(refuse_health=True, health_path="/api/tags")
    prof = profile(ollama=ollama_service(sick.port))
    assert observe(prof, backend, [adopted("ollama", sick.pid)]).gpus[0].processes == []


def test_gpu_failure_is_reported_and_nothing_is_left_running():
    class Broken(FixedGpus):
        def read(self):
            raise GpuBackendError("NVML reading failed: GPU is lost")

    backend = Broken([])
    with pytest.raises(GpuBackendError, match="GPU is lost"):
        observe(profile(x={"max_mb": 1, "priority": 1, "managed": managed(1)}), backend)
    assert backend.closed


def test_profile_update_changes_what_is_probed(spawner):
    a, b = spawner.service(), spawner.service()

    async def run():
        async with Observer(profile(a={"max_mb": 0, "priority": 1, "managed": managed(a.port)}),
                            FixedGpus([]), clock=FakeClock(NOW)) as observer:
            first = await observer.observe()
            client = observer.prober.client
            observer.update_profile(profile(b={"max_mb": 0, "priority": 1, "managed": managed(b.port)}))
            second = await observer.observe()
            assert observer.prober.client is client
            return first, second

    first, second = asyncio.run(run())
    assert list(first.probes) == ["a"] and list(second.probes) == ["b"]
    assert [p.pid for p in first.processes] == [a.pid] and [p.pid for p in second.processes] == [b.pid]
    assert first.gpus == []


@pytest.mark.parametrize(
    "service, expected",
    [
        ({"backend": "ollama"}, True),
        ({"managed": {"type": "process", "exec_path": "/usr/bin/ollama"}}, True),
        ({"managed": {"type": "docker", "image": "ollama/ollama:0.5"}}, True),
        ({"managed": {"type": "process", "exec_path": "/x", "health_path": "/api/tags"}}, True),
        ({"managed": {"type": "process", "exec_path": "/usr/bin/vllm"}}, False),
    ],
)
def test_is_ollama(service, expected):
    prof = profile(s={"max_mb": 1, "priority": 1, **service})
    assert is_ollama(prof.services["s"]) is expected
