"""Which driver acts on which instance.

A managed ``process`` service starts with the :class:`ProcessDriver`, a
``docker`` one with the :class:`DockerDriver`; an instance is stopped by the
driver that started it (a container name means Docker). An adopted instance
is never stopped; evicting one is allowed only where a driver can free its
memory without killing it — an Ollama, through the :class:`OllamaDriver`,
which unloads its models. Every driver enforces invariant 1 itself; nothing
here signals anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from reconciler.core.clock import Clock
from reconciler.core.profile import DockerSpec, ProcessSpec, Service, is_ollama
from reconciler.core.snapshot import Instance
from reconciler.drivers.base import Driver
from reconciler.drivers.docker import DockerDriver
from reconciler.drivers.ollama import OllamaDriver
from reconciler.drivers.process import ProcessDriver, is_alive
from reconciler.errors import DriverError


@dataclass
class DriverSet:
    process: ProcessDriver
    docker: DockerDriver
    ollama: Callable[[Service], OllamaDriver] = OllamaDriver.for_service

    @classmethod
    def default(cls, state_dir: Path, clock: Clock) -> DriverSet:
        owner = str(Path(state_dir).resolve())
        process = ProcessDriver(state_dir, clock=clock)
        return cls(process=process, docker=DockerDriver(owner=owner, log_dir=Path(state_dir) / "logs"))

    def starter(self, name: str, spec: Service) -> Driver:
        if isinstance(spec.managed, ProcessSpec):
            return self.process
        if isinstance(spec.managed, DockerSpec):
            return self.docker
        raise DriverError(f"{name} has no `managed:` block: an unmanaged slot is never started")

    def stopper(self, instance: Instance) -> Driver:
        """The driver that stops an instance we started."""
        return self.docker if instance.container else self.process

    def evicter(self, instance: Instance, spec: Service | None) -> Driver | None:
        """For an adopted instance: the driver that frees its memory without killing it, if any."""
        if spec is not None and is_ollama(spec) and spec.probe_port is not None:
            return self.ollama(spec)
        return None

    async def alive(self, instance: Instance) -> bool:
        """Whether an instance we started still runs: its pid with its create_time, or a running
        container carrying our labels."""
        if instance.container:
            info = await self.docker.inspect(instance.container)
            if info is None or not self.docker.ours(info, instance.service):
                return False
            return bool((info.get("State") or {}).get("Running"))
        if instance.pid is None or instance.create_time is None:
            return False
        return is_alive(instance.pid, instance.create_time)

    async def container_identity(self, container: str) -> dict[str, Any]:
        """``container``, plus its main process's pid and create_time where this host can see it.

        With those, a container is alive or dead by the same identity rule as a
        process (DESIGN §3), with or without a port to probe.
        """
        identity: dict[str, Any] = {"container": container}
        info = await self.docker.inspect(container)
        pid = ((info or {}).get("State") or {}).get("Pid") or 0
        if pid > 0:
            with contextlib.suppress(psutil.Error):  # another PID namespace (a remote daemon): the probe decides
                identity.update(pid=pid, create_time=psutil.Process(pid).create_time())
        return identity

    def exit_note(self, instance: Instance) -> str:
        """' (exit status N; log: path)' for a process of ours that ended, where known."""
        if instance.container or instance.pid is None:
            return ""
        code = self.process.exit_code(instance.pid)
        status = f"exit status {code}; " if code is not None else ""
        return f" ({status}log: {self.process.log_path(instance.service)})"
