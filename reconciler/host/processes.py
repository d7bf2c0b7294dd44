"""OS processes of interest, read with psutil.

The planner needs only a few processes: whatever listens on a service's host
port, the reconciler's own instances, and GPU users. :func:`collect_processes`
returns those as :class:`reconciler.core.snapshot.Process` (pid, create_time,
ppid, cmdline, every TCP port it listens on). A process that vanishes while
being read is left out; one that denies access keeps what could be read (a
listener whose cmdline is hidden is still a listener). For GPU users it also
returns the ``ppid`` chain up to an instance, so the planner can count a
worker's memory for the instance that spawned it.
"""

from __future__ import annotations

from collections.abc import Iterable

import psutil

from reconciler.core.snapshot import Process


def listeners() -> dict[int, set[int]]:
    """Listening TCP ports by pid, for every listener this user may see."""
    by_pid: dict[int, set[int]] = {}
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # e.g. macOS without root: ask each process instead
        return _listeners_per_process()
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.pid is not None and conn.laddr:
            by_pid.setdefault(conn.pid, set()).add(conn.laddr.port)
    return by_pid


def _listeners_per_process() -> dict[int, set[int]]:
    by_pid: dict[int, set[int]] = {}
    for proc in psutil.process_iter():
        try:
            ports = {
                c.laddr.port
                for c in proc.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr
            }
        except (psutil.Error, OSError):
            continue
        if ports:
            by_pid[proc.pid] = ports
    return by_pid


def collect_processes(
    ports: Iterable[int],
    pids: Iterable[int],
    *,
    lineage_of: Iterable[int] = (),
    roots: Iterable[int] = (),
) -> list[Process]:
    """Listeners on any of ``ports`` plus the processes ``pids``, ordered by pid.

    For each pid in ``lineage_of`` (GPU users) that descends from one of
    ``roots`` (instance pids), the processes in between are included too.
    """
    wanted_ports, root_set = set(ports), set(roots)
    by_pid = listeners()
    chosen = {pid for pid, held in by_pid.items() if held & wanted_ports} | set(pids)
    for pid in lineage_of:
        chain = ancestors(pid)
        for depth, parent in enumerate(chain):
            if parent in root_set:
                chosen.update(chain[: depth + 1])
                chosen.add(pid)
                break
    result = []
    for pid in sorted(chosen):
        process = describe(pid, sorted(by_pid.get(pid, ())))
        if process is not None:
            result.append(process)
    return result


def describe(pid: int, listening: list[int] | None = None) -> Process | None:
    """One process, or None when it does not exist (any more)."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            create_time = proc.create_time()
            ppid = proc.ppid()
            try:
                cmdline = proc.cmdline()
            except psutil.AccessDenied:
                cmdline = []
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ProcessLookupError):
        return None
    if listening is None:
        listening = sorted(listeners().get(pid, ()))
    return Process(pid=pid, create_time=create_time, ppid=ppid, cmdline=cmdline, listening=listening)


def ancestors(pid: int, limit: int = 32) -> list[int]:
    """The pids above ``pid``, nearest first (empty when it is gone)."""
    chain: list[int] = []
    try:
        proc = psutil.Process(pid)
        while len(chain) < limit:
            parent = proc.ppid()
            if parent <= 0 or parent == proc.pid:
                break
            chain.append(parent)
            proc = psutil.Process(parent)
    except (psutil.Error, ProcessLookupError):
        pass
    return chain
