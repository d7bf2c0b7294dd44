"""The observer: the live host folded into one DESIGN §2 snapshot.

``observe(instances, leases, demands)`` reads the GPUs, collects the processes
of interest (listeners on every service's ports, every instance pid, every GPU
pid), probes every managed service that has a port — all probes concurrently,
over one HTTP client that lives as long as the observer — and returns a
:class:`Snapshot` with the inventory it was given (the state store owns that).

Two attribution rules make "VRAM by its PIDs" (DESIGN §3) answerable from the
snapshot alone:

1. Every process is reported with its ``ppid``, and a GPU user descending
   from an instance's pid comes with the chain of processes in between, so the
   planner counts Ollama's runners or vLLM's workers for their instance.
   The GPU view itself stays as NVML reported it.
2. An *adopted* Ollama-like instance that is alive, probes healthy, and has
   no GPU memory under its pid or a descendant (simulated GPUs, containers, another PID
   namespace) is attributed Σ ``size_vram`` of its ``/api/ps`` — possibly 0,
   which is the truth after its models were unloaded — on its GPU (the
   instance's ``gpu``, else the lowest index). That GPU's ``used_mb`` is raised
   to at least its per-process sum, so the numbers stay consistent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC

from reconciler.core.clock import Clock
from reconciler.core.identity import is_running
from reconciler.core.profile import Profile, Service, is_ollama
from reconciler.core.snapshot import (
    Demand,
    Gpu,
    GpuProcess,
    Instance,
    Lease,
    Probe,
    Process,
    Snapshot,
)
from reconciler.errors import DriverError
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.host.gpu import GpuBackend
from reconciler.host.ollama_api import OllamaApi
from reconciler.host.probes import Prober, Target, service_target
from reconciler.host.processes import collect_processes


class Observer:
    """Observes the host for one profile; reuse it for every reconcile round."""

    def __init__(
        self,
        profile: Profile,
        gpu_backend: GpuBackend,
        *,
        node: str = "local",
        clock: Clock = SYSTEM_CLOCK,
        prober: Prober | None = None,
    ):
        self._profile = profile
        self.gpu_backend = gpu_backend
        self.node = node
        self.clock = clock
        self.prober = prober or Prober()
        self.last_read: list[Gpu] | None = None  # the GPU backend's last read, before Ollama's attribution

    @property
    def profile(self) -> Profile:
        return self._profile

    @profile.setter
    def profile(self, profile: Profile) -> None:
        self._profile = profile

    def update_profile(self, profile: Profile) -> None:
        """Observe for a new profile from the next round on (the file was edited)."""
        self._profile = profile

    async def observe(
        self,
        instances: Iterable[Instance] = (),
        leases: Iterable[Lease] = (),
        demands: Iterable[Demand] = (),
    ) -> Snapshot:
        instances, profile = list(instances), self._profile
        now = self.clock.now()
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        probing = asyncio.ensure_future(self.prober.probe_all(probe_targets(profile)))
        try:
            gpus = self.last_read = await asyncio.to_thread(self.gpu_backend.read)
            processes = await asyncio.to_thread(_collect, profile, instances, gpus)
            probes = await probing
        finally:
            if not probing.done():
                probing.cancel()
                await asyncio.gather(probing, return_exceptions=True)
        gpus = await self._attribute_ollama(profile, instances, gpus, processes, probes)
        return Snapshot(
            format_version=1,
            node=self.node,
            now=now,
            gpus=gpus,
            processes=processes,
            probes=probes,
            instances=instances,
            leases=list(leases),
            demands=list(demands),
        )

    async def _attribute_ollama(
        self,
        profile: Profile,
        instances: list[Instance],
        gpus: list[Gpu],
        processes: list[Process],
        probes: dict[str, Probe],
    ) -> list[Gpu]:
        if not gpus:
            return gpus
        by_pid = {p.pid: p for p in processes}
        attributed = {owner for g in gpus for gp in g.processes for owner in _lineage(gp.pid, by_pid)}
        candidates = []
        for inst in instances:
            service = profile.services.get(inst.service)
            if (
                inst.origin == "adopted"
                and service is not None
                and is_ollama(service)
                and service.probe_port is not None
                and probes.get(inst.service, Probe(healthy=False)).healthy
                and is_running(inst, by_pid)
                and inst.pid not in attributed
            ):
                candidates.append((inst, service))
        if not candidates:
            return gpus
        answers = await asyncio.gather(*(self._ollama_vram(s) for _, s in candidates))
        extra: dict[int, list[GpuProcess]] = {}
        indexes = {g.index for g in gpus}
        for (inst, _), mb in zip(candidates, answers, strict=True):
            if mb is None:
                continue
            assert inst.pid is not None, "a candidate is running, so it has a pid"
            index = inst.gpu if inst.gpu in indexes else min(indexes)
            extra.setdefault(index, []).append(GpuProcess(pid=inst.pid, used_mb=mb))
        return [_with_processes(g, extra.get(g.index, [])) for g in gpus]

    async def _ollama_vram(self, service: Service) -> int | None:
        port = service.probe_port
        if port is None:  # not a candidate: candidates have a probe port
            return None
        api = OllamaApi(port, client=self.prober.client, timeout_s=service.probe_timeout_s)
        try:
            return await api.vram_mb()
        except DriverError:
            return None  # unattributed: the planner reserves max_mb

    async def aclose(self) -> None:
        """Close the HTTP client and the GPU backend (the observer owns both)."""
        await self.prober.aclose()
        self.gpu_backend.close()

    async def __aenter__(self) -> Observer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def probe_targets(profile: Profile) -> dict[str, Target]:
    """What to probe: every managed service with a port."""
    return {name: target for name, service in profile.services.items()
            if (target := service_target(service)) is not None}


def service_ports(profile: Profile) -> set[int]:
    ports: set[int] = set()
    for service in profile.services.values():
        managed = service.managed
        if managed is not None:
            ports.update(p for p in (managed.port, managed.host_port) if p is not None)
    return ports


def _collect(profile: Profile, instances: list[Instance], gpus: list[Gpu]) -> list[Process]:
    gpu_pids = {gp.pid for g in gpus for gp in g.processes}
    instance_pids = {i.pid for i in instances if i.pid is not None}
    return collect_processes(
        service_ports(profile), instance_pids | gpu_pids, lineage_of=gpu_pids, roots=instance_pids
    )


def _lineage(pid: int, by_pid: dict[int, Process]) -> list[int]:
    """``pid`` and its ancestors as far as the snapshot knows them."""
    chain = [pid]
    while (process := by_pid.get(chain[-1])) and process.ppid and process.ppid not in chain:
        chain.append(process.ppid)
    return chain


def _with_processes(gpu: Gpu, extra: list[GpuProcess]) -> Gpu:
    if not extra:
        return gpu
    processes = sorted([*gpu.processes, *extra], key=lambda p: p.pid)
    used = max(gpu.used_mb, sum(p.used_mb for p in processes))
    free = max(0, min(gpu.nvml_free_mb, gpu.total_mb - used))
    return gpu.model_copy(update={"processes": processes, "used_mb": used, "free_mb": free})
