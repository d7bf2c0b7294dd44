"""ProcessDriver with real processes: argv safety, env, logs, SIGTERM/SIGKILL, invariant 1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from reconciler.core.launch import launch_spec
from reconciler.core.profile import Service
from reconciler.core.snapshot import Instance
from reconciler.drivers.base import LaunchRequest, Waiter
from reconciler.drivers.process import ProcessDriver, is_alive
from reconciler.errors import DriverError

CHILD = r'''
import json, os, signal, subprocess, sys, time
mode = sys.argv[1]
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif mode == "note-term":
    def note(*_):
        print("got SIGTERM", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, note)
elif mode == "group":
    marker = sys.argv[2]
    subprocess.Popen([sys.executable, __file__, "ignore-term", marker])
    while not os.path.exists(marker):
        time.sleep(0.01)
if mode == "ignore-term" and len(sys.argv) > 2:
    open(sys.argv[2] + ".pid", "w").write(str(os.getpid()))
    os.rename(sys.argv[2] + ".pid", sys.argv[2])
keys = ["FOO", "CUDA_VISIBLE_DEVICES", "RECONCILER_SIM_GPU_MB"]
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys}}))
print("ready", flush=True)
time.sleep(120)
'''


@pytest.fixture
def child(tmp_path) -> Path:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return path


@pytest.fixture
def driver(tmp_path):
    drv = ProcessDriver(tmp_path / "state", waiter=Waiter(interval_s=0.02))
    yield drv
    # kill whatever a test left behind, by the groups it started
    for pid in getattr(drv, "started", []):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def service(child: Path, args: str, **managed) -> Service:
    spec = {"type": "process", "exec_path": sys.executable, "args_template": f"{shlex.quote(str(child))} {args}"}
    spec.update(managed)
    return Service(max_mb=6500, priority=2, managed=spec)


async def start(driver: ProcessDriver, svc: Service, name="svc", gpu=None, model=None, sim=False):
    started = await driver.start(LaunchRequest.of(name, svc, gpu, model, sim=sim))
    driver.started = [*getattr(driver, "started", []), started.pid]
    return started


def wait_for_log(path: Path, text: str, timeout_s: float = 15.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if content.count(text) >= 1:
            return content
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {path}: {path.read_text() if path.exists() else ''}")


def report(log: str) -> dict:
    return json.loads(next(line for line in log.splitlines() if line.startswith("{")))


def instance_of(started, origin="started", create_time=None, name="svc") -> Instance:
    return Instance(service=name, origin=origin, pid=started.pid,
                    create_time=started.create_time if create_time is None else create_time)


def test_start_passes_argv_env_cwd_and_logs(driver, child, monkeypatch):
    monkeypatch.setenv("RECONCILER_SIM_GPU_MB", "999")  # inherited value must not leak through
    svc = service(child, "note-term --model {model} --gpu={gpu_id}", env={"FOO": "bar {model}"})
    model = "qwen 2.5; touch /tmp/pwned"

    async def scenario():
        started = await start(driver, svc, gpu=1, model=model, sim=True)
        assert started.launch == launch_spec("svc", svc, 1, model)
        assert started.log_path == driver.state_dir / "logs" / "svc.log"
        assert driver.is_alive(started.pid, started.create_time)
        assert os.getsid(started.pid) == started.pid  # its own session and process group
        log = wait_for_log(started.log_path, "ready")
        seen = report(log)
        assert seen["argv"] == ["note-term", "--model", model, "--gpu=1"]
        assert seen["cwd"] == str(driver.state_dir)
        assert seen["env"] == {"FOO": f"bar {model}", "CUDA_VISIBLE_DEVICES": "1", "RECONCILER_SIM_GPU_MB": "6500"}
        assert "reconciler: starting svc" in log
        result = await driver.stop(instance_of(started), timeout_s=10)
        assert (result.outcome, result.signals, result.memory_freed) == ("stopped", ["SIGTERM"], None)
        assert "got SIGTERM" in started.log_path.read_text()
        assert not is_alive(started.pid, started.create_time)

    asyncio.run(scenario())


def test_no_gpu_no_sim_variables_and_spec_cwd(driver, child, tmp_path, monkeypatch):
    monkeypatch.setenv("RECONCILER_SIM_GPU_MB", "999")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()

    async def scenario():
        started = await start(driver, service(child, "plain", cwd=str(workdir)), gpu=None, sim=True)
        seen = report(wait_for_log(started.log_path, "ready"))
        assert seen["env"] == {"FOO": None, "CUDA_VISIBLE_DEVICES": None, "RECONCILER_SIM_GPU_MB": None}
        assert seen["cwd"] == str(workdir)
        await driver.stop(instance_of(started), timeout_s=10)

    asyncio.run(scenario())


def test_missing_executable_names_path_and_service(driver, tmp_path):
    missing = Service(max_mb=0, priority=1, managed={"type": "process", "exec_path": str(tmp_path / "nope/vllm")})
    on_path = Service(max_mb=0, priority=1, managed={"type": "process", "exec_path": "no-such-binary-xyz"})
    with pytest.raises(DriverError, match=r"vllm-svc: executable .*nope/vllm not found"):
        asyncio.run(driver.start(LaunchRequest.of("vllm-svc", missing, None, None)))
    with pytest.raises(DriverError, match=r"other: executable no-such-binary-xyz not found on PATH"):
        asyncio.run(driver.start(LaunchRequest.of("other", on_path, None, None)))
    with pytest.raises(DriverError, match="not a managed process"):
        container = Service(max_mb=0, priority=1, managed={"type": "docker", "image": "busybox"})
        asyncio.run(driver.start(LaunchRequest.of("slot", container, None, None)))


def test_sigkill_escalation_when_sigterm_is_ignored(driver, child):
    async def scenario():
        started = await start(driver, service(child, "ignore-term"))
        wait_for_log(started.log_path, "ready")
        result = await driver.stop(instance_of(started), timeout_s=0.3)
        assert (result.outcome, result.signals) == ("killed", ["SIGTERM", "SIGKILL"])
        assert not is_alive(started.pid, started.create_time)

    asyncio.run(scenario())


def test_sigkill_reaches_a_child_in_the_group_that_ignores_sigterm(driver, child, tmp_path):
    marker = tmp_path / "grandchild"

    async def scenario():
        started = await start(driver, service(child, f"group {shlex.quote(str(marker))}"))
        wait_for_log(started.log_path, "ready")
        grandchild = psutil.Process(int(marker.read_text()))
        assert os.getpgid(grandchild.pid) == started.pid
        result = await driver.stop(instance_of(started), timeout_s=0.3)
        assert (result.outcome, result.signals) == ("killed", ["SIGTERM", "SIGKILL"])
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE

    asyncio.run(scenario())


def test_no_sigkill_when_the_pid_was_taken_by_another_process_during_the_sigterm_wait(driver, child, monkeypatch):
    """Invariant 1 at the escalation: the leader's identity is checked again right before SIGKILL."""
    real_create_time = psutil.Process.create_time

    class Reusing(Waiter):
        async def until(self, condition, timeout_s):
            # while we waited, our process "ended" and its pid went to a process started later
            monkeypatch.setattr(psutil.Process, "create_time",
                                lambda proc: real_create_time(proc) + (100 if proc.pid == started.pid else 0))
            return False

    async def scenario():
        nonlocal started
        started = await start(driver, service(child, "ignore-term"))
        wait_for_log(started.log_path, "ready")
        driver.waiter = Reusing()
        return await driver.stop(instance_of(started), timeout_s=0.3)

    started = None
    result = asyncio.run(scenario())
    monkeypatch.setattr(psutil.Process, "create_time", real_create_time)
    assert (result.outcome, result.signals) == ("stopped", ["SIGTERM"])
    assert is_alive(started.pid, started.create_time)  # the "other" process was not killed


