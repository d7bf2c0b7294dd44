"""Services that span several GPUs (``gpu_count``): formats, checks, planner corners, drivers, sim, runtime.

The golden scenarios 68 to 77 pin the plans; ``test_gpu_sets.py`` the exactness of the set choice;
``test_planner_properties.py`` the invariants over random spanning worlds; ``test_e2e_multi_gpu.py``
a real process on a simulated pair. These are the pieces in between.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.core.accounting import planned_reservations
from reconciler.core.interleavings import memory_moves, peak_extra
from reconciler.core.launch import launch_spec
from reconciler.core.plan import Action, Plan
from reconciler.core.planner import Planner, plan
from reconciler.core.profile import Profile, Service
from reconciler.core.simulate import simulate
from reconciler.core.snapshot import Gpu, GpuProcess, Instance, Snapshot
from reconciler.core.world import World
from reconciler.drivers.base import LaunchRequest
from reconciler.drivers.docker import DockerDriver
from reconciler.drivers.process import ProcessDriver
from reconciler.errors import ProfileError
from reconciler.host.sim import Declaration, EnvScanner, SimBackend, SimGpu, _declaration
from reconciler.loading import parse_profile
from reconciler.runtime.memory import memory_watch
from reconciler.testing.ports import kill_group

ROOT = Path(__file__).resolve().parent.parent
NOW = "2026-11-22T16:00:00Z"
PAIR = {"max_mb": 20000, "priority": 1, "gpu_count": 2, "model": "m",
        "managed": {"type": "process", "exec_path": "/opt/tp/serve", "args_template": "--port {port} --gpus {gpu_ids}",
                    "port": 8000}}


def profile_of(**services: dict) -> Profile:
    return Profile.model_validate({"schema_version": 1, "name": "t", "services": services})


def snapshot_of(*totals: int, **extra: object) -> Snapshot:
    gpus = [{"index": i, "total_mb": t} for i, t in enumerate(totals)]
    return Snapshot.model_validate({"format_version": 1, "node": "local", "now": NOW, "gpus": gpus, **extra})


# --- profile ---------------------------------------------------------------------------------------


def problems(body: str) -> list[str]:
    with pytest.raises(ProfileError) as caught:
        parse_profile("schema_version: 1\nname: t\n" + textwrap.dedent(body), "p.yaml")
    return [str(d) for d in caught.value.diagnostics]


def test_gpu_count_defaults_to_one_and_gpu_ids_is_a_placeholder():
    assert Service(max_mb=1, priority=1).gpu_count == 1
    spec = Service.model_validate(PAIR)
    assert launch_spec("tp", spec, (1, 0), "m").argv == ["/opt/tp/serve", "--port", "8000", "--gpus", "0,1"]
    assert launch_spec("tp", spec, 3, "m").argv[-1] == "3"  # one GPU: {gpu_ids} is that one


def test_gpus_must_list_at_least_gpu_count():
    assert problems("""\
        services:
          tp:
            max_mb: 100
            priority: 1
            gpus: [1]
            gpu_count: 2
        """) == ["p.yaml:8:16: services.tp.gpu_count: gpu_count is 2 but gpus lists only 1 (1); "
                 "list at least 2 GPU indexes or lower gpu_count"]


def test_a_cpu_service_spans_no_gpu():
    assert problems("""\
        services:
          tp:
            max_mb: 0
            priority: 1
            gpu_count: 2
        """)[0].startswith("p.yaml:7:16: services.tp.gpu_count: gpu_count is 2 but max_mb is 0")


def test_every_shipped_and_golden_profile_still_loads():
    from reconciler.loading import load_profile

    for path in [*ROOT.glob("profiles/*.yaml"), *ROOT.glob("golden/*/profile.yaml")]:
        load_profile(path, environ={"CF_PYTHON": "/p", "CF_CORE_DIR": "/c", "CF_MODELS_DIR": "/m",
                                    "COMFYUI_PYTHON": "/p", "COMFYUI_DIR": "/d"})


# --- snapshot and plan formats ----------------------------------------------------------------------------


def test_a_single_gpu_record_reads_and_writes_as_before():
    one = Instance(service="a", gpu=0, origin="started")
    assert "gpus" not in one.model_dump() and '"gpus"' not in one.model_dump_json()
    assert Instance(service="a", gpu=0, gpus=[0], origin="started") == one
    assert one.gpu_set == (0,) and Instance(service="a", origin="started").gpu_set == ()


def test_a_spanning_record_lists_its_gpus_ascending_with_gpu_the_first():
    pair = Instance(service="a", gpu=0, gpus=[1, 0], origin="started")
    assert pair.gpus == [0, 1] and pair.gpu_set == (0, 1)
    assert Instance.model_validate_json(pair.model_dump_json()) == pair
    with pytest.raises(ValueError, match="gpu must be given, and be the first of gpus"):
        Instance(service="a", gpu=1, gpus=[0, 1], origin="started")


def test_single_gpu_plans_have_no_gpus_key():
    result = plan(profile_of(a={"max_mb": 100, "priority": 1, "always_on": True,
                                "managed": {"type": "process", "exec_path": "/a", "port": 8001}}),
                  snapshot_of(8192))
    assert [a.gpu_set for a in result.actions] == [(0,)]
    assert all("gpus" not in action for action in result.to_json_dict()["actions"])


# --- the host's number of GPUs -------------------------------------------------------------------------


def test_more_gpus_than_the_host_has_is_pending_live():
    result = plan(profile_of(tp={**PAIR, "always_on": True}), snapshot_of(24576))
    assert result.actions == []
    assert [p.reason for p in result.pending] == [
        "needs 20000 MB on 2 GPUs (gpu_count 2); this node has 1 GPU"]


def test_plan_refuses_a_gpu_count_larger_than_the_snapshots_gpus(tmp_path, capsys):
    profile = tmp_path / "profile.yaml"
    profile.write_text(textwrap.dedent("""\
        schema_version: 1
        name: t
        services:
          tp:
            max_mb: 100
            priority: 1
            gpu_count: 3
        """))
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_text(f"format_version: 1\nnode: box\nnow: '{NOW}'\ngpus: [{{index: 0, total_mb: 100}}, "
                        "{index: 1, total_mb: 100}]\n")
    assert main(["plan", "--profile", str(profile), "--snapshot", str(snapshot)]) == 1
    err = capsys.readouterr().err
    assert f"{profile}:7:5: gpu_count is 3 but node 'box' has 2 GPUs" in err
    assert main(["validate", str(profile), str(snapshot)]) == 1
    assert f"{profile}:7:5: gpu_count is 3 but node 'box' has 2 GPUs" in capsys.readouterr().out
    assert main(["validate", str(profile)]) == 0  # without a snapshot there is no host to compare with


def test_gpus_on_the_host_too_few_for_gpu_count(tmp_path, capsys):
    profile = tmp_path / "profile.yaml"
    profile.write_text("schema_version: 1\nname: t\nservices:\n  tp:\n    max_mb: 100\n    priority: 1\n"
                       "    gpu_count: 2\n    gpus: [1, 5]\n")
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(json.dumps({"format_version": 1, "node": "box", "now": NOW,
                                    "gpus": [{"index": i, "total_mb": 100} for i in range(3)]}))
    assert main(["plan", "--profile", str(profile), "--snapshot", str(snapshot)]) == 1
    assert "only 1 of the GPUs in gpus are on node 'box' (1)" in capsys.readouterr().err


# --- planner corners -------------------------------------------------------------------------------------


def test_a_demand_for_one_gpu_places_the_pair_around_it():
    demand = {"id": "D1", "service": "tp", "gpu": 2, "requested_at": NOW}
    result = plan(profile_of(tp=PAIR), snapshot_of(24576, 24576, 24576, demands=[demand]))
    start = result.action("start:tp")
    assert start is not None and start.gpu_set == (0, 2)
    lease = result.action("lease:D1")
    assert lease is not None and lease.gpu_set == (0, 2)


def test_a_busy_pair_whose_gpu_count_changed_waits_for_its_leases():
    spec = {**PAIR, "gpu_count": 3}
    launch = launch_spec("tp", Service.model_validate(spec), (0, 1), "m")
    assert launch is not None
    snapshot = snapshot_of(
        24576, 24576, 24576,
        processes=[{"pid": 7, "create_time": 7.0, "cmdline": launch.argv, "listening": [8000]}],
        probes={"tp": {"healthy": True}},
        instances=[{"service": "tp", "gpu": 0, "gpus": [0, 1], "origin": "started", "pid": 7, "create_time": 7.0,
                    "model": "m", "launch": launch.model_dump()}],
        leases=[{"id": "L1", "service": "tp", "gpu": 0, "gpus": [0, 1]}])
    result = plan(profile_of(tp=spec), snapshot)
    assert result.actions == []
    assert [p.reason for p in result.pending] == [
        "restart (gpu_count is 3: it runs on 2 GPUs (GPU 0,1)) waits until its lease ends; "
        "`reconciler restart tp --now` restarts it now"]


def test_an_unmanaged_slot_spanning_two_gpus_books_each():
    slot = {"max_mb": 6000, "priority": 1, "gpu_count": 2}
    snapshot = snapshot_of(8192, 8192, 8192, demands=[{"id": "D1", "service": "slot", "requested_at": NOW}])
    profile = profile_of(slot=slot)
    result = plan(profile, snapshot)
    lease = result.action("lease:D1")
    assert lease is not None and lease.gpu_set == (0, 1) and lease.mb == 6000
    world = World(profile, simulate(profile, snapshot, result))
    world.account()
    assert [world.gpus[g].free for g in range(3)] == [2192, 2192, 8192]
    assert plan(profile, simulate(profile, snapshot, result)).actions == []


def test_nvml_usage_of_an_instances_processes_counts_on_each_of_its_gpus():
    profile = profile_of(tp={**PAIR, "max_mb": 10000})
    snapshot = snapshot_of(
        24576, 24576, 24576,
        processes=[{"pid": 7, "create_time": 7.0, "listening": [8000]},
                   {"pid": 8, "ppid": 7, "create_time": 8.0}],
        instances=[{"service": "tp", "gpu": 0, "gpus": [0, 1], "origin": "started", "pid": 7, "create_time": 7.0}])
    snapshot = snapshot.model_copy(update={"gpus": [
        Gpu(index=0, total_mb=24576, used_mb=12000, processes=[GpuProcess(pid=7, used_mb=12000)]),
        Gpu(index=1, total_mb=24576, used_mb=9000, processes=[GpuProcess(pid=8, used_mb=9000)]),
        Gpu(index=2, total_mb=24576, used_mb=500, processes=[GpuProcess(pid=8, used_mb=500)])]})
    world = World(profile, snapshot)
    world.account()
    held = [world.gpus[g].holders.get("tp") for g in range(3)]
    assert [h.reservation if h else None for h in held] == [12000, 10000, None]  # max(max_mb, seen) on each
    assert [world.gpus[g].foreign for g in range(3)] == [0, 0, 500]  # not one of its GPUs: foreign


# --- every moment of an apply, per GPU ------------------------------------------------------------------


def test_memory_moves_count_on_each_gpu_of_an_action():
    actions = [
        Action(id="evict:pair", kind="evict", service="pair", gpu=0, gpus=[0, 1], mb=20000, reason="r"),
        Action(id="start:new", kind="start", service="new", gpu=1, gpus=[1, 2], mb=8000, reason="r"),
        Action(id="restart:big", kind="restart", service="big", gpu=0, gpus=[0, 3], mb=5000, reason="r"),
    ]
    booked = {("pair", 0): 20000, ("pair", 1): 21000, ("big", 0): 6000, ("big", 2): 4000}
    moves = memory_moves(actions, booked)
    assert moves.given == {("evict:pair", 0): 20000, ("evict:pair", 1): 21000,
                           ("restart:big", 0): 1000, ("restart:big", 2): 4000}
    assert moves.taken == {("start:new", 1): 8000, ("start:new", 2): 8000, ("restart:big", 3): 5000}
    result = Plan(node="n", profile="p", changes=True, actions=actions, pending=[], gpus=[], summary={})
    assert peak_extra(result, booked) == {0: 0, 1: 8000, 2: 8000, 3: 5000}


def test_a_pair_started_after_an_eviction_on_one_gpu_requires_it():
    profile = profile_of(tp=PAIR, low={"max_mb": 8000, "priority": 4,
                                       "managed": {"type": "process", "exec_path": "/low", "port": 8100}})
    snapshot = snapshot_of(
        24576, 24576,
        processes=[{"pid": 6, "create_time": 6.0, "cmdline": ["/low"], "listening": [8100]}],
        instances=[{"service": "low", "gpu": 1, "origin": "started", "pid": 6, "create_time": 6.0,
                    "launch": {"argv": ["/low"], "port": 8100}}],
        demands=[{"id": "D1", "service": "tp", "requested_at": NOW}])
    planner = Planner(profile, snapshot)
    result = planner.run()
    assert [a.id for a in result.actions] == ["evict:low", "start:tp", "lease:D1"]
    assert result.action("start:tp").requires == ["evict:low"]  # type: ignore[union-attr]
    assert planner.over_commits(result) == {}
    assert planned_reservations(World(profile, snapshot), result) == {0: 20000, 1: 20000}


# --- drivers -------------------------------------------------------------------------------------------


def pair_request(sim: bool = False) -> LaunchRequest:
    spec = Service.model_validate({**PAIR, "managed": {"type": "docker", "image": "vllm/vllm-openai:v1",
                                                       "port": 8000, "command_template": "--tp 2"}})
    return LaunchRequest.of("tp", spec, (0, 1), "m", sim=sim)


def test_the_process_driver_shows_every_gpu_of_a_pair(tmp_path):
    spec = Service.model_validate(PAIR)
    request = LaunchRequest.of("tp", spec, [1, 0], "m", sim=True)
    assert (request.gpu, request.gpus, request.devices) == (0, (0, 1), (0, 1))
    env = ProcessDriver(tmp_path).environment(request)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["RECONCILER_SIM_GPU_MB"] == "20000"
    marker = json.loads(env["RECONCILER_INSTANCE"])
    assert (marker["gpu"], marker["gpus"]) == (0, [0, 1])
    one = ProcessDriver(tmp_path).environment(LaunchRequest.of("tp", spec, 1, "m"))
    assert one["CUDA_VISIBLE_DEVICES"] == "1" and "gpus" not in json.loads(one["RECONCILER_INSTANCE"])


def test_the_docker_driver_asks_for_both_devices():
    argv = DockerDriver().run_argv(pair_request())
    assert argv[argv.index("--gpus") + 1] == '"device=0,1"'  # docker reads the value as CSV
    sim = DockerDriver().run_argv(pair_request(sim=True))
    assert "--gpus" not in sim and "CUDA_VISIBLE_DEVICES=0,1" in sim


def test_a_process_found_by_its_marker_keeps_its_gpus(tmp_path):
    driver = ProcessDriver(tmp_path)
    spec = Service.model_validate({**PAIR, "managed": {"type": "process", "exec_path": sys.executable,
                                                       "args_template": "-c 'import time; time.sleep(60)'"}})

    async def scenario():
        started = await driver.start(LaunchRequest.of("tp", spec, (0, 1), "m"))
        try:
            found = [f for f in driver.find_ours() if f.pid == started.pid]
            assert [(f.gpu, f.gpus) for f in found] == [(0, (0, 1))]
        finally:
            kill_group(started.pid)

    asyncio.run(scenario())


# --- the simulated GPU ---------------------------------------------------------------------------------


class FakeProc:
    def __init__(self, env):
        self.env = env

    def environ(self):
        return self.env


def test_a_sim_declaration_names_every_listed_gpu():
    declaration = _declaration(FakeProc({"RECONCILER_SIM_GPU_MB": "700", "CUDA_VISIBLE_DEVICES": "1, 0,1"}))
    assert declaration == ("1", 700) and declaration is not None and declaration.devices == ("1", "0")


def test_sim_memory_counts_on_each_listed_gpu():
    class Fixed(EnvScanner):
        def scan(self):
            return {10: Declaration(("0", "1"), 20000), 11: Declaration(("1", "9"), 100)}

    g0, g1 = SimBackend([SimGpu(total_mb=24576), SimGpu(total_mb=24576)], scanner=Fixed()).read()
    assert [(p.pid, p.used_mb) for p in g0.processes] == [(10, 20000)]
    assert [(p.pid, p.used_mb) for p in g1.processes] == [(10, 20000), (11, 100)]  # GPU 9 is not there
    assert (g0.used_mb, g1.used_mb) == (20000, 20100)


# --- the runtime: a stop waits for the memory on every GPU -----------------------------------------------


class Backend:
    name = "fake"

    def __init__(self, readings: list[list[int]]):
        self.readings = readings

    def read(self) -> list[Gpu]:
        used = self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]
        return [Gpu(index=i, total_mb=24576, used_mb=mb,
                    processes=[GpuProcess(pid=os.getpid(), used_mb=mb)] if mb else []) for i, mb in enumerate(used)]

    def close(self) -> None:
        pass


def test_a_stop_of_a_pair_waits_until_both_gpus_gave_their_memory_back():
    pair = Instance(service="tp", gpu=0, gpus=[0, 1], origin="started", pid=os.getpid(), create_time=0.0)
    backend = Backend([[20000, 20000, 0], [0, 20000, 0], [0, 0, 0]])

    async def scenario():
        freed, expect = await memory_watch(backend, pair, 20000)  # type: ignore[arg-type]
        assert freed is not None and expect == 40000
        assert await freed() is False  # GPU 0 is back, GPU 1 not yet
        assert await freed() is True

    asyncio.run(scenario())
