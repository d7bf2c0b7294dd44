"""The planner's view of a snapshot: which instances live, what they hold, what is free.

Identity (DESIGN §3, :mod:`.identity`): an instance is alive only when
``processes`` holds its pid with the same ``create_time`` (±1 s). An instance without a pid (an adopted
listener whose process we cannot see, a container) is alive while its
service's probe is healthy. ``failed`` instances count as dead: the runtime
already stopped what it started.

VRAM (DESIGN §3): per GPU, ``free = min(nvml_free, total − Σ reservations − foreign)``.

* An instance spanning several GPUs (``gpus``, a service with ``gpu_count``)
  holds a reservation on each of them, each computed from what NVML shows
  its process tree using *there* — a tensor-parallel server on one GPU and
  its worker process on the other both count for it. Usage of an
  instance's processes on a GPU that is not one of its own is no
  reservation's: it is foreign there.

* GPU memory of a process counts for an instance when the process is the
  instance's pid or one of its descendants (``ppid`` chain), so a vLLM worker
  process is not mistaken for foreign usage.
* A started instance reserves ``max(ceiling, observed)`` — its ceiling is
  the ``max_mb`` of the model it serves when ``models:`` gives one, else the
  service's (:meth:`~.profile.Service.ceiling_mb`); an adopted one its
  observed usage, or ``max_mb`` when NVML attributes nothing to it — either
  at most the GPU's total (it runs there already: that is all it can hold,
  whatever its ceiling says now).
* An adopted instance that NVML attributes nothing to reserves ``max_mb`` and
  absorbs up to that much of the unattributed usage, which is then not also
  counted as foreign (DESIGN §3). So does a started instance without a pid
  (a container whose processes this host cannot see): it is ours, and its
  memory is what NVML shows unattributed.
* Leased unmanaged slots reserve ``max_mb`` and VRAM-only leases their ``mb``.
  Their processes are not ours, so once they allocate, that usage is foreign
  *as well*: counted twice, on purpose. A lease is granted before its holder
  allocates, and guessing which foreign usage is "its" would let a start race
  the holder's allocation into an out-of-memory. Conservative beats clever
  here; make such a service managed or adoptable to have it attributed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import NamedTuple

from reconciler.core.identity import is_running
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Gpu, Instance, Lease, Process, Snapshot


class Holder(NamedTuple):
    """Something that holds VRAM on a GPU: a live instance, a leased slot, a VRAM lease."""

    key: str  # service name, or "lease:<id>" for a VRAM lease
    gpu: int | None
    reservation: int
    attributed: bool
    origin: str  # started | adopted | slot | vram
    absorbs: bool = False  # its usage shows up unattributed: it is not also foreign


class GpuView:
    """One GPU as the plan sees it: who holds what there, and the usage no one declared (``foreign``).

    A plain class, not a dataclass, and :class:`Holder` a named tuple: see :mod:`reconciler.core`.
    """

    def __init__(self, gpu: Gpu) -> None:
        self.gpu = gpu
        self.foreign = 0
        self.holders: dict[str, Holder] = {}

    @property
    def index(self) -> int:
        return self.gpu.index

    @property
    def total(self) -> int:
        return self.gpu.total_mb

    @property
    def reserved(self) -> int:
        return sum(h.reservation for h in self.holders.values())

    @property
    def headroom(self) -> int:
        """``min(nvml_free, total − Σ reservations − foreign)``; negative when over-committed."""
        return min(self.gpu.nvml_free_mb, self.total - self.reserved - self.foreign)

    @property
    def free(self) -> int:
        return max(0, self.headroom)


def is_alive(instance: Instance, processes: Mapping[int, Process], probe_healthy: bool) -> bool:
    """Identity (:mod:`.identity`); an instance without a pid lives while its probe is healthy."""
    if instance.state == "failed":
        return False
    if instance.pid is None:
        return probe_healthy
    return is_running(instance, processes, trust_unknown_start=True)


def lease_active(lease: Lease, now: datetime) -> bool:
    return lease.expires_at is None or lease.expires_at > now


class World:
    """Live instances, active leases and per-GPU accounting for one profile + snapshot."""

    def __init__(self, profile: Profile, snapshot: Snapshot):
        self.profile = profile
        self.snapshot = snapshot
        self.now = snapshot.now
        self.processes = {p.pid: p for p in snapshot.processes}
        self.instances: dict[str, Instance] = {}
        self.dead: dict[str, Instance] = {}
        for instance in snapshot.instances:
            healthy = self.probe_healthy(instance.service)
            if is_alive(instance, self.processes, healthy):
                self.instances[instance.service] = instance
            else:
                self.dead[instance.service] = instance
        self.active_leases = [lease for lease in snapshot.leases if lease_active(lease, self.now)]
        self.expired_leases = [lease for lease in snapshot.leases if not lease_active(lease, self.now)]
        self.gpus = {g.index: GpuView(g) for g in sorted(snapshot.gpus, key=lambda g: g.index)}

    # --- health and ownership -------------------------------------------------

    def probe_healthy(self, service: str) -> bool:
        probe = self.snapshot.probes.get(service)
        return bool(probe and probe.healthy)

    def installed_models(self, service: str) -> list[str] | None:
        """The models an Ollama service's last probe listed as installed; None when unknown."""
        probe = self.snapshot.probes.get(service)
        return list(probe.models) if probe is not None and probe.healthy and probe.models is not None else None

    def healthy(self, service: str) -> bool:
        """A live instance is healthy when its probe says so (or it has no probe)."""
        instance = self.instances.get(service)
        if instance is None or instance.state == "stopping":
            return False
        spec = self.profile.services.get(service)
        if spec is not None and spec.probe_port is not None:
            return self.probe_healthy(service)
        return instance.state == "running"

    def owner_pid(self, pid: int, instance_pids: set[int]) -> int | None:
        """The instance pid that ``pid`` is or descends from, if any."""
        seen = 0
        current: int | None = pid
        while current is not None and seen < 64:
            if current in instance_pids:
                return current
            process = self.processes.get(current)
            current = process.ppid if process else None
            seen += 1
        return None

    def listener(self, port: int | None) -> Process | None:
        if port is None:
            return None
        return next((p for p in self.snapshot.processes if port in p.listening), None)

    def leases_of(self, service: str) -> list[Lease]:
        return [lease for lease in self.active_leases if lease.service == service and lease.kind == "service"]

    # --- VRAM accounting --------------------------------------------------------

    def observed_usage(self) -> dict[str, dict[int, int]]:
        """Per instance service: GPU index → MB NVML attributes to its process tree."""
        pid_to_service = {i.pid: s for s, i in self.instances.items() if i.pid is not None}
        usage: dict[str, dict[int, int]] = {}
        for gpu in self.snapshot.gpus:
            for proc in gpu.processes:
                owner = self.owner_pid(proc.pid, set(pid_to_service))
                if owner is not None:
                    per_gpu = usage.setdefault(pid_to_service[owner], {})
                    per_gpu[gpu.index] = per_gpu.get(gpu.index, 0) + proc.used_mb
        return usage

    def reservation_for(
        self, service: str, instance: Instance, observed: dict[int, int], gpu: int | None = None
    ) -> tuple[int, bool]:
        """(MB reserved, whether NVML attributes memory to it) for a live instance on ``gpu``, one of its
        GPUs (default: its first); ``max_mb`` is a ceiling per GPU."""
        spec = self.profile.services.get(service)
        max_mb = spec.ceiling_mb(instance.model) if spec else 0
        gpu = instance.gpu if gpu is None else gpu
        attributed = gpu is not None and gpu in observed
        seen = observed.get(gpu, 0) if gpu is not None else 0
        view = self.gpus.get(gpu) if gpu is not None else None
        cap = view.total if view is not None else None  # it runs there: that is all it can hold
        if instance.origin == "adopted":
            if attributed:
                return seen, True
            return (min(max_mb, cap) if cap is not None else max_mb), False
        booked = max(max_mb, seen)
        return (min(booked, cap) if cap is not None else booked), attributed

    def account(self, extra: Sequence[Holder] = ()) -> None:
        """Fill each GPU's holders and foreign usage. ``extra``: holders planned but not in the snapshot."""
        usage = self.observed_usage()
        for view in self.gpus.values():
            view.holders.clear()
        holders: list[Holder] = list(extra)
        for service, instance in self.instances.items():
            for gpu in instance.gpu_set:
                if gpu not in self.gpus:
                    continue
                mb, attributed = self.reservation_for(service, instance, usage.get(service, {}), gpu)
                absorbs = not attributed and (instance.origin == "adopted" or instance.pid is None)
                holders.append(Holder(service, gpu, mb, attributed, instance.origin, absorbs))
        holders.extend(self.lease_holders())
        for holder in holders:
            if holder.gpu in self.gpus:
                self.gpus[holder.gpu].holders[holder.key] = holder
        on_gpu: dict[int, set[int]] = {}  # GPU → pids of the instances placed on it
        for instance in self.instances.values():
            for gpu in instance.gpu_set:
                if instance.pid is not None:
                    on_gpu.setdefault(gpu, set()).add(instance.pid)
        for view in self.gpus.values():
            per_process = sum(p.used_mb for p in view.gpu.processes)
            placed = on_gpu.get(view.index, set())
            unowned = sum(  # an instance's usage on a GPU that is not one of its own is no reservation's
                p.used_mb for p in view.gpu.processes if self.owner_pid(p.pid, placed) is None
            )
            raw = unowned + max(0, view.gpu.used_mb - per_process)
            absorbed = sum(h.reservation for h in view.holders.values() if h.absorbs)
            view.foreign = max(0, raw - absorbed)

    def lease_holders(self) -> list[Holder]:
        """Leased unmanaged slots (max_mb, once per slot and GPU) and VRAM-only leases (mb)."""
        out: list[Holder] = []
        slots: set[tuple[str, int | None]] = set()
        for lease in self.active_leases:
            if lease.kind == "vram":
                out.append(Holder(f"lease:{lease.id}", lease.gpu, lease.mb, False, "vram"))
                continue
            spec = self.profile.services.get(lease.service)
            if spec is None or spec.managed is not None or spec.max_mb == 0:
                continue
            for gpu in lease.gpu_set or (None,):
                if (lease.service, gpu) not in slots:
                    slots.add((lease.service, gpu))
                    out.append(Holder(lease.service, gpu, spec.max_mb, False, "slot"))
        return out
