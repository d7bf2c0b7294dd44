"""Simulated GPUs: the whole loop on machines without an NVIDIA GPU (``--gpu sim:…``).

Specs: ``sim:8192`` (one GPU of 8192 MB), ``sim:2x24576`` (two), or
``sim:gpus.yaml`` with ``gpus: [{total_mb: 8192, name: ..., uuid: ..., foreign_mb: 300}]``.

Rules. A live process whose environment holds ``RECONCILER_SIM_GPU_MB=<mb>``
uses that much memory on each simulated GPU that ``CUDA_VISIBLE_DEVICES``
lists (indexes or sim UUIDs, comma-separated; unset = 0, empty = none) for as
long as it lives: ``CUDA_VISIBLE_DEVICES=0,1`` with ``RECONCILER_SIM_GPU_MB=20000``
is 20000 MB on GPU 0 and 20000 MB on GPU 1, as a tensor-parallel server
started on a pair uses its ``max_mb`` on each (entries that name no
simulated GPU are left out, a GPU listed twice counts once). A carrier whose
parent carries the same declaration (an inherited environment, e.g. a
runner spawned by a server) is not counted again. ``foreign_mb`` is used memory
attributed to no process. ``used_mb`` is foreign plus the carriers' sum and may
exceed the total (an over-committed simulation shows as 0 MB free rather than
hiding a process). The process driver sets both variables when it launches
under sim; a demo can start a fake Ollama with them to play an adopted one.

Scopes keep simulations on one machine apart (a demo and a test run, tests
in parallel): a backend counts only the carriers whose ``RECONCILER_SIM_SCOPE``
equals the one in its own environment when it was created (unset matches
unset). What the reconciler launches inherits its environment, scope included.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from reconciler.core.snapshot import Gpu, GpuProcess
from reconciler.errors import GpuBackendError
from reconciler.host.processes import proc_stat

SIM_MB_ENV = "RECONCILER_SIM_GPU_MB"
_SIM_MB_MARK = SIM_MB_ENV.encode() + b"="
SCOPE_ENV = "RECONCILER_SIM_SCOPE"
DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
# A process's environment can still change by exec() just after fork(); only
# cache "declares nothing" for processes older than this.
_EXEC_GRACE_S = 2.0


class SimGpu(BaseModel):
    """One simulated device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_mb: int = Field(gt=0, description="Total memory, MB.")
    name: str = Field("Simulated GPU", description="Device name.")
    uuid: str | None = Field(None, description="Device UUID; default SIM-GPU-<index>.")
    foreign_mb: int = Field(0, ge=0, description="Used memory attributed to no process.")


class _SimFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus: list[SimGpu] = Field(min_length=1)


def parse_sim_spec(arg: str) -> list[SimGpu]:
    """The devices of a ``sim:`` spec (the part after the colon)."""
    if match := re.fullmatch(r"(?:(\d+)x)?(\d+)", arg.strip()):
        count, total = int(match.group(1) or 1), int(match.group(2))
        if count < 1 or total < 1:
            raise GpuBackendError(f"--gpu sim:{arg}: need at least one GPU of at least 1 MB")
        return [SimGpu(total_mb=total) for _ in range(count)]
    path = Path(arg)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise GpuBackendError(
            f"--gpu sim:{arg} is neither a size nor a YAML file; write sim:8192, sim:2x24576 "
            "or sim:path/to/gpus.yaml"
        )
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
        return _SimFile.model_validate(data).gpus
    except OSError as exc:
        raise GpuBackendError(f"--gpu sim:{arg}: cannot read: {exc.strerror or exc}") from None
    except YAMLError as exc:
        raise GpuBackendError(f"{arg}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'top level'}: {e['msg']}" for e in exc.errors()
        )
        raise GpuBackendError(
            f"{arg}: {problems} (expected gpus: [{{total_mb: 8192, name: ..., foreign_mb: 0}}])"
        ) from None


class SimBackend:
    """Simulated devices whose usage is read from process environments."""

    name = "sim"

    def __init__(self, gpus: list[SimGpu], scanner: EnvScanner | None = None):
        if not gpus:
            raise GpuBackendError("a simulated host needs at least one GPU")
        self.gpus = list(gpus)
        self._scanner = scanner or EnvScanner(scope=os.environ.get(SCOPE_ENV) or None)
        self._key: tuple[tuple[int, tuple[str, ...], int], ...] | None = None  # the carriers of the last read
        self._read: list[Gpu] = []

    def uuid(self, index: int) -> str:
        return self.gpus[index].uuid or f"SIM-GPU-{index}"

    def read(self) -> list[Gpu]:
        found = self._scanner.scan()
        key = tuple(sorted((pid, d.devices if isinstance(d, Declaration) else (d[0],), d[1])
                           for pid, d in found.items()))
        if key == self._key:  # the same carriers as at the last read: the same (frozen) devices
            return list(self._read)
        usage: dict[int, dict[int, int]] = {i: {} for i in range(len(self.gpus))}
        for pid, devices, mb in key:
            for device in devices:
                index = self._device_index(device)
                if index is not None:
                    usage[index][pid] = mb
        result = []
        for index, spec in enumerate(self.gpus):
            used = spec.foreign_mb + sum(usage[index].values())
            result.append(
                Gpu(
                    index=index,
                    uuid=self.uuid(index),
                    name=spec.name,
                    total_mb=spec.total_mb,
                    used_mb=used,
                    free_mb=max(0, spec.total_mb - used),
                    processes=[GpuProcess(pid=p, used_mb=mb) for p, mb in sorted(usage[index].items())],
                )
            )
        self._key, self._read = key, result
        return list(result)

    def close(self) -> None:
        pass

    def _device_index(self, device: str) -> int | None:
        if device.isdigit():
            index = int(device)
            return index if index < len(self.gpus) else None
        return next((i for i in range(len(self.gpus)) if self.uuid(i) == device), None)