def test_reused_pid_and_adopted_instances_are_never_signalled(driver, child):
    async def scenario():
        started = await start(driver, service(child, "note-term"))
        wait_for_log(started.log_path, "ready")
        impostor = instance_of(started, create_time=started.create_time - 100)  # the pid now "belongs" elsewhere
        result = await driver.stop(impostor, timeout_s=0.2)
        assert (result.outcome, result.signals) == ("gone", [])
        assert "now belongs to a process started at" in result.reason
        adopted = instance_of(started, origin="adopted")
        result = await driver.stop(adopted, timeout_s=0.2)
        assert (result.outcome, result.signals, result.ok) == ("refused", [], False)
        assert "never signalled" in result.reason
        anonymous = Instance(service="svc", origin="started")
        assert (await driver.stop(anonymous, timeout_s=0.2)).outcome == "refused"
        # nothing reached it: the real stop still finds it alive and it sees exactly one SIGTERM
        assert is_alive(started.pid, started.create_time)
        result = await driver.stop(instance_of(started), timeout_s=10)
        assert (result.outcome, result.signals) == ("stopped", ["SIGTERM"])
        assert started.log_path.read_text().count("got SIGTERM") == 1

    asyncio.run(scenario())


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def dead_instance() -> Instance:
    proc = psutil.Process()
    return Instance(service="svc", origin="started", pid=proc.pid, create_time=proc.create_time() - 50)


