"""Containers through the runtime, against a fake ``docker`` CLI (no Docker engine here).

The fake runs each "container" as a real sleeping process with the ``-e``
variables in its environment (so the simulated GPU sees its memory), and
answers ``inspect`` with its labels, ``Running`` and ``Pid`` — as Docker does
on a local daemon, whose container processes this host can see.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import psutil
import pytest

from reconciler.drivers.docker import MANAGED_LABEL, OWNER_LABEL, SERVICE_LABEL, container_name
from tests.runtime_support import env, make_profile  # noqa: F401 (fixture)

FAKE_DOCKER = r'''#!{python}
import json, os, signal, subprocess, sys
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
path = os.path.join(here, "containers.json")
state = json.load(open(path)) if os.path.exists(path) else {{}}
def alive(pid):
    try:
        with open(f"/proc/{{pid}}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
cmd = args[0]
if cmd == "inspect":
    c = state.get(args[1])
    if c is None:
        sys.stderr.write("Error: No such object: " + args[1] + "\n"); sys.exit(1)
    running = alive(c["pid"])
    print(json.dumps([{{"Id": c["id"], "Config": {{"Labels": c["labels"]}},
                       "State": {{"Running": running, "Pid": c["pid"] if running else 0}}}}]))
elif cmd == "run":
    name = args[args.index("--name") + 1]
    labels = dict(a.split("=", 1) for p, a in zip(args, args[1:]) if p == "--label")
    env = dict(os.environ, **dict(a.split("=", 1) for p, a in zip(args, args[1:]) if p == "-e"))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state[name] = {{"id": "c0ffee" + name, "labels": labels, "pid": proc.pid}}
    json.dump(state, open(path, "w")); print(state[name]["id"])
elif cmd == "stop":
    c = state[args[-1]]
    if alive(c["pid"]):
        os.kill(c["pid"], signal.SIGKILL)
        while alive(c["pid"]):
            pass
    print(args[-1])
elif cmd == "rm":
    state.pop(args[-1]); json.dump(state, open(path, "w")); print(args[-1])
'''

WORKER = {"max_mb": 2000, "priority": 2, "always_on": True,
          "managed": {"type": "docker", "image": "ghcr.io/example/worker:1", "command_template": "--gpu {gpu_id}"}}


class FakeDocker:
    def __init__(self, directory):
        self.dir = directory
        (directory / "docker").write_text(FAKE_DOCKER.format(python=sys.executable))
        (directory / "docker").chmod(0o755)

    def calls(self) -> list[str]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line)[0] for line in path.read_text().splitlines()] if path.exists() else []

    def containers(self) -> dict:
        path = self.dir / "containers.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def add(self, name: str, labels: dict[str, str], pid: int) -> None:
        state = self.containers()
        state[name] = {"id": "x" + name, "labels": labels, "pid": pid}
        (self.dir / "containers.json").write_text(json.dumps(state))


@pytest.fixture
def docker(tmp_path, monkeypatch) -> FakeDocker:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return FakeDocker(bin_dir)


def test_a_container_is_started_identified_by_its_process_and_stopped_through_docker(env, docker):
    name = container_name("worker", str(env.state_dir.resolve()))

    async def main():
        async with env.runtime() as rt:
            started = await rt.reconcile(make_profile({"worker": WORKER}))
            instance = rt.store.get_instance("worker")
            assert instance.pid == docker.containers()[name]["pid"]
            again = await rt.reconcile(make_profile({"worker": WORKER}))
            stopped = await rt.reconcile(make_profile({"other": {**WORKER, "always_on": False}}))
            return rt, started, instance, again, stopped

    rt, started, instance, again, stopped = asyncio.run(main())
    assert started.outcomes["start:worker"].status == "done"
    assert instance.container == name and instance.state == "running"
    assert instance.launch.image == "ghcr.io/example/worker:1"
    assert again.plan.actions == []  # alive by (pid, create_time): no second `docker run`
    assert stopped.outcomes["stop:worker"].status == "done"
    assert "2000 MB back on GPU 0" in stopped.outcomes["stop:worker"].detail
    assert docker.calls().count("run") == 1 and docker.calls().count("stop") == 1
    assert docker.containers() == {} and rt.store.instances() == []
    assert not psutil.pid_exists(instance.pid) or psutil.Process(instance.pid).status() == psutil.STATUS_ZOMBIE


def test_recovery_finds_a_container_whose_start_was_interrupted_but_not_someone_elses(env, docker):
    launch = {"argv": ["--gpu", "0"], "cwd": "", "env": {}, "port": None, "image": "ghcr.io/example/worker:1"}
    owner = str(env.state_dir.resolve())
    worker = container_name("worker", owner)
    docker.add(worker, {MANAGED_LABEL: "true", SERVICE_LABEL: "worker", OWNER_LABEL: owner}, os.getpid())
    docker.add(container_name("impostor", owner), {"com.example": "theirs"}, os.getpid())  # our name, not ours

    async def main():
        async with env.runtime() as rt:
            rt.store.begin_intent("start:worker", "start", "worker", {"gpu": 0, "model": None, "launch": launch})
            rt.store.begin_intent("start:impostor", "start", "impostor",
                                  {"gpu": 0, "model": None, "launch": {**launch, "image": "theirs:1"}})
            await rt.recover()
            return {i.service: i for i in rt.store.instances()}, rt.store.open_intents()

    instances, still_open = asyncio.run(main())
    assert list(instances) == ["worker"] and instances["worker"].container == worker
    assert instances["worker"].pid == os.getpid() and instances["worker"].state == "starting"
    assert still_open == [] and "stop" not in docker.calls()


def test_recovery_leaves_a_container_intent_open_when_docker_cannot_answer(env, docker):
    (docker.dir / "docker").write_text(  # the daemon is down: every call fails
        f"#!{sys.executable}\nimport sys\n"
        "sys.stderr.write('Cannot connect to the Docker daemon at unix:///var/run/docker.sock\\n'); sys.exit(1)\n")
    launch = {"argv": ["--gpu", "0"], "cwd": "", "env": {}, "port": None, "image": "ghcr.io/example/worker:1"}

    async def main():
        async with env.runtime() as rt:
            rt.store.begin_intent("start:worker", "start", "worker", {"gpu": 0, "model": None, "launch": launch})
            rt.store.begin_intent("start:other", "start", "other", {"gpu": 0, "model": None, "launch": None})
            await rt.recover()  # does not raise: watch still starts
            return rt.store.open_intents(), rt.store.events(limit=1000)

    still_open, events = asyncio.run(main())
    assert [i.action_id for i in still_open] == ["start:worker"]  # the other was resolved all the same
    [unresolved] = [e for e in events if e.kind == "intent.unresolved"]
    assert unresolved.service == "worker" and "Cannot connect to the Docker daemon" in unresolved.message


def test_the_exited_container_of_a_removed_service_does_not_stay_behind(env, docker):
    name = container_name("worker", str(env.state_dir.resolve()))

    async def main():
        async with env.runtime() as rt:
            await rt.reconcile(make_profile({"worker": WORKER}))
            pid = docker.containers()[name]["pid"]
            os.kill(pid, 9)  # the container's process (the fake's sleeper, started by this test) dies
            while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                await asyncio.sleep(0.01)
            await rt.reconcile(make_profile({"other": {**WORKER, "always_on": False}}))  # worker left the profile
            return rt.store.instances(), rt.store.events(limit=100)

    instances, events = asyncio.run(main())
    assert instances == [] and docker.containers() == {}
    gone = [e for e in events if e.kind == "instance.gone"]
    assert gone and f"container {name} exited on its own" in gone[-1].message
    assert "stop" not in docker.calls()  # it had exited: removed, never stopped
