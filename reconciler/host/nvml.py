"""NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

NVML is initialised once per backend and shut down on ``close()``. Driver and
binding versions differ in what they offer, so each reading falls back:
compute processes ``_v3`` → ``_v2`` → plain (graphics processes likewise, and
optional); memory info ``version=nvmlMemory_v2`` → v1. A process whose
``usedGpuMemory`` is unknown (None, e.g. WDDM or some containers) is kept with
0 MB, so its pid still identifies it. Memory is reported in MiB: capacities
rounded down, usage rounded up (never overstate what is free). Every NVML
failure surfaces as :class:`GpuBackendError`, never as a raw ``NVMLError``.
"""

from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any

from reconciler.core.snapshot import Gpu, GpuProcess
from reconciler.errors import GpuBackendError

MIB = 1024 * 1024
_NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED: e.g. process lists on some vGPU/MIG setups

_COMPUTE = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)
_GRAPHICS = (
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses_v2",
    "nvmlDeviceGetGraphicsRunningProcesses",
)


def mb_floor(nbytes: int | None) -> int:
    return max(0, int(nbytes or 0) // MIB)


def mb_ceil(nbytes: int | None) -> int:
    return max(0, -(-int(nbytes or 0) // MIB))


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """GPU readings from NVML. Raises GpuBackendError when NVML is unavailable."""

    name = "nvml"

    def __init__(self, module: ModuleType | None = None):
        self._nvml = module if module is not None else _import_pynvml()
        self._error: type[BaseException] = getattr(self._nvml, "NVMLError", Exception)
        try:
            self._nvml.nvmlInit()
        except self._error as exc:
            raise GpuBackendError(
                f"NVML is not available ({_describe(exc)}): no NVIDIA driver on this host? "
                "Use --gpu auto for a CPU-only host or --gpu sim:8192 to simulate a GPU"
            ) from None
        self._open = True

    def read(self) -> list[Gpu]:
        if not self._open:
            raise GpuBackendError("NVML backend is closed")
        try:
            return [self._read_device(i) for i in range(self._nvml.nvmlDeviceGetCount())]
        except self._error as exc:
            raise GpuBackendError(f"NVML reading failed: {_describe(exc)}") from None

    def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(self._error):  # nothing left to release
                self._nvml.nvmlShutdown()

    def _read_device(self, index: int) -> Gpu:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = self._memory_info(handle)
        used: dict[int, int] = {}
        for info in self._processes(handle, _COMPUTE, required=True) + self._processes(
            handle, _GRAPHICS, required=False
        ):
            # A process in both lists (compute + graphics) holds one allocation: take the larger.
            used[int(info.pid)] = max(used.get(int(info.pid), 0), mb_ceil(info.usedGpuMemory))
        return Gpu(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            total_mb=mb_floor(memory.total),
            used_mb=mb_ceil(memory.used),
            free_mb=mb_floor(memory.free),
            processes=[GpuProcess(pid=pid, used_mb=mb) for pid, mb in sorted(used.items())],
        )

    def _memory_info(self, handle: Any) -> Any:
        version = getattr(self._nvml, "nvmlMemory_v2", None)
        if version is not None:
            try:
                return self._nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            except (self._error, TypeError):
                pass  # driver without nvmlDeviceGetMemoryInfo_v2, or an old binding: use v1
        return self._nvml.nvmlDeviceGetMemoryInfo(handle)

    def _processes(self, handle: Any, names: tuple[str, ...], *, required: bool) -> list[Any]:
        last: BaseException | None = None
        for name in names:
            function = getattr(self._nvml, name, None)
            if function is None:
                continue
            try:
                return list(function(handle))
            except self._error as exc:
                last = exc  # e.g. function not found in this driver: try the older one
        if required and last is not None and getattr(last, "value", None) != _NOT_SUPPORTED:
            raise last
        return []


def _import_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise GpuBackendError(
            "NVML bindings are missing: install nvidia-ml-py (import name pynvml), "
            "or use --gpu auto / --gpu sim:8192"
        ) from None


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
