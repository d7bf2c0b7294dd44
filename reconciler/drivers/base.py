"""What every driver shares: one interface, the results it returns, and the wait for freed memory.

A driver actuates one kind of instance: a local process (:mod:`.process`), a
Docker container (:mod:`.docker`), or an adopted Ollama whose models it unloads
(:mod:`.ollama`). All three are a :class:`Driver`:

* ``start(request)`` launches what a :class:`LaunchRequest` describes — the
  service, its GPU (or every GPU of a service spanning several) and model,
  and its launch spec, computed once by the caller — and returns the identity of what it started (a
  :class:`StartedProcess` or a :class:`StartedContainer`). A driver that
  cannot start anything (Ollama's: it only frees an adopted server's memory)
  says so with a :class:`~reconciler.errors.DriverError`.
* ``stop(instance, …)`` is a template method: the driver's own
  :meth:`Driver._stop` ends the instance (or unloads it), then, when the caller
  passed ``memory_freed`` (e.g. "NVML shows the reservation released"), the
  wait polls it until it holds or ``memory_timeout_s`` passes; a timeout is
  reported in the result, not raised.

Stopping is where invariant 1 lives: a driver signals only an instance we
started, identified by ``(pid, create_time)`` or by our container label, and
an adopted instance is never signalled.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reconciler.core.launch import gpu_tuple, launch_spec
from reconciler.core.profile import Service
from reconciler.core.snapshot import Instance, Launch
from reconciler.errors import DriverError

MemoryFreed = Callable[[], Awaitable[bool]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

StopOutcome = Literal["stopped", "killed", "gone", "unloaded", "refused"]


@dataclass(frozen=True)
class StartedProcess:
    """A process we launched: its identity and what it was launched with."""

    pid: int
    create_time: float
    launch: Launch
    log_path: Path


@dataclass(frozen=True)
class StartedContainer:
    """A container we launched (named ``reconciler-<service>``, labelled as ours)."""

    container: str
    container_id: str
    launch: Launch


@dataclass(frozen=True)
class StopResult:
    """How a stop (or an eviction) went.

    ``outcome``: ``stopped`` (exited after SIGTERM / ``docker stop``), ``killed``
    (needed SIGKILL), ``gone`` (was not running any more; nothing signalled),
    ``unloaded`` (an Ollama's models were unloaded, the server still runs) or
    ``refused`` (not ours to stop; nothing signalled, ``reason`` says why).
    ``memory_freed`` is None when no check was asked for.
    """

    outcome: StopOutcome
    reason: str = ""
    signals: list[str] = field(default_factory=list)
    memory_freed: bool | None = None
    memory_wait_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome != "refused"

    @property
    def memory_timed_out(self) -> bool:
        return self.memory_freed is False


@dataclass(frozen=True)
class LaunchRequest:
    """What to start: a service of the profile, where, with which model, and its launch spec.

    ``gpu`` is the GPU it goes to — the first, for a service spanning several, whose every GPU
    (ascending) is in ``gpus``; :attr:`devices` is the one to ask either way.
    """

    service: str
    spec: Service
    gpu: int | None
    model: str | None
    launch: Launch
    sim: bool = False  # the GPU is simulated: the process declares its memory instead of using it
    intent: int | None = None  # the intent the start is written under (a process carries it as a marker)
    shown_argv: list[str] | None = None  # argv as logs may show it (no expanded ${VAR} value); None: argv
    gpus: tuple[int, ...] = ()  # every GPU of a service spanning several; () for one GPU (or none)

    @property
    def devices(self) -> tuple[int, ...]:
        """Every GPU it goes to, ascending: ``(0, 1)`` for a pair, ``(0,)`` for one, ``()`` for none."""
        if self.gpus:
            return self.gpus
        return (self.gpu,) if self.gpu is not None else ()

    @property
    def device_list(self) -> str:
        """``0,1``: the GPUs as ``CUDA_VISIBLE_DEVICES`` (and docker's ``device=``) name them."""
        return ",".join(map(str, self.devices))

    @classmethod
    def of(cls, service: str, spec: Service, gpu: int | Sequence[int] | None, model: str | None, *,
           sim: bool = False, intent: int | None = None) -> LaunchRequest:
        """The request for ``service`` on ``gpu`` (one GPU, or every GPU it spans) with its launch spec filled
        in; DriverError for an unmanaged slot."""
        devices = gpu_tuple(gpu)
        launch = launch_spec(service, spec, devices, model)
        if launch is None:
            raise DriverError(f"{service} has no `managed:` block: an unmanaged slot is never started")
        return cls(service, spec, devices[0] if devices else None, model, launch, sim=sim, intent=intent,
                   gpus=devices if len(devices) > 1 else ())


Started = StartedProcess | StartedContainer


@dataclass
class Waiter:
    """Clock, sleep and poll interval, injectable so tests run on a fake clock."""

    clock: Clock = time.monotonic
    sleep: Sleep = asyncio.sleep
    interval_s: float = 0.05

    async def until(self, condition: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
        """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
        deadline = self.clock() + timeout_s
        while True:
            if await condition():
                return True
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            await self.sleep(min(self.interval_s, remaining))

    async def memory(self, result: StopResult, memory_freed: MemoryFreed | None, timeout_s: float) -> StopResult:
        """``result`` with the memory wait done, when one was asked for."""
        if memory_freed is None or not result.ok:
            return result
        started = self.clock()
        freed = await self.until(memory_freed, timeout_s)
        reason = result.reason
        if not freed:
            reason = (reason + "; " if reason else "") + f"memory not freed within {timeout_s:g} s"
        return StopResult(result.outcome, reason, result.signals, freed, self.clock() - started)


class Driver(ABC):
    """Starts and stops one kind of instance (see the module docstring)."""

    kind: str = "driver"
    waiter: Waiter

    async def start(self, request: LaunchRequest) -> Started:
        raise DriverError(f"service {request.service}: the {self.kind} driver cannot start anything")

    async def stop(
        self,
        instance: Instance,
        timeout_s: float,
        memory_freed: MemoryFreed | None = None,
        memory_timeout_s: float = 30.0,
    ) -> StopResult:
        """End ``instance`` (invariant 1: only if ours), then wait for its memory when asked to."""
        result = await self._stop(instance, timeout_s)
        return await self.waiter.memory(result, memory_freed, memory_timeout_s)

    @abstractmethod
    async def _stop(self, instance: Instance, timeout_s: float) -> StopResult:
        """End (or unload) ``instance``; a refusal is a result, never a signal."""
