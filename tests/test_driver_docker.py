"""DockerDriver against a fake ``docker`` executable (no Docker engine here).

The fake records every argv to ``calls.jsonl`` beside itself and keeps the
containers it knows in ``containers.json``; ``inspect`` answers from there.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from reconciler.core.profile import Service
from reconciler.core.snapshot import Instance
from reconciler.drivers.base import LaunchRequest
from reconciler.drivers.docker import DockerDriver
from reconciler.errors import DriverError

FAKE_DOCKER = r'''#!{python}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
state_path = os.path.join(here, "containers.json")
state = json.load(open(state_path)) if os.path.exists(state_path) else {{}}
def save():
    json.dump(state, open(state_path, "w"))
cmd = args[0]
if cmd == "inspect":
    c = state.get(args[1])
    if c is None:
        sys.stderr.write("Error: No such object: " + args[1] + "\n"); sys.exit(1)
    print(json.dumps([{{"Id": c["id"], "Name": "/" + args[1], "Config": {{"Labels": c["labels"]}},
                       "State": {{"Running": c["running"], "Pid": 4321, "ExitCode": 0 if c["running"] else 137}}}}]))
elif cmd == "run":
    name = args[args.index("--name") + 1]
    labels = dict(a.split("=", 1) for p, a in zip(args, args[1:]) if p == "--label")
    if "bad/image" in args:
        sys.stderr.write("Unable to find image 'bad/image'\n"); sys.exit(125)
    state[name] = {{"id": "c0ffee" + name, "labels": labels, "running": True}}
    save(); print(state[name]["id"])
elif cmd == "stop":
    state[args[-1]]["running"] = False; save(); print(args[-1])
elif cmd == "rm":
    state.pop(args[-1]); save(); print(args[-1])
elif cmd == "logs":
    print("out of " + args[-1]); sys.stderr.write("err of " + args[-1] + "\n")
else:
    sys.stderr.write("fake docker: unknown command " + cmd + "\n"); sys.exit(2)
'''


class FakeDocker:
    def __init__(self, directory: Path):
        self.dir = directory
        path = directory / "docker"
        path.write_text(FAKE_DOCKER.format(python=sys.executable))
        path.chmod(0o755)

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def containers(self) -> dict:
        path = self.dir / "containers.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def add(self, name: str, labels: dict[str, str], running: bool = True) -> None:
        state = self.containers()
        state[name] = {"id": "x" + name, "labels": labels, "running": running}
        (self.dir / "containers.json").write_text(json.dumps(state))


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeDocker:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return FakeDocker(bin_dir)


COMFY = Service(
    max_mb=6144,
    priority=3,
    managed={
        "type": "docker",
        "image": "ghcr.io/org/comfyui:1.2",
        "port": 8188,
        "host_port": 18188,
        "command_template": "--listen 0.0.0.0 --port {port} --model {model}",
        "volumes": ["/srv/models:/models:ro", "/srv/out:/out"],
        "env": {"MODEL": "{model}", "HF_HOME": "/models"},
        "runtime": "nvidia",
        "ipc": "host",
    },
)
MODEL = "sd xl; rm -rf /"
OURS = {"reconciler.managed": "true", "reconciler.service": "comfyui"}


def test_run_argv_is_recorded_exactly(fake):
    started = asyncio.run(DockerDriver().start(LaunchRequest.of("comfyui", COMFY, 1, MODEL)))
    assert started.container == "reconciler-comfyui"
    assert started.container_id == "c0ffeereconciler-comfyui"
    assert started.launch.image == "ghcr.io/org/comfyui:1.2"
    assert fake.calls() == [
        ["inspect", "reconciler-comfyui"],
        ["run", "-d", "--name", "reconciler-comfyui",
         "--label", "reconciler.managed=true", "--label", "reconciler.service=comfyui",
         "--gpus", "device=1", "--runtime", "nvidia", "--ipc", "host", "-p", "127.0.0.1:18188:8188",
         "-v", "/srv/models:/models:ro", "-v", "/srv/out:/out",
         "-e", f"MODEL={MODEL}", "-e", "HF_HOME=/models",
         "ghcr.io/org/comfyui:1.2", "--listen", "0.0.0.0", "--port", "8188", "--model", MODEL],
    ]


def test_simulated_gpu_uses_env_instead_of_gpus(fake):
    minimal = Service(max_mb=512, priority=1, managed={"type": "docker", "image": "img"})
    asyncio.run(DockerDriver().start(LaunchRequest.of("tts", minimal, 0, None, sim=True)))
    assert fake.calls()[-1] == [
        "run", "-d", "--name", "reconciler-tts", "--label", "reconciler.managed=true",
        "--label", "reconciler.service=tts", "-e", "CUDA_VISIBLE_DEVICES=0", "-e", "RECONCILER_SIM_GPU_MB=512", "img",
    ]


def test_stop_ours_stops_then_removes(fake):
    fake.add("reconciler-comfyui", OURS)
    instance = Instance(service="comfyui", origin="started", container="reconciler-comfyui")
    result = asyncio.run(DockerDriver().stop(instance, timeout_s=2.5))
    assert (result.outcome, result.signals) == ("stopped", ["docker stop"])
    assert fake.calls() == [
        ["inspect", "reconciler-comfyui"], ["stop", "-t", "3", "reconciler-comfyui"], ["rm", "reconciler-comfyui"],
    ]
    assert fake.containers() == {}


def test_stop_refused_without_our_label(fake):
    fake.add("reconciler-comfyui", {"maintainer": "someone"})
    fake.add("reconciler-other", {"reconciler.managed": "true", "reconciler.service": "other"})
    driver = DockerDriver()
    result = asyncio.run(driver.stop(Instance(service="comfyui", origin="started"), timeout_s=1))
    assert (result.outcome, result.signals) == ("refused", [])
    assert "reconciler.managed=true" in result.reason
    # our managed label but another service's: not this instance's container either
    other = Instance(service="comfyui", origin="started", container="reconciler-other")
    assert asyncio.run(driver.stop(other, timeout_s=1)).outcome == "refused"
    assert [c[0] for c in fake.calls()] == ["inspect", "inspect"]
    assert set(fake.containers()) == {"reconciler-comfyui", "reconciler-other"}


def test_adopted_is_never_stopped_and_missing_is_gone(fake):
    driver = DockerDriver()
    result = asyncio.run(driver.stop(Instance(service="comfyui", origin="adopted"), timeout_s=1))
    assert result.outcome == "refused" and fake.calls() == []
    result = asyncio.run(driver.stop(Instance(service="comfyui", origin="started"), timeout_s=1))
    assert (result.outcome, fake.calls()) == ("gone", [["inspect", "reconciler-comfyui"]])


def test_start_over_existing_containers(fake):
    driver = DockerDriver()
    fake.add("reconciler-comfyui", {"maintainer": "someone"})
    with pytest.raises(DriverError, match="exists and is not ours"):
        asyncio.run(driver.start(LaunchRequest.of("comfyui", COMFY, 0, None)))
    fake.add("reconciler-comfyui", OURS, running=True)
    with pytest.raises(DriverError, match="already running"):
        asyncio.run(driver.start(LaunchRequest.of("comfyui", COMFY, 0, None)))
    fake.add("reconciler-comfyui", OURS, running=False)
    asyncio.run(driver.start(LaunchRequest.of("comfyui", COMFY, 0, None)))
    assert [c[0] for c in fake.calls()] == ["inspect", "inspect", "inspect", "rm", "run"]


def test_docker_failures_are_driver_errors(fake, monkeypatch):
    bad = Service(max_mb=0, priority=1, managed={"type": "docker", "image": "bad/image"})
    with pytest.raises(DriverError, match="docker run failed \\(exit 125\\): Unable to find image"):
        asyncio.run(DockerDriver().start(LaunchRequest.of("x", bad, None, None)))
    with pytest.raises(DriverError, match="not a managed container"):
        process = Service(max_mb=0, priority=1, managed={"type": "process", "exec_path": "/bin/true"})
        asyncio.run(DockerDriver().start(LaunchRequest.of("x", process, None, None)))
    with pytest.raises(DriverError, match="'no-docker-here' not found on PATH"):
        asyncio.run(DockerDriver("no-docker-here").stop(Instance(service="x", origin="started"), 1))


def test_a_container_of_another_reconciler_is_never_stopped(fake):
    mine, theirs = DockerDriver(owner="/state/mine"), DockerDriver(owner="/state/theirs")
    started = asyncio.run(theirs.start(LaunchRequest.of("comfyui", COMFY, 1, MODEL)))
    run = fake.calls()[-1]
    assert run[run.index("reconciler.owner=/state/theirs") - 1] == "--label"
    instance = Instance(service="comfyui", origin="started", container=started.container)
    result = asyncio.run(mine.stop(instance, timeout_s=1))
    assert result.outcome == "refused"
    assert [c[0] for c in fake.calls()] == ["inspect", "run", "inspect"]  # no stop, no rm
    assert fake.containers()[started.container]["running"] is True
    assert asyncio.run(theirs.stop(instance, timeout_s=1)).ok


def with_docker(**changes: object) -> Service:
    managed = {**COMFY.managed.model_dump(exclude_none=True), **changes}  # type: ignore[union-attr]
    return Service(max_mb=COMFY.max_mb, priority=COMFY.priority, managed=managed)


@pytest.mark.parametrize(("host_ip", "published", "url"), [
    (None, "127.0.0.1:18188:8188", "http://127.0.0.1:18188"),  # loopback unless the profile says where
    ("0.0.0.0", "0.0.0.0:18188:8188", "http://127.0.0.1:18188"),  # every interface: probed on loopback
    ("192.168.7.2", "192.168.7.2:18188:8188", "http://192.168.7.2:18188"),  # one address: probed there
    ("::1", "[::1]:18188:8188", "http://[::1]:18188"),
    ("[::]", "[::]:18188:8188", "http://[::1]:18188"),
])
def test_the_port_is_published_on_host_ip_loopback_by_default(fake, host_ip, published, url):
    spec = with_docker(host_ip=host_ip) if host_ip is not None else COMFY
    argv = DockerDriver().run_argv(LaunchRequest.of("comfyui", spec, 1, MODEL))
    assert argv[argv.index("-p") + 1] == published
    assert spec.base_url == url


def test_a_host_ip_that_is_not_an_address_is_refused():
    with pytest.raises(ValueError, match="host_ip must be an IP address"):
        with_docker(host_ip="localhost")


def test_each_state_directory_names_its_own_containers(fake):
    mine, theirs = DockerDriver(owner="/state/mine"), DockerDriver(owner="/state/theirs")
    a = asyncio.run(mine.start(LaunchRequest.of("comfyui", COMFY, 1, MODEL)))
    b = asyncio.run(theirs.start(LaunchRequest.of("comfyui", COMFY, 1, MODEL)))
    assert a.container != b.container  # both run: no clash on one daemon
    assert a.container.startswith("reconciler-comfyui-") and len(a.container) == len("reconciler-comfyui-") + 8
    assert set(fake.containers()) == {a.container, b.container}


def test_an_exited_container_of_ours_is_removed_with_its_output_kept(fake, tmp_path):
    logs = tmp_path / "logs"
    driver = DockerDriver(owner="/state/mine", log_dir=logs)
    started = asyncio.run(driver.start(LaunchRequest.of("comfyui", COMFY, 1, MODEL)))
    instance = Instance(service="comfyui", origin="started", container=started.container)
    assert asyncio.run(driver.remove_exited(instance)) is None  # still running: left alone
    fake.add(started.container, {**OURS, "reconciler.owner": "/state/mine"}, running=False)
    done = asyncio.run(driver.remove_exited(instance))
    assert done == f"container {started.container} exited on its own (exit status 137): removed"
    assert started.container not in fake.containers()
    kept = (logs / "comfyui.log").read_text()
    assert f"container {started.container} removed (exited on its own" in kept
    assert f"out of {started.container}" in kept and f"err of {started.container}" in kept


def test_an_exited_container_of_another_reconciler_is_never_removed(fake):
    fake.add("reconciler-comfyui-theirs", {**OURS, "reconciler.owner": "/state/theirs"}, running=False)
    instance = Instance(service="comfyui", origin="started", container="reconciler-comfyui-theirs")
    assert asyncio.run(DockerDriver(owner="/state/mine").remove_exited(instance)) is None
    assert "reconciler-comfyui-theirs" in fake.containers()
    assert [c[0] for c in fake.calls()] == ["inspect"]


def test_stop_keeps_the_last_output_and_removes_the_container(fake, tmp_path):
    driver = DockerDriver(owner="/state/mine", log_dir=tmp_path / "logs")
    started = asyncio.run(driver.start(LaunchRequest.of("comfyui", COMFY, 1, MODEL)))
    instance = Instance(service="comfyui", origin="started", container=started.container)
    assert asyncio.run(driver.stop(instance, timeout_s=1)).outcome == "stopped"
    assert fake.containers() == {}
    assert [c[0] for c in fake.calls()] == ["inspect", "run", "inspect", "stop", "logs", "rm"]
    assert "removed (stopped by the reconciler)" in (tmp_path / "logs" / "comfyui.log").read_text()