def test_memory_wait_polls_until_freed(tmp_path):
    clock = FakeClock()
    drv = ProcessDriver(tmp_path, waiter=Waiter(clock=clock, sleep=clock.sleep, interval_s=0.5))
    answers = iter([False, False, True])
    calls = []

    async def freed() -> bool:
        calls.append(clock.now)
        return next(answers)

    result = asyncio.run(drv.stop(dead_instance(), timeout_s=5, memory_freed=freed, memory_timeout_s=10))
    assert (result.outcome, result.memory_freed, result.memory_timed_out) == ("gone", True, False)
    assert calls == [0.0, 0.5, 1.0] and result.memory_wait_s == 1.0


def test_memory_wait_reports_a_timeout(tmp_path):
    clock = FakeClock()
    drv = ProcessDriver(tmp_path, waiter=Waiter(clock=clock, sleep=clock.sleep, interval_s=0.5))
    calls = []

    async def never() -> bool:
        calls.append(clock.now)
        return False

    result = asyncio.run(drv.stop(dead_instance(), timeout_s=5, memory_freed=never, memory_timeout_s=2))
    assert result.outcome == "gone" and result.memory_timed_out
    assert "memory not freed within 2 s" in result.reason
    assert calls == [0.0, 0.5, 1.0, 1.5, 2.0] and clock.now == 2.0


def test_memory_wait_is_skipped_for_a_refusal(tmp_path):
    async def boom() -> bool:
        raise AssertionError("must not be polled")

    adopted = Instance(service="svc", origin="adopted", pid=os.getpid(), create_time=psutil.Process().create_time())
    result = asyncio.run(ProcessDriver(tmp_path).stop(adopted, timeout_s=1, memory_freed=boom))
    assert result.outcome == "refused" and result.memory_freed is None


def test_is_alive_checks_create_time():
    me = psutil.Process()
    assert is_alive(me.pid, me.create_time())
    assert is_alive(me.pid, me.create_time() + 0.9)
    assert not is_alive(me.pid, me.create_time() + 5)
    assert not is_alive(2**22 + 12345, 0.0)


def test_simulated_gpu_backend_sees_a_process_started_under_sim(driver, child):
    from reconciler.host.sim import SimBackend, SimGpu

    backend = SimBackend([SimGpu(total_mb=8192), SimGpu(total_mb=8192)])

    async def scenario():
        started = await start(driver, service(child, "plain"), gpu=1, sim=True)
        wait_for_log(started.log_path, "ready")
        gpus = backend.read()
        assert [(p.pid, p.used_mb) for p in gpus[1].processes] == [(started.pid, 6500)]
        assert gpus[0].processes == []
        await driver.stop(instance_of(started), timeout_s=10)
        assert backend.read()[1].processes == []

    try:
        asyncio.run(scenario())
    finally:
        backend.close()


def test_find_ours_rebuilds_what_a_launch_runs_from_its_marker_and_takes_the_group_leader(driver, child, tmp_path,
                                                                                          monkeypatch):
    marker = tmp_path / "grandchild"
    monkeypatch.setenv("RECONCILER_INSTANCE", '{"service": "inherited"}')  # a marker of ours is never inherited
    svc = service(child, f"group {shlex.quote(str(marker))} --model {{model}}", env={"FOO": "bar", "EMPTY": ""})

    async def scenario():
        request = LaunchRequest.of("svc", svc, 1, "qwen", intent=7)
        started = await driver.start(request)
        driver.started = [started.pid]
        wait_for_log(started.log_path, "ready")
        grandchild = int(marker.read_text())  # carries the same markers, in the same process group
        assert psutil.Process(grandchild).environ()["RECONCILER_INSTANCE"] == driver.instance_marker(request)
        return started, grandchild

    started, grandchild = asyncio.run(scenario())
    [found] = driver.find_ours()
    assert (found.service, found.pid, found.gpu, found.model) == ("svc", started.pid, 1, "qwen")
    assert abs(found.create_time - started.create_time) <= 1 and found.launched == driver.intent_marker(7)
    assert found.launch == started.launch  # argv from /proc, cwd as written, the profile's env keys, the port
    assert ProcessDriver(tmp_path / "another-state-dir").find_ours() == []  # another state directory's: not ours
    assert grandchild != found.pid
