"""The Docker driver: run a service as a container labelled as ours, stop and remove only those.

``start`` runs ``docker run -d --name reconciler-<service>-<owner> --label
reconciler.managed=true --label reconciler.service=<service> --label
reconciler.owner=<state dir> [--gpus device=<gpu>] [--runtime …] [--ipc …]
-p host_ip:host_port:port -v … -e … image cmd…`` — an argv list through an
asyncio subprocess, never a shell.

* **Published on loopback.** ``-p`` alone publishes on every interface of the
  host (Docker's default), which would put a model server on the network
  behind the operator's back; the port is published on the spec's ``host_ip``,
  ``127.0.0.1`` unless the profile says otherwise (``0.0.0.0`` for every
  interface, or one address of the node), as the API and the gateway listen
  on loopback unless told. The probe, status URLs and the gateway reach it
  there (``Service.url_host``).
* **Named per state directory.** The name carries the first 8 hex digits of
  the SHA-256 of the owner (the state directory): two reconcilers on one
  Docker daemon, each with a service called ``tts``, each get their own
  container instead of the second failing on a name that is taken. A driver
  without an owner (tools, tests) names it ``reconciler-<service>``.
* **GPUs.** A service spanning several GPUs gets ``--gpus '"device=0,1"'`` as
  a shell would pass it: docker splits the value as CSV, so the double quotes
  are part of the argument (``device=0,1`` alone would read as ``device=0``
  and a stray ``1``). Under a simulated GPU there is no ``--gpus`` (no NVIDIA
  runtime to ask); the container gets ``CUDA_VISIBLE_DEVICES`` (``0,1`` for a
  pair) and ``RECONCILER_SIM_GPU_MB`` instead, as processes do.

``stop`` enforces invariant 1 for containers: it ``docker inspect``s the
container first and acts only on one carrying ``reconciler.managed=true``,
our service label and — when the driver has an owner, as the runtime's always
does (its state directory) — our ``reconciler.owner``, so two reconcilers on one
Docker daemon never take each other's containers; then ``docker stop -t <timeout>`` (Docker escalates to
SIGKILL itself) and ``docker rm``. Nothing the reconciler stops is left
behind, and neither is a container of ours that exited on its own
(:meth:`DockerDriver.remove_exited`, called when the runtime finds it dead):
its output is lost with it, so before any removal the driver appends the
container's last :data:`LOG_TAIL` lines of output to the service's log file
(``<state dir>/logs/<service>.log``, where a process service's output goes),
after a line saying which container they came from and why it went.

Unit tests run against a fake ``docker`` executable put first on ``PATH``
that records each argv and answers ``inspect`` from a small JSON state file;
``tests/test_e2e_docker.py`` runs the reconciler against a real engine
(skipped, saying why, where none runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler.core.profile import DockerSpec
from reconciler.core.snapshot import Instance
from reconciler.drivers.base import Driver, LaunchRequest, StartedContainer, StopResult, Waiter
from reconciler.drivers.process import SIM_GPU_MB_ENV
from reconciler.errors import DriverError

MANAGED_LABEL = "reconciler.managed"
SERVICE_LABEL = "reconciler.service"
OWNER_LABEL = "reconciler.owner"  # which reconciler (its state directory): two may share a Docker daemon
COMMAND_TIMEOUT_S = 120.0
LOG_TAIL = 1000  # lines of a container's output kept in the service's log file when it is removed


def container_name(service_name: str, owner: str | None = None) -> str:
    """``reconciler-<service>``, with ``-<8 hex digits of the owner's hash>`` when there is an owner."""
    if owner is None:
        return f"reconciler-{service_name}"
    return f"reconciler-{service_name}-{hashlib.sha256(owner.encode()).hexdigest()[:8]}"