class Declaration(tuple[str, int]):
    """What a process declares: ``(first device, MB)`` — the first entry of ``CUDA_VISIBLE_DEVICES``
    as written — with :attr:`devices`, every entry, on each of which it uses the MB."""

    devices: tuple[str, ...]

    def __new__(cls, devices: tuple[str, ...], mb: int) -> Declaration:
        declaration = super().__new__(cls, (devices[0], mb))
        declaration.devices = devices
        return declaration

    def __getnewargs__(self) -> tuple[tuple[str, ...], int]:
        return self.devices, self[1]

    @property
    def mb(self) -> int:
        return self[1]

    def same(self, other: Declaration | None) -> bool:
        """The same declaration (an inherited environment): devices and MB."""
        return other is not None and other.devices == self.devices and other.mb == self.mb


class EnvScanner:
    """Finds live processes that declare simulated GPU usage in their environment.

    Scans only processes it may read (all when running as root, else the same
    user's), skips the ones that vanish or deny access, and caches each
    process's declaration by ``(pid, create_time)``. Only carriers in ``scope``
    (their ``RECONCILER_SIM_SCOPE``; None = unset) count.

    A scan runs on every reconcile pass (every second in the demo), and most
    processes on a host declare nothing, pass after pass. On Linux the
    listing of ``/proc`` names each process's directory with its inode
    number, which the kernel takes from a counter when it makes the
    directory (a process that takes a freed pid gets a directory of its own,
    under another number): a process listed with the same ``(pid, inode)``
    as at the last scan is the same process. So a process
    known to declare nothing is not read again at all — no ``stat``, no
    environment — while it lives; only new processes (or one whose
    directory the kernel made again: read again, found the same), and the
    carriers (their ``ppid`` and whether they are zombies), are read.

    And when the listing is the very one of the last scan (same pids, same
    inodes, every process in it known) and every carrier reads as it did,
    the last answer stands without the rest of the scan
    (:meth:`_unchanged`); :meth:`SimBackend.read` then returns the same
    (frozen) devices. On a quiet host that is every steady pass: the read
    went from ~1 ms of a cold CPU to the listing and a ``stat`` per carrier.
    """

    def __init__(self, scope: str | None = None) -> None:
        self.scope = scope
        self._cache: dict[tuple[int, float], Declaration | None] = {}
        self._quiet: dict[tuple[int, int], float] = {}  # (pid, inode) → create_time of those declaring nothing
        self._entries: list[tuple[int, int]] | None = None  # the last listing, when every process in it was known
        self._carriers: dict[int, tuple[int, float]] = {}  # pid → (ppid, create_time) of the last scan's carriers
        self._last: dict[int, Declaration] = {}
        self.reads = 0  # processes whose /proc/<pid>/stat a scan read (for tests and curiosity)

    def scan(self) -> dict[int, Declaration]:
        uid = os.geteuid() if hasattr(os, "geteuid") else None
        found: dict[int, Declaration] = {}
        parents: dict[int, int] = {}
        seen: set[tuple[int, float]] = set()
        now = time.time()
        entries = _process_entries() if _PROC_STAT else None
        if entries is not None and self._unchanged(entries):
            return dict(self._last)
        rows = [(*row, -1) for row in _process_table()] if entries is None else self._rows(entries)
        quiet: dict[tuple[int, int], float] = {}
        carriers: dict[int, tuple[int, float]] = {}
        # every listed process known: a young one is read again next time; a zombie or one that vanished stays so
        settled = entries is not None
        for pid, ppid, create_time, inode in rows:
            key = (pid, create_time)
            seen.add(key)
            if ppid < 0:  # known to declare nothing (read at an earlier scan)
                quiet[(pid, inode)] = create_time
                continue
            if key in self._cache:
                declaration = self._cache[key]
            else:  # a process not seen before (the only ones whose uid and environment are read)
                declaration = _declaration_of(pid, uid, self.scope)
                if declaration is not None or now - create_time > _EXEC_GRACE_S:
                    self._cache[key] = declaration
                else:
                    settled = False
            if declaration is not None:
                found[pid] = declaration
                parents[pid] = ppid
                carriers[pid] = (ppid, create_time)
            elif key in self._cache and inode >= 0:
                quiet[(pid, inode)] = create_time
        self._quiet = quiet
        for key in self._cache.keys() - seen:
            del self._cache[key]
        # An inherited declaration (parent declares the same) is the parent's memory.
        self._last = {pid: d for pid, d in found.items() if not d.same(found.get(parents[pid]))}
        self._entries = entries if settled else None
        self._carriers = carriers
        return dict(self._last)

    def _unchanged(self, entries: list[tuple[int, int]]) -> bool:
        """Whether the last scan's answer stands: ``/proc`` lists the very processes it listed (same pids, same
        directory inodes, none of them young enough to be read again), and every carrier is still alive, not a
        zombie, under the same parent. Only the carriers are read (as every scan reads them); the rest of the
        scan — a few hundred processes looked up one by one — is skipped."""
        if self._entries is None or entries != self._entries:
            return False
        try:
            boot, ticks = psutil.boot_time(), os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, psutil.Error):
            return False
        for pid, (ppid, create_time) in self._carriers.items():
            self.reads += 1
            stat = proc_stat(pid, boot, ticks)
            if stat is None or stat[0] or stat[1] != ppid or stat[2] != create_time:
                return False
        return True

    def _rows(self, entries: list[tuple[int, int]]) -> list[tuple[int, int, float, int]]:
        """(pid, ppid, create_time, inode) of the listed processes: ``ppid`` -1 for a process known to declare
        nothing (not read again), else read from its ``/proc/<pid>/stat`` (zombies and the vanished left out)."""
        try:
            boot, ticks = psutil.boot_time(), os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, psutil.Error):
            return [(*row, -1) for row in _process_table()]
        rows = []
        for pid, inode in entries:
            known = self._quiet.get((pid, inode))
            if known is not None:
                rows.append((pid, -1, known, inode))
                continue
            self.reads += 1
            stat = proc_stat(pid, boot, ticks)
            if stat is not None and not stat[0]:
                rows.append((pid, stat[1], stat[2], inode))
        return rows


