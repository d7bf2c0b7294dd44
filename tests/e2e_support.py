"""Driving ``reconciler watch`` end to end: a real process, real services, real files.

:class:`Host` is one test's world: a tmp directory holding the profile and the
state directory, a simulation scope of its own (so the simulated GPU sees
only this test's services), free ports for the services, and the watch
process(es). :class:`WatchRun` reads the JSON event lines of one ``watch``
on a thread; tests wait for events with a timeout (never sleep and assert).
Teardown kills everything the test started: the watch processes, every
instance recorded in the store (by process group), and any process whose
working directory is inside the test's tmp directory (the process driver
runs services in the state directory) — an orphan cannot outlive the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from reconciler.drivers.process import is_alive
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.host.sim import SCOPE_ENV
from reconciler.store import open_store
from reconciler.testing.ports import free_port, kill_group

Event = dict[str, Any]
WAIT_S = 15.0

SERVICE = """\
  {name}:
    max_mb: {mb}
    priority: {priority}
    always_on: {always_on}
    start_timeout_s: {start_timeout_s}
    probe_interval_s: 0.5
    probe_timeout_s: 0.5
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.service --port {{port}} --name {name} {args}"
      port: {port}
"""
OLLAMA = """\
  {name}:
    max_mb: {mb}
    priority: {priority}
    always_on: true
    probe_interval_s: 0.5
    managed:
      type: process
      adopt: true
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.fake_ollama --port {{port}} --vram-mb {mb}"
      port: {port}
      health_path: /api/tags