class DockerDriver(Driver):
    """Starts and stops containers through the ``docker`` CLI."""

    kind = "docker"

    def __init__(self, docker: str = "docker", *, waiter: Waiter | None = None, owner: str | None = None,
                 log_dir: Path | None = None):
        self.docker = docker
        self.waiter = waiter or Waiter()
        self.owner = owner  # when set, containers carry it and only those carrying it are ours
        self.log_dir = log_dir  # where a removed container's last output is kept (None: not kept)

    def container_name(self, service_name: str) -> str:
        """The name of this reconciler's container for ``service_name``."""
        return container_name(service_name, self.owner)

    def ours(self, info: dict[str, Any], service: str) -> bool:
        """Whether ``docker inspect`` output is a container this reconciler started for ``service``."""
        labels = (info.get("Config") or {}).get("Labels") or {}
        owned = self.owner is None or labels.get(OWNER_LABEL) == self.owner
        return labels.get(MANAGED_LABEL) == "true" and labels.get(SERVICE_LABEL) == service and owned

    def run_argv(self, request: LaunchRequest) -> list[str]:
        """The ``docker run`` argv (without the executable) for a service."""
        service_name, service, gpu = request.service, request.spec, request.gpu
        sim, launch = request.sim, request.launch
        spec = service.managed
        if not isinstance(spec, DockerSpec):
            raise DriverError(f"service {service_name} is not a managed container; the docker driver cannot start it")
        assert launch.image is not None
        argv = [
            "run", "-d", "--name", self.container_name(service_name),
            "--label", f"{MANAGED_LABEL}=true", "--label", f"{SERVICE_LABEL}={service_name}",
        ]
        if self.owner is not None:
            argv += ["--label", f"{OWNER_LABEL}={self.owner}"]
        env = dict(launch.env)
        if gpu is not None and sim:
            env.update({"CUDA_VISIBLE_DEVICES": request.device_list,
                        SIM_GPU_MB_ENV: str(service.ceiling_mb(request.model))})
        elif len(request.devices) > 1:
            # docker reads --gpus as CSV: several devices need the quotes inside the value itself
            argv += ["--gpus", f'"device={request.device_list}"']
        elif gpu is not None:
            argv += ["--gpus", f"device={gpu}"]
        if spec.runtime:
            argv += ["--runtime", spec.runtime]
        if spec.ipc:
            argv += ["--ipc", spec.ipc]
        if spec.publish:
            argv += ["-p", spec.publish]
        for volume in spec.volumes:
            argv += ["-v", volume]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        return [*argv, launch.image, *launch.argv]

    async def start(self, request: LaunchRequest) -> StartedContainer:
        argv = self.run_argv(request)
        service_name, launch = request.service, request.launch
        name = self.container_name(service_name)
        existing = await self.inspect(name)
        if existing is not None:
            if not self.ours(existing, service_name):
                raise DriverError(f"service {service_name}: a container named {name} exists and is not ours")
            if existing.get("State", {}).get("Running"):
                raise DriverError(f"service {service_name}: our container {name} is already running")
            await self._remove(name, service_name, "a leftover of ours, replaced by a new start")
        out = await self._checked(*argv)
        return StartedContainer(container=name, container_id=out.strip(), launch=launch)

    async def inspect(self, name: str) -> dict[str, Any] | None:
        """``docker inspect`` of one container; None when there is none by that name."""
        rc, out, err = await self._docker("inspect", name)
        if rc != 0:
            if "no such" in err.lower():
                return None
            raise DriverError(f"docker inspect {name} failed: {err.strip() or f'exit {rc}'}")
        try:
            data = json.loads(out)
        except ValueError:
            raise DriverError(f"docker inspect {name}: the answer is not JSON") from None
        return data[0] if isinstance(data, list) and data else None

    async def _stop(self, instance: Instance, timeout_s: float) -> StopResult:
        service = instance.service
        if instance.origin != "started":
            return StopResult("refused", f"{service} is {instance.origin}, not started by us: it is never stopped")
        name = instance.container or self.container_name(service)
        info = await self.inspect(name)
        if info is None:
            return StopResult("gone", f"container {name} does not exist any more; nothing stopped")
        if not self.ours(info, service):
            return StopResult(
                "refused", f"container {name} does not carry {MANAGED_LABEL}=true and {SERVICE_LABEL}={service}"
            )
        await self._checked("stop", "-t", str(math.ceil(timeout_s)), name, timeout_s=timeout_s + COMMAND_TIMEOUT_S)
        await self._remove(name, service, "stopped by the reconciler")
        return StopResult("stopped", f"container {name} stopped and removed", ["docker stop"])

    async def remove_exited(self, instance: Instance) -> str | None:
        """Remove the container of an instance of ours found dead, once it has exited; what was done, or None.

        Only a container carrying our labels (invariant 1) that is not running is removed: one that runs
        again (a daemon restart policy, someone's ``docker start``) is left alone.
        """
        if instance.origin != "started" or not instance.container:
            return None
        info = await self.inspect(instance.container)
        if info is None or not self.ours(info, instance.service):
            return None
        state = info.get("State") or {}
        if state.get("Running"):
            return None
        why = f"exited on its own (exit status {state.get('ExitCode', '?')})"
        await self._remove(instance.container, instance.service, why)
        return f"container {instance.container} {why}: removed"

    async def _remove(self, name: str, service: str, why: str) -> None:
        """``docker rm`` a container of ours, its last output kept in the service's log file first."""
        await self._keep_logs(name, service, why)
        await self._checked("rm", name)

    async def _keep_logs(self, name: str, service: str, why: str) -> None:
        if self.log_dir is None:
            return
        rc, out, err = await self._docker("logs", "--tail", str(LOG_TAIL), name)
        if rc != 0:
            return  # no logs to keep (a log driver that cannot be read back): the removal goes on
        with contextlib.suppress(OSError):  # an unwritable log directory must not keep a container alive
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            with (self.log_dir / f"{service}.log").open("a", encoding="utf-8") as log:
                log.write(f"--- {stamp} container {name} removed ({why}); its last output "
                          f"(stdout, then stderr), at most {LOG_TAIL} lines each:\n")
                log.write(out)
                log.write(err)

    async def _checked(self, *args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        rc, out, err = await self._docker(*args, timeout_s=timeout_s)
        if rc != 0:
            raise DriverError(f"docker {args[0]} failed (exit {rc}): {err.strip() or out.strip()}")
        return out

    async def _docker(self, *args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> tuple[int, str, str]:
        executable = shutil.which(self.docker)
        if executable is None:
            raise DriverError(f"docker CLI {self.docker!r} not found on PATH")
        proc = await asyncio.create_subprocess_exec(
            executable, *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise DriverError(f"docker {args[0]} did not answer within {timeout_s:g} s") from None
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")
