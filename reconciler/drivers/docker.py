"""The Docker driver: run a service as a container labelled as ours, stop only those.

``start`` runs ``docker run -d --name reconciler-<service> --label
reconciler.managed=true --label reconciler.service=<service> [--gpus device=<gpu>]
[--runtime …] [--ipc …] -p host_port:port -v … -e … image cmd…`` — an argv list
through an asyncio subprocess, never a shell. A service spanning several GPUs
gets ``--gpus '"device=0,1"'`` as a shell would pass it: docker splits the
value as CSV, so the double quotes are part of the argument (``device=0,1``
alone would read as ``device=0`` and a stray ``1``). Under a simulated GPU there
is no ``--gpus`` (no NVIDIA runtime to ask); the container gets
``CUDA_VISIBLE_DEVICES`` (``0,1`` for a pair) and ``RECONCILER_SIM_GPU_MB``
instead, as processes do.

``stop`` enforces invariant 1 for containers: it ``docker inspect``s the
container first and acts only on one carrying ``reconciler.managed=true``,
our service label and — when the driver has an owner, as the runtime's always
does (its state directory) — our ``reconciler.owner``, so two reconcilers on one
Docker daemon never take each other's containers; then ``docker stop -t <timeout>`` (Docker escalates to
SIGKILL itself) and ``docker rm``.

Tests run against a fake ``docker`` executable put first on ``PATH`` (this
project's CI machines have no Docker engine); it records each argv and answers
``inspect`` from a small JSON state file.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
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


def container_name(service_name: str) -> str:
    return f"reconciler-{service_name}"


class DockerDriver(Driver):
    """Starts and stops containers through the ``docker`` CLI."""

    kind = "docker"

    def __init__(self, docker: str = "docker", *, waiter: Waiter | None = None, owner: str | None = None):
        self.docker = docker
        self.waiter = waiter or Waiter()
        self.owner = owner  # when set, containers carry it and only those carrying it are ours

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
            "run", "-d", "--name", container_name(service_name),
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
        if spec.port:
            argv += ["-p", f"{spec.host_port or spec.port}:{spec.port}"]
        for volume in spec.volumes:
            argv += ["-v", volume]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        return [*argv, launch.image, *launch.argv]

    async def start(self, request: LaunchRequest) -> StartedContainer:
        argv = self.run_argv(request)
        service_name, launch = request.service, request.launch
        name = container_name(service_name)
        existing = await self.inspect(name)
        if existing is not None:
            if not self.ours(existing, service_name):
                raise DriverError(f"service {service_name}: a container named {name} exists and is not ours")
            if existing.get("State", {}).get("Running"):
                raise DriverError(f"service {service_name}: our container {name} is already running")
            await self._checked("rm", name)  # a stopped leftover of ours
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
        name = instance.container or container_name(service)
        info = await self.inspect(name)
        if info is None:
            return StopResult("gone", f"container {name} does not exist any more; nothing stopped")
        if not self.ours(info, service):
            return StopResult(
                "refused", f"container {name} does not carry {MANAGED_LABEL}=true and {SERVICE_LABEL}={service}"
            )
        await self._checked("stop", "-t", str(math.ceil(timeout_s)), name, timeout_s=timeout_s + COMMAND_TIMEOUT_S)
        await self._checked("rm", name)
        return StopResult("stopped", f"container {name} stopped and removed", ["docker stop"])

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