"""


def service_block(name: str, port: int, *, mb: int = 1024, priority: int = 2, always_on: bool = True,
                  args: str = "", start_timeout_s: float = 5) -> str:
    return SERVICE.format(name=name, port=port, mb=mb, priority=priority, always_on=str(always_on).lower(),
                          args=args, start_timeout_s=start_timeout_s)


def ollama_block(name: str, port: int, *, mb: int = 1024, priority: int = 1) -> str:
    return OLLAMA.format(name=name, port=port, mb=mb, priority=priority)


def profile_text(*blocks: str, name: str = "e2e") -> str:
    head = (
        "# yaml-language-server: $schema=../schemas/profile.schema.json\n"
        f"schema_version: 1\nname: {name}\nvram_total_mb: 8192\neviction_timeout_s: 2\n"
    )
    return head + ("services:\n" + "".join(blocks) if blocks else "services: {}\n")


class WatchRun:
    """One ``reconciler watch --events json`` process and the events it printed."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.stderr_path = log
        with open(log, "wb") as err:
            self.process = subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._seen = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"kind": "unparsable", "line": raw.decode(errors="replace")}
            self._queue.put(event)
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def next(self, timeout_s: float = WAIT_S) -> Event | None:
        """The next event not yet returned (None when watch ended); raises on timeout."""
        if self._seen < len(self.events):
            self._seen += 1
            return self.events[self._seen - 1]
        try:
            event = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no event within {timeout_s} s") from None
        if event is None:
            self._queue.put(None)
            return None
        self.events.append(event)
        self._seen += 1
        return event

    def wait_for(self, predicate: Callable[[Event], bool], timeout_s: float = WAIT_S, what: str = "") -> Event:
        """The first later event that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                event = self.next(max(0.01, remaining)) if remaining > 0 else None
            except TimeoutError:
                event = None
            if event is None:
                raise AssertionError(
                    f"no event {what or predicate} within {timeout_s} s (watch rc={self.process.poll()});\n"
                    f"events: {self._tail()}\nstderr: {self.stderr()[-2000:]}"
                )
            if predicate(event):
                return event

    def wait_kind(self, kind: str, timeout_s: float = WAIT_S, **match: Any) -> Event:
        return self.wait_for(
            lambda e: e.get("kind") == kind and all(e.get(k) == v for k, v in match.items()),
            timeout_s, what=f"{kind} {match}",
        )

    def seen(self, kind: str, **match: Any) -> list[Event]:
        """The events of ``kind`` (matching ``match``) returned so far."""
        return [e for e in self.events[: self._seen]
                if e.get("kind") == kind and all(e.get(k) == v for k, v in match.items())]

    def wait_converged(self, timeout_s: float = WAIT_S) -> Event:
        """The next pass that had nothing to do and nothing pending: the host matches the profile."""
        return self.wait_for(
            lambda e: e.get("kind") == "pass.finished" and not e["actions"] and not e["pending"],
            timeout_s, what="a converged pass",
        )

    def since(self, mark: int) -> list[Event]:
        return self.events[mark:self._seen]

    @property
    def mark(self) -> int:
        return self._seen

    def _tail(self) -> str:
        return "\n".join(json.dumps(e)[:300] for e in self.events[-25:])

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait_exit(self, timeout_s: float = WAIT_S) -> int:
        """Its exit status, once it ended; every event it printed is then in ``events``."""
        rc = self.process.wait(timeout_s)
        self._reader.join(5)
        while (event := self._queue.get_nowait()) is not None:
            self.events.append(event)
        self._queue.put(None)
        return rc

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)
        if self.process.stdout:
            self.process.stdout.close()


class Host:
    """One test's world; use as a context manager (teardown kills everything)."""

    def __init__(self, root: Path):
        self.root = root
        self.profile = root / "profiles" / "profile.yaml"
        self.profile.parent.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.scope = f"e2e-{uuid.uuid4().hex[:12]}"
        self.runs: list[WatchRun] = []
        self.foreign: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"RECONCILER_PYTHON": sys.executable, SCOPE_ENV: self.scope, "PYTHONUNBUFFERED": "1"})
        return env

    def write(self, text: str) -> None:
        self.profile.write_text(text)

    def port(self) -> int:
        return free_port()

    def watch(self, *extra: str, resync_s: float = 30, extra_env: dict[str, str] | None = None) -> WatchRun:
        argv = [
            sys.executable, "-m", "reconciler", "watch", "--profile", str(self.profile), "--gpu", "sim:8192",
            "--state-dir", str(self.state_dir), "--events", "json", "--resync", str(resync_s), *extra,
        ]
        run = WatchRun(argv, {**self.env(), **(extra_env or {})}, self.root / f"watch-{len(self.runs)}.stderr")
        self.runs.append(run)
        return run

    def start_foreign(self, module: str, *args: str, sim_mb: int | None = None) -> subprocess.Popen:
        """A process the reconciler did not start (a squatter, an Ollama to adopt), outside tmp."""
        env = self.env()
        if sim_mb is not None:
            env["RECONCILER_SIM_GPU_MB"] = str(sim_mb)
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env, cwd="/", stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.foreign.append(proc)
        return proc

    def instances(self) -> dict[str, Any]:
        with open_store(self.state_dir, SYSTEM_CLOCK) as store:
            return {i.service: i for i in store.instances()}

    def leases(self) -> list[Any]:
        with open_store(self.state_dir, SYSTEM_CLOCK) as store:
            return store.leases()

    def pids(self) -> dict[str, int]:
        return {name: i.pid for name, i in self.instances().items()}

    def our_processes(self) -> list[psutil.Process]:
        """Live processes whose working directory is in this test's tmp directory (services we started)."""
        root = str(self.root.resolve())
        found = []
        for proc in psutil.process_iter(["cwd", "status"]):
            cwd = proc.info.get("cwd")
            if cwd and (cwd == root or cwd.startswith(root + os.sep)) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        return found

    def listeners(self, port: int) -> list[int]:
        """Pids listening on ``port``."""
        pids = []
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                pids.append(conn.pid)
        return pids

    def close(self) -> None:
        for run in self.runs:
            run.kill()
        pids: set[int] = set()
        if (self.state_dir / "state.db").exists():
            # only what still is the process we started (pid and create_time): pids are reused;
            # teardown goes on whatever the store says
            with contextlib.suppress(Exception):
                pids |= {i.pid for i in self.instances().values()
                         if i.origin == "started" and i.pid and i.create_time and is_alive(i.pid, i.create_time)}
        for proc in self.our_processes():
            pids.add(proc.pid)
        for pid in pids:
            kill_group(pid)
        for proc in self.foreign:
            if proc.poll() is None:  # unreaped: the pid is still this process's
                kill_group(proc.pid)
            proc.wait(10)

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not true within {timeout_s} s")
        time.sleep(0.05)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    """A :class:`Host` in ``tmp_path``; everything it started is killed afterwards."""
    with Host(tmp_path) as world:
        yield world
