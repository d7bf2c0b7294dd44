"""``docker`` services against a real Docker engine: start, health, restarts, backoff, ownership, removal.

The image is made without a registry: ``docker import`` of a tarball holding Debian's static busybox
(``busybox-static``) as ``/bin/busybox`` and a ``/www/health`` file, so ``busybox httpd`` answers the
health probe. Each test runs a real ``reconciler watch`` (a simulated GPU: the container gets
``RECONCILER_SIM_GPU_MB`` instead of ``--gpus``) in its own state directory, and removes every container
labelled with that state directory afterwards.

``.ci/run`` installs ``docker.io`` and ``busybox-static`` and starts ``dockerd`` when none answers; where
no engine runs (no root, a sandbox without cgroups) or no static busybox is installed, these tests skip and
say why. The driver's behaviour is also covered against a fake ``docker`` (``tests/test_driver_docker.py``,
``tests/test_runtime_docker.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconciler.drivers.docker import OWNER_LABEL, container_name
from tests.e2e_support import Host, WatchRun, wait_until

IMAGE = "reconciler-test/busybox"
BUSYBOX = Path("/bin/busybox")
WAIT_S = 30.0
DOCKER_SERVICE = """\
  {name}:
    max_mb: 256
    priority: 2
    always_on: true
    start_timeout_s: 20
    probe_interval_s: 0.5
    probe_timeout_s: 1
    managed:
      type: docker
      image: {image}
      command_template: "/bin/busybox httpd -f -p {{port}} -h /www"
      port: 8080
      host_port: {host_port}
      env: {{GREETING: "{greeting}"}}
"""
SLOT = """\
  placeholder:
    max_mb: 0
    priority: 9
"""


def docker(*args: str, timeout_s: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _engine_or_skip() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI (Debian's docker.io provides it; .ci/run installs it and starts dockerd)")
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("the Docker engine did not answer `docker info` within 20 s")
    if info.returncode != 0 or not info.stdout.strip():
        pytest.skip(f"no Docker engine answers (.ci/run starts dockerd as root where it can): "
                    f"{(info.stderr or info.stdout).strip()[:300]}")
    if not BUSYBOX.exists():
        pytest.skip("no /bin/busybox to build the test image from (apt-get install busybox-static)")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``reconciler-test/busybox:1`` (and ``:2``, the same bytes under another tag), imported from a tarball."""
    _engine_or_skip()
    if docker("image", "inspect", f"{IMAGE}:1", check=False).returncode != 0:
        root = tmp_path_factory.mktemp("image")
        (root / "health").write_text("ok\n")
        tarball = root / "image.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(BUSYBOX, arcname="bin/busybox")
            tar.add(root / "health", arcname="www/health")
        docker("import", str(tarball), f"{IMAGE}:1", timeout_s=120)
    docker("tag", f"{IMAGE}:1", f"{IMAGE}:2")
    probe = docker("run", "--rm", "--network", "none", f"{IMAGE}:1", "/bin/busybox", "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"the engine cannot run the busybox image (is /bin/busybox static? busybox-static): "
                    f"{probe.stderr.strip()[:300]}")
    return IMAGE


class DockerHost(Host):
    """A :class:`Host` whose teardown also removes every container labelled with its state directory."""

    @property
    def owner(self) -> str:
        return str(self.state_dir.resolve())

    def container(self, service: str = "web") -> str:
        return container_name(service, self.owner)

    def profile_with(self, *, image: str = f"{IMAGE}:1", greeting: str = "hello", port: int,
                     web: bool = True) -> None:
        blocks = DOCKER_SERVICE.format(name="web", image=image, host_port=port, greeting=greeting) if web else ""
        self.write(f"schema_version: 1\nname: docker-e2e\nvram_total_mb: 8192\neviction_timeout_s: 5\n"
                   f"services:\n{blocks}{SLOT}")

    def ours(self) -> list[str]:
        """Names of every container (running or not) labelled with this state directory."""
        out = docker("ps", "-a", "--filter", f"label={OWNER_LABEL}={self.owner}", "--format", "{{.Names}}").stdout
        return sorted(out.split())

    def inspect(self, name: str) -> dict | None:
        result = docker("inspect", name, check=False)
        return json.loads(result.stdout)[0] if result.returncode == 0 else None

    def close(self) -> None:
        try:
            super().close()
        finally:
            for name in self.ours():
                docker("rm", "-f", name, check=False)


@pytest.fixture
def dhost(image: str, tmp_path: Path) -> Iterator[DockerHost]:
    with DockerHost(tmp_path) as world:
        yield world


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def started(run: WatchRun, service: str = "web") -> dict:
    return run.wait_kind("instance.healthy", timeout_s=WAIT_S, service=service)


