"""The wait for GPU memory to come back after a stop or an eviction.

A stopped process's memory is released by the GPU driver a moment after the
process is gone; starting the next service before that risks an
out-of-memory. Before stopping, :func:`memory_watch` reads the GPU and sums
what the instance's process tree (its pid and descendants) uses there; the
returned condition holds once the GPU's used memory has dropped by at least
90 % of that amount. An instance spanning several GPUs is watched on each of
them: the condition holds once *every* one has given back its share, so
what starts next on any of them finds the memory there. A container of ours (no pid: NVML names processes we
cannot tie to it) is expected to give back the reservation the plan names,
bounded by what the GPU used. Nothing attributed — an adopted Ollama whose
usage only its API reports (the driver checks ``/api/ps`` itself), a CPU
service — means nothing to wait for: ``None``.
"""

from __future__ import annotations

import asyncio

import psutil

from reconciler.core.snapshot import Gpu, Instance
from reconciler.drivers.base import MemoryFreed
from reconciler.host.gpu import GpuBackend

FREED_FRACTION = 0.9


def process_tree(pid: int | None) -> set[int]:
    if pid is None:
        return set()
    try:
        proc = psutil.Process(pid)
        return {pid, *(child.pid for child in proc.children(recursive=True))}
    except psutil.Error:
        return {pid}


def _used(gpus: list[Gpu], index: int) -> int | None:
    gpu = next((g for g in gpus if g.index == index), None)
    return gpu.used_mb if gpu is not None else None


async def memory_watch(
    backend: GpuBackend, instance: Instance, reservation_mb: int | None
) -> tuple[MemoryFreed | None, int]:
    """(condition, MB expected back on all its GPUs) for ``instance``; (None, 0) when there is nothing to
    wait for."""
    if not instance.gpu_set:
        return None, 0
    gpus = await asyncio.to_thread(backend.read)
    tree = process_tree(instance.pid)
    watched: dict[int, tuple[int, int]] = {}  # GPU → (used before, MB expected back there)
    total = 0
    for index in instance.gpu_set:
        gpu = next((g for g in gpus if g.index == index), None)
        if gpu is None:
            continue
        attributed = sum(p.used_mb for p in gpu.processes if p.pid in tree)
        if attributed == 0 and instance.origin == "started" and instance.pid is None:
            attributed = min(reservation_mb or 0, gpu.used_mb)  # a container: NVML names other pids
        expect = int(attributed * FREED_FRACTION)
        if expect > 0:
            watched[index] = (gpu.used_mb, expect)
            total += attributed
    if not watched:
        return None, 0

    async def freed() -> bool:
        now = await asyncio.to_thread(backend.read)
        for index, (baseline, expect) in watched.items():
            used = _used(now, index)
            if used is not None and baseline - used < expect:
                return False
        return True

    return freed, total
