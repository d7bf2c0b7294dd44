"""What every driver shares: the results it returns and the wait for freed memory.

A driver actuates one kind of instance: a local process (:mod:`.process`), a
Docker container (:mod:`.docker`), or an adopted Ollama whose models it unloads
(:mod:`.ollama`). Stopping is where invariant 1 lives: a driver signals only an
instance we started, identified by ``(pid, create_time)`` or by our container
label, and an adopted instance is never signalled. After the instance is gone,
the executor may pass ``memory_freed`` (e.g. "NVML shows the reservation
released") and the driver polls it until it holds or ``memory_timeout_s``
passes; a timeout is reported in the result, not raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from reconciler.core.snapshot import Instance, Launch

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


class Driver(Protocol):
    """Stops (or evicts) an instance; drivers that can also start one add ``start``."""

    async def stop(
        self,
        instance: Instance,
        timeout_s: float,
        memory_freed: MemoryFreed | None = None,
        memory_timeout_s: float = 30.0,
    ) -> StopResult: ...


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
