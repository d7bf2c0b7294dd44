"""End to end: a service spanning two GPUs on a simulated 2 × 24 GB host.

``reconciler watch --gpu sim:2x24576`` starts a real process for a service
with ``gpu_count: 2``: it reads ``CUDA_VISIBLE_DEVICES=0,1`` (the fake service
reports its environment on ``GET /``), its ``{gpu_ids}`` argument is
``0,1``, and the simulated GPUs show its 20000 MB on *each* GPU. Then a more
important single-GPU service that fits beside it on neither GPU evicts it:
the memory comes back on both GPUs, and the newcomer starts on GPU 0.
"""

from __future__ import annotations

import json
import urllib.request

from reconciler.host.sim import EnvScanner, SimBackend, SimGpu
from tests.e2e_support import Host, alive, host, profile_text, service_block, wait_until  # noqa: F401

PAIR = """\
  llama:
    max_mb: 20000
    priority: 3
    gpu_count: 2
    always_on: {always_on}
    start_timeout_s: 5
    probe_interval_s: 0.5
    probe_timeout_s: 0.5
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.service --port {{port}} --name llama-on-{{gpu_ids}}"
      port: {port}
"""


def describe(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
        return json.loads(answer.read())


def used_by(backend: SimBackend, pid: int) -> list[int]:
    """MB the simulated GPUs attribute to ``pid``, per GPU."""
    return [sum(p.used_mb for p in gpu.processes if p.pid == pid) for gpu in backend.read()]


def test_a_pair_runs_on_both_gpus_and_is_evicted_from_both(host: Host) -> None:
    pair_port, single_port = host.port(), host.port()
    gpus = SimBackend([SimGpu(total_mb=24576), SimGpu(total_mb=24576)], scanner=EnvScanner(scope=host.scope))

    host.write(profile_text(PAIR.format(always_on="true", port=pair_port)))
    run = host.watch("--gpu", "sim:2x24576")
    first = run.wait_kind("pass.finished", reason="start")
    assert first["actions"] == ["start:llama"] and first["outcomes"] == {"done": 1}
    run.wait_converged()

    llama = host.instances()["llama"]
    assert (llama.gpu, llama.gpus) == (0, [0, 1])
    seen = describe(pair_port)
    assert seen["cuda_visible_devices"] == "0,1"  # what the process itself reads
    assert seen["name"] == "llama-on-0,1" and seen["sim_gpu_mb"] == "20000"
    assert used_by(gpus, llama.pid) == [20000, 20000]  # its memory on each of its GPUs

    # whisper (one GPU, 8000 MB, more important) fits beside the pair on neither GPU (4576 free on
    # each): the pair is evicted — its memory comes back on both — and whisper starts on GPU 0
    host.write(profile_text(PAIR.format(always_on="false", port=pair_port),
                            service_block("whisper", single_port, mb=8000, priority=1)))
    changed = run.wait_kind("pass.finished", reason="profile")
    assert sorted(changed["actions"]) == ["evict:llama", "start:whisper"], changed
    assert changed["outcomes"] == {"done": 2}
    wait_until(lambda: not alive(llama.pid), what="the pair's process to end")
    instances = host.instances()
    assert set(instances) == {"whisper"}
    whisper = instances["whisper"]
    assert (whisper.gpu, whisper.gpus) == (0, None)
    assert describe(single_port)["cuda_visible_devices"] == "0"
    assert used_by(gpus, whisper.pid) == [8000, 0]
    assert [gpu.used_mb for gpu in gpus.read()] == [8000, 0]  # the pair left nothing behind on either GPU
    run.wait_converged()


def test_the_status_and_the_metrics_show_a_pair_on_each_of_its_gpus(host: Host) -> None:
    from tests.api_support import ApiRun

    host.write(profile_text(PAIR.format(always_on="true", port=host.port())))
    api = ApiRun(host, "--gpu", "sim:2x24576")
    try:
        status = api.wait_converged()
        [llama] = [i for i in status["instances"] if i["service"] == "llama"]
        assert llama["gpu"] == 0 and llama["gpus"] == [0, 1]
        assert [g["services_mb"].get("llama") for g in status["gpus"]] == [20000, 20000]
        metrics = api.http.get("/metrics").text
        assert 'reconciler_instance_gpu{gpu="0",service="llama"} 1.0' in metrics
        assert 'reconciler_instance_gpu{gpu="1",service="llama"} 1.0' in metrics
    finally:
        api.close()