def _process_entries() -> list[tuple[int, int]] | None:
    """(pid, inode of ``/proc/<pid>``) of every listed process, from one listing of ``/proc`` (the inode comes
    with the listing: nothing is read per process); None when ``/proc`` cannot be listed."""
    try:
        with os.scandir("/proc") as listing:
            return [(int(entry.name), entry.inode()) for entry in listing if entry.name.isdigit()]
    except OSError:
        return None


def _process_table() -> list[tuple[int, int, float]]:
    """(pid, ppid, create_time) of every live process (zombies aside), each read again.

    On Linux straight from ``/proc/<pid>/stat`` (one read per process, create
    time as psutil computes it: boot time + start ticks): psutil's
    per-attribute reads cost about five times as much. Elsewhere through
    psutil.
    """
    if _PROC_STAT:
        table = _linux_process_table()
        if table is not None:
            return table
    table = []
    for proc in psutil.process_iter(["create_time", "ppid", "status"]):
        info = proc.info
        if info["create_time"] is not None and info["status"] != psutil.STATUS_ZOMBIE:
            table.append((proc.pid, info["ppid"], info["create_time"]))
    return table


_PROC_STAT = os.path.exists("/proc/self/stat") and hasattr(os, "sysconf")


def _linux_process_table() -> list[tuple[int, int, float]] | None:
    try:
        entries = os.listdir("/proc")
        boot, ticks = psutil.boot_time(), os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, psutil.Error):
        return None
    table = []
    for entry in entries:
        if entry.isdigit() and (stat := proc_stat(entry, boot, ticks)) is not None and not stat[0]:
            table.append((int(entry), stat[1], stat[2]))  # a zombie, or one gone meanwhile, is left out
    return table


def _declaration_of(pid: int, uid: int | None, scope: str | None) -> Declaration | None:
    """The declaration of process ``pid`` (None for another user's process: we only read our own).

    On Linux the raw ``/proc/<pid>/environ`` is looked at first: most processes declare nothing, and one whose
    environment does not even hold the variable's name is answered without psutil (a process object, its
    ``stat``, the environment split into a dict). Those that do hold it are read as before."""
    if _PROC_STAT:
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if _SIM_MB_MARK not in environ.read():
                    return None
        except OSError:
            return None  # gone, or not ours to read (what psutil would find too)
    try:
        proc = psutil.Process(pid)
        if uid not in (None, 0) and proc.uids().real != uid:
            return None
    except (psutil.Error, OSError):
        return None
    return _declaration(proc, scope)


def _declaration(proc: psutil.Process, scope: str | None = None) -> Declaration | None:
    try:
        env = proc.environ()
    except (psutil.Error, OSError):
        return None
    raw = env.get(SIM_MB_ENV)
    if raw is None or (env.get(SCOPE_ENV) or None) != scope:
        return None
    try:
        mb = int(float(raw))
    except ValueError:
        return None
    # Missing means device 0; set but empty means no device at all, as for CUDA.
    devices = tuple(dict.fromkeys(d.strip() for d in env.get(DEVICES_ENV, "0").split(",")))
    if mb <= 0 or not devices or not devices[0]:
        return None
    return Declaration(tuple(d for d in devices if d), mb)
