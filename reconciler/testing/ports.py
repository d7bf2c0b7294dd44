"""Test and demo helpers: free ports, starting the fake services, cleaning up.

    with Spawner() as spawn:
        svc = spawn.service(startup_delay=0.5)        # waits until it listens
        ollama = spawn.fake_ollama(models="a,b", vram_mb=5800,
                                   env={"RECONCILER_SIM_GPU_MB": "5800"})
        ... svc.port, svc.pid, svc.process (a subprocess.Popen) ...
    # everything it started is terminated (SIGTERM, then SIGKILL) and reaped

In pytest, use the ``spawner`` fixture from :mod:`reconciler.testing.fixtures`.
``free_port()`` gives an unused loopback port *outside the kernel's ephemeral
range* (``/proc/sys/net/ipv4/ip_local_port_range``). A port the kernel picks for
``bind(0)`` comes from that range, which is also where every outgoing
connection takes its local port — and a test's processes make many (to etcd,
between nodes, probes): one of them could take the port before the service
meant for it binds, and that service's start then fails and backs off for 10 s.
Below the range no outgoing connection ever lands; a port is still only free
until someone binds it, and one process never hands the same port out twice.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

import reconciler

_SOURCE_ROOT = str(Path(reconciler.__file__).resolve().parent.parent)


LOWEST_PORT = 10000  # below: ports services commonly own
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere as good a guess as any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, below the ephemeral range (see the module docstring)."""
    high = _ephemeral_low() - 1
    for _ in range(100 if high - LOWEST_PORT > 1000 else 0):
        port = random.randint(LOWEST_PORT, high)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:  # taken (or in TIME_WAIT): another
                continue
        _given.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # an unusual range: the kernel's choice
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass
class Spawned:
    """A program started by a :class:`Spawner`."""

    process: subprocess.Popen[bytes]
    port: int | None
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """What it wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace")


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` (or a process it started) holds a TCP listener on ``port``."""
    try:
        proc = psutil.Process(pid)
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
            for p in (proc, *proc.children(recursive=True))
            for c in p.net_connections(kind="tcp")
        )
    except psutil.AccessDenied:
        return is_listening(port)
    except psutil.NoSuchProcess:
        return False


def wait_listening(spawned: Spawned, timeout_s: float = 10.0) -> None:
    """Return once the spawned process listens on ``spawned.port``; raise if it exits or times out.

    Checks that the listener is that process (or its child), so a port somebody else
    already holds does not count as a successful start.
    """
    port = spawned.port
    assert port is not None, "only a program given a port can be waited for"
    deadline = time.monotonic() + timeout_s
    while not listens(spawned.pid, port):
        if spawned.process.poll() is not None:
            raise RuntimeError(
                f"pid {spawned.pid} exited with {spawned.process.returncode} before listening on "
                f"{spawned.port}:\n{spawned.output()}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {spawned.pid} not listening on {spawned.port} after {timeout_s}s")
        time.sleep(0.02)


def module_argv(module: str, **options: object) -> list[str]:
    """``python -m module --opt value …``; True adds a flag, None/False leaves it out."""
    argv = [sys.executable, "-m", module]
    for key, value in options.items():
        if value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


class Spawner:
    """Starts programs and makes sure every one of them is gone afterwards."""

    def __init__(self, grace_s: float = 3.0):
        self.grace_s = grace_s
        self.spawned: list[Spawned] = []
        self._logs = tempfile.TemporaryDirectory(prefix="reconciler-spawn-")

    def start(
        self,
        argv: list[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Spawned:
        """Start ``argv`` (environment = ours + ``env``); with ``wait``, until ``port`` listens."""
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_SOURCE_ROOT, child_env.get("PYTHONPATH")) if p
        )
        log = Path(self._logs.name) / f"{len(self.spawned)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                argv, env=child_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        spawned = Spawned(process, port, log)
        self.spawned.append(spawned)
        if wait and port is not None:
            wait_listening(spawned)
        return spawned

    def service(self, port: int | None = None, *, env: dict[str, str] | None = None,
                wait: bool = True, **options: object) -> Spawned:
        """The fake service (:mod:`.service`); options as its flags, e.g. ``startup_delay=1``."""
        port = port or free_port()
        argv = module_argv("reconciler.testing.service", port=port, **options)
        return self.start(argv, port=port, env=env, wait=wait)

    def fake_ollama(self, port: int | None = None, *, env: dict[str, str] | None = None,
                    wait: bool = True, **options: object) -> Spawned:
        """The fake Ollama (:mod:`.fake_ollama`); options as its flags, e.g. ``vram_mb=5800``."""
        port = port or free_port()
        argv = module_argv("reconciler.testing.fake_ollama", port=port, **options)
        return self.start(argv, port=port, env=env, wait=wait)

    def close(self) -> None:
        """Terminate everything still running (SIGKILL after the grace period) and reap it."""
        for spawned in self.spawned:
            if spawned.process.poll() is None:
                spawned.process.terminate()
        deadline = time.monotonic() + self.grace_s
        for spawned in self.spawned:
            try:
                spawned.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                spawned.process.kill()
                spawned.process.wait()
        self.spawned.clear()
        self._logs.cleanup()

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kill_group(pid: int) -> None:
    """SIGKILL ``pid``'s process group when it leads one, else ``pid`` alone (test and benchmark cleanup).

    Callers pass only pids they know to be theirs (checked by create_time or just spawned).
    """
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
