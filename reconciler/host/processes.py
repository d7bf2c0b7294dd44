"""OS processes of interest, read with psutil.

The planner needs only a few processes: whatever listens on a service's host
port, the reconciler's own instances, and GPU users. :func:`collect_processes`
returns those as :class:`reconciler.core.snapshot.Process` (pid, create_time,
ppid, cmdline, every TCP port it listens on). A process that vanishes while
being read is left out; one that denies access keeps what could be read (a
listener whose cmdline is hidden is still a listener). For GPU users it also
returns the ``ppid`` chain up to an instance, so the planner can count a
worker's memory for the instance that spawned it.

On Linux the listeners come from the kernel's socket diagnostics (netlink
``sock_diag``, asked for listening TCP sockets only) and ``/proc/*/fd``:
psutil's ``net_connections`` parses the whole TCP table in Python, TIME_WAIT
and established connections included — thousands of lines on a host whose
services are probed every second, tens of milliseconds per reconcile pass.
Elsewhere, or when netlink is refused, psutil as before.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterable

import psutil

from reconciler.core.snapshot import Process

# netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
_DIAG_REQ = struct.Struct("=BBBBI48x")  # inet_diag_req_v2: family, protocol, ext, pad, states, sockid (zeros)
_MSG_SPORT, _MSG_INODE = 4, 68  # offsets in inet_diag_msg: id.idiag_sport (big-endian), idiag_inode


def listeners() -> dict[int, set[int]]:
    """Listening TCP ports by pid, for every listener this user may see."""
    fast = _linux_listeners()
    if fast is not None:
        return fast
    by_pid: dict[int, set[int]] = {}
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # e.g. macOS without root: ask each process instead
        return _listeners_per_process()
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.pid is not None and conn.laddr:
            by_pid.setdefault(conn.pid, set()).add(conn.laddr.port)
    return by_pid


def _linux_listeners() -> dict[int, set[int]] | None:
    """:func:`listeners` from netlink and ``/proc/*/fd``; None where that is not available."""
    ports = _listening_sockets()
    if ports is None:
        return None
    by_pid: dict[int, set[int]] = {}
    if not ports:
        return by_pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        held = {ports[inode] for inode in _socket_inodes(entry) if inode in ports}
        if held:
            by_pid[int(entry)] = held
    return by_pid


def _socket_inodes(pid: str) -> list[int]:
    """Inodes of the sockets process ``pid`` holds (none when it is gone or not ours to read)."""
    base = f"/proc/{pid}/fd/"
    try:
        fds = os.listdir(base)
    except OSError:
        return []
    inodes = []
    for fd in fds:
        try:
            target = os.readlink(base + fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(int(target[8:-1]))
    return inodes


def _listening_sockets() -> dict[int, int] | None:
    """Listening TCP sockets (IPv4 and IPv6) as {inode: port}, from netlink; None when unavailable."""
    family_netlink = getattr(socket, "AF_NETLINK", None)
    if family_netlink is None or not sys.platform.startswith("linux"):
        return None
    found: dict[int, int] = {}
    try:
        with socket.socket(family_netlink, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
            for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
                body = _DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN)
                sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY,
                                         _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body)
                if not _read_dump(sock, found):
                    return None
    except OSError:
        return None
    return found


def _read_dump(sock: socket.socket, found: dict[int, int]) -> bool:
    """Read one sock_diag dump into ``found``; False on a netlink error."""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return False
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                return False
            if kind == _NLMSG_DONE:
                return True
            if kind == _NLMSG_ERROR:
                return False
            msg = offset + _NLMSGHDR.size
            if kind == _SOCK_DIAG_BY_FAMILY and msg + _MSG_INODE + 4 <= offset + length:
                inode = int.from_bytes(data[msg + _MSG_INODE:msg + _MSG_INODE + 4], sys.byteorder)
                if inode:
                    found[inode] = int.from_bytes(data[msg + _MSG_SPORT:msg + _MSG_SPORT + 2], "big")
            offset += (length + 3) & ~3


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
        if pid in root_set:
            continue  # an instance itself: its memory is its own, no chain to find (and none to pay for)
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


_PROC_STAT = os.path.exists("/proc/self/stat") and hasattr(os, "sysconf")


def proc_stat(pid: int | str, boot: float, ticks: int) -> tuple[bool, int, float] | None:
    """(zombie, ppid, create_time) of ``pid`` from ``/proc/<pid>/stat`` (create time as psutil computes it:
    ``boot`` + start ticks / ``ticks``); None when it is gone or unreadable. One ``read`` on a raw
    descriptor: this runs for every process on every pass of a simulated GPU."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        # after "pid (comm) ": state ppid … starttime (the 20th field after comm)
        fields = data[data.rindex(b")") + 2:].split()
        return fields[0] == b"Z", int(fields[1]), boot + int(fields[19]) / ticks
    except (OSError, ValueError, IndexError):
        return None


def boot_time() -> float | None:
    """The host's boot time as psutil gives it (None where there is no ``/proc`` to read start times from).
    psutil reads ``/proc/stat`` at every call: a caller that checks many pids reads it once and passes it to
    :func:`start_time`."""
    if not _PROC_STAT:
        return None
    try:
        return float(psutil.boot_time())
    except (OSError, psutil.Error):
        return None


def start_time(pid: int, boot: float | None = None) -> float | None:
    """When process ``pid`` started (psutil's ``create_time``); None when it is gone or a zombie. ``boot``:
    the boot time to count from (:func:`boot_time`, read once for many pids); read now when not given."""
    if _PROC_STAT:
        try:
            ticks = os.sysconf("SC_CLK_TCK")
            if boot is None:
                boot = psutil.boot_time()
        except (OSError, ValueError, psutil.Error):
            boot, ticks = 0.0, 0
        if ticks:
            stat = proc_stat(pid, boot, ticks)
            return None if stat is None or stat[0] else stat[2]
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except (psutil.Error, ProcessLookupError):
        return None


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