def test_a_container_starts_healthy_published_on_loopback_and_is_removed_when_stopped(dhost: DockerHost) -> None:
    port = dhost.port()
    dhost.profile_with(port=port)
    run = dhost.watch()
    started(run)
    name = dhost.container()
    info = dhost.inspect(name)
    assert info is not None and info["State"]["Running"]
    assert info["HostConfig"]["PortBindings"]["8080/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
    labels = info["Config"]["Labels"]
    assert labels["reconciler.managed"] == "true" and labels[OWNER_LABEL] == dhost.owner
    assert "GREETING=hello" in info["Config"]["Env"] and "RECONCILER_SIM_GPU_MB=256" in info["Config"]["Env"]
    assert healthy(port)
    assert dhost.instances()["web"].container == name
    dhost.profile_with(port=port, web=False)  # the service leaves the profile: stopped, and removed
    run.wait_kind("instance.stopped", timeout_s=WAIT_S, service="web")
    assert dhost.ours() == [] and not healthy(port)
    assert "container " + name + " removed (stopped by the reconciler)" in (
        dhost.state_dir / "logs" / "web.log").read_text()


def test_an_env_or_image_change_restarts_the_container(dhost: DockerHost) -> None:
    port = dhost.port()
    dhost.profile_with(port=port)
    run = dhost.watch()
    started(run)
    first = dhost.inspect(dhost.container())
    assert first is not None
    dhost.profile_with(port=port, greeting="bonjour")
    run.wait_kind("action.finished", timeout_s=WAIT_S, action="restart:web", status="done")
    second = dhost.inspect(dhost.container())
    assert second is not None and second["Id"] != first["Id"] and "GREETING=bonjour" in second["Config"]["Env"]
    dhost.profile_with(port=port, greeting="bonjour", image=f"{IMAGE}:2")
    run.wait_kind("action.finished", timeout_s=WAIT_S, action="restart:web", status="done")
    third = dhost.inspect(dhost.container())
    assert third is not None and third["Id"] != second["Id"] and third["Config"]["Image"] == f"{IMAGE}:2"
    assert dhost.ours() == [dhost.container()]  # one container: the old ones were removed
    assert healthy(port)


def test_a_killed_container_is_restarted_after_its_backoff(dhost: DockerHost) -> None:
    port = dhost.port()
    dhost.profile_with(port=port)
    run = dhost.watch()
    started(run)
    first = dhost.inspect(dhost.container())
    assert first is not None
    docker("kill", dhost.container())  # our own test's container
    killed = time.monotonic()
    backoff = run.wait_kind("backoff", timeout_s=WAIT_S, service="web")
    assert backoff["failures"] == 1 and backoff["stalled"] is False
    run.wait_kind("action.finished", timeout_s=WAIT_S, action="start:web", status="done")  # once healthy
    waited = time.monotonic() - killed
    again = dhost.inspect(dhost.container())
    assert again is not None and again["Id"] != first["Id"] and again["State"]["Running"]
    assert waited >= 9, f"restarted {waited:.1f} s after the kill: the first backoff is 10 s"
    wait_until(lambda: healthy(port), what="the new container answers")
    assert dhost.ours() == [dhost.container()]  # the killed one was replaced, not left behind


def test_another_state_directorys_container_is_never_touched(dhost: DockerHost, tmp_path_factory) -> None:
    with DockerHost(tmp_path_factory.mktemp("other")) as other:
        other_port = other.port()
        other.profile_with(port=other_port)
        other_run = other.watch()
        started(other_run)
        theirs = dhost.inspect(other.container())
        assert theirs is not None
        port = dhost.port()
        dhost.profile_with(port=port)  # a service of the same name, on the same daemon
        run = dhost.watch()
        started(run)
        assert dhost.container() != other.container()
        dhost.profile_with(port=port, greeting="changed")  # a restart of ours…
        run.wait_kind("action.finished", timeout_s=WAIT_S, action="restart:web", status="done")
        dhost.profile_with(port=port, web=False)  # …and a stop of ours
        run.wait_kind("instance.stopped", timeout_s=WAIT_S, service="web")
        assert dhost.ours() == []
        still = dhost.inspect(other.container())
        assert still is not None and still["Id"] == theirs["Id"] and still["State"]["Running"]
        assert still["State"]["StartedAt"] == theirs["State"]["StartedAt"]  # never restarted
        assert healthy(other_port)


def test_the_exited_container_of_a_removed_service_does_not_stay_behind(dhost: DockerHost) -> None:
    port = dhost.port()
    dhost.profile_with(port=port)
    run = dhost.watch()
    started(run)
    run.kill()  # the reconciler is down while its container dies and the service leaves the profile
    docker("kill", dhost.container())
    dhost.profile_with(port=port, web=False)
    again = dhost.watch()
    gone = again.wait_kind("instance.gone", timeout_s=WAIT_S, service="web")
    assert "exited on its own" in gone["message"] and "removed" in gone["message"]
    assert dhost.ours() == []
