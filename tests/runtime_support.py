"""Helpers for the runtime tests: profiles of fake services, a fake wall clock, a runtime on a sim GPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from reconciler.core.profile import Profile
from reconciler.drivers.process import is_alive
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.host.sim import EnvScanner, SimBackend, SimGpu
from reconciler.runtime import Runtime
from reconciler.store import open_store
from reconciler.testing.clock import T0, ComposedClock, ManualWallClock  # noqa: F401 (T0: re-exported to tests)
from reconciler.testing.ports import free_port

FakeClock = ManualWallClock  # the wall moves only when told to; waits are real


def fake_service(port: int | None, *, max_mb: int = 0, priority: int = 2, **options) -> dict:
    """A profile service running ``python -m reconciler.testing.service`` (options as its flags).

    ``port=None``: the process still listens somewhere, but the profile names no port to probe.
    """
    args = [f"--port {port or free_port()}"]
    service_keys = {"always_on", "depends_on", "start_timeout_s", "idle_stop_after_s", "shared",
                    "max_concurrent", "gpus"}
    service = {k: options.pop(k) for k in list(options) if k in service_keys}
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args.append(flag if value is True else f"{flag} {value}")
    managed = {"type": "process", "exec_path": sys.executable,
               "args_template": "-m reconciler.testing.service " + " ".join(args)}
    if port:
        managed["port"] = port
    return {"max_mb": max_mb, "priority": priority, "managed": managed, **service}


def make_profile(services: dict, **top) -> Profile:
    return Profile.model_validate({"schema_version": 1, "name": "test", "eviction_timeout_s": 2,
                                   "services": services, **top})


def kill_started(state_dir: Path) -> None:
    """Kill every process group the runtime's store still knows (test cleanup)."""
    store = open_store(state_dir, SYSTEM_CLOCK)
    try:  # (pid, create_time) still ours: a pid left in the store may belong to someone else by now
        known = {(i.pid, i.create_time) for i in store.instances() if i.origin == "started" and i.pid}
        known |= {(it.data.get("pid"), it.data.get("create_time")) for it in store.open_intents() if it.data.get("pid")}
    finally:
        store.close()
    pids = {pid for pid, create_time in known if create_time is not None and is_alive(pid, create_time)}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def listeners(port: int) -> list[int]:
    return sorted({c.pid for c in psutil.net_connections(kind="tcp")
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid})


TAG_ENV = "RECONCILER_TEST_TAG"


class TaggedScanner(EnvScanner):
    """Counts only processes carrying this test's tag, so other programs on the simulated GPU don't interfere."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag
        self._tagged: dict[tuple[int, float], bool] = {}

    def scan(self):
        return {pid: d for pid, d in super().scan().items() if self._is_tagged(pid)}

    def _is_tagged(self, pid: int) -> bool:
        try:
            proc = psutil.Process(pid)
            key = (pid, proc.create_time())
            if key not in self._tagged:
                self._tagged[key] = proc.environ().get(TAG_ENV) == self.tag
            return self._tagged[key]
        except psutil.Error:
            return False


class FakeMonotonic:
    """A monotonic clock and a sleep that advances it (yielding to the loop), for health waits."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


@dataclass
class RuntimeEnv:
    """A state directory, a tagged simulated GPU, a fake wall clock; runtimes on them; cleanup."""

    state_dir: Path
    tag: str
    clock: FakeClock = field(default_factory=FakeClock)
    runtimes: list[Runtime] = field(default_factory=list)

    def backend(self, gpu_mb: int = 8192) -> SimBackend:
        return SimBackend([SimGpu(total_mb=gpu_mb)], scanner=TaggedScanner(self.tag))

    def runtime(self, *, gpu_mb: int = 8192, monotonic=None, sleep=None, **kwargs) -> Runtime:
        clock = self.clock
        if monotonic is not None:  # a fake monotonic clock (and its sleep) for health waits, beside the manual wall
            clock = ComposedClock(self.clock.now, monotonic, sleep)
        runtime = Runtime(store=open_store(self.state_dir, clock), gpu_backend=self.backend(gpu_mb),
                          state_dir=self.state_dir, sim=True, clock=clock, memory_timeout_s=5, **kwargs)
        self.runtimes.append(runtime)
        return runtime

    def launches(self, service: str) -> int:
        """How many times the process driver launched ``service`` (its log's start headers)."""
        log = self.state_dir / "logs" / f"{service}.log"
        return log.read_text().count("reconciler: starting") if log.exists() else 0


@pytest.fixture
def env(tmp_path, monkeypatch) -> Iterator[RuntimeEnv]:
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG_ENV, tag)
    runtime_env = RuntimeEnv(tmp_path / "state", tag)
    yield runtime_env
    for runtime in runtime_env.runtimes:
        runtime.store.close()
    kill_started(runtime_env.state_dir)
    kill_tagged(tag)


def kill_tagged(tag: str) -> None:
    """SIGKILL every process carrying ``tag`` (whatever a test launched and left)."""
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(TAG_ENV) == tag:
                proc.kill()
        except psutil.Error:
            pass
