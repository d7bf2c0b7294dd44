"""GPU backends: one small interface, chosen by the ``--gpu`` spec.

A backend answers one question, ``read()``: the GPUs as NVML would report them
(:class:`reconciler.core.snapshot.Gpu`, memory in MiB, per-process usage).
``nvml`` reads the real devices; ``sim:…`` simulates devices whose usage comes
from processes that declare it in their environment (demo, laptops, CI);
``auto`` is NVML when it works and otherwise *no GPU at all* — a CPU-only host,
never a silent simulation. A bad spec is a :class:`GpuBackendError` that says
what to write instead.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from reconciler.core.snapshot import Gpu
from reconciler.errors import GpuBackendError
from reconciler.host.nvml import NvmlBackend
from reconciler.host.sim import SimBackend, parse_sim_spec
from reconciler.host.specs import SPEC_HELP


@runtime_checkable
class GpuBackend(Protocol):
    """Where GPU memory readings come from."""

    name: str

    def read(self) -> list[Gpu]:
        """The GPUs now, ordered by index. Raises GpuBackendError when the reading fails."""
        ...

    def close(self) -> None:
        """Release the backend (idempotent)."""
        ...


class NoGpuBackend:
    """A CPU-only host: no GPUs. What ``auto`` becomes when NVML is unavailable."""

    name = "none"

    def __init__(self, reason: str = ""):
        self.reason = reason

    def read(self) -> list[Gpu]:
        return []

    def close(self) -> None:
        pass


def open_gpu_backend(spec: str, *, default_sim_mb: int | None = None) -> GpuBackend:
    """The backend for a ``--gpu`` spec: ``nvml``, ``auto``, ``none`` or ``sim:…``.

    ``default_sim_mb`` sizes a bare ``sim`` (the profile's ``vram_total_mb``).
    """
    spec = spec.strip()
    if spec == "nvml":
        return NvmlBackend()
    if spec == "auto":
        try:
            return NvmlBackend()
        except GpuBackendError as exc:
            return NoGpuBackend(reason=str(exc))
    if spec == "none":
        return NoGpuBackend(reason="--gpu none")
    if spec == "sim" or spec.startswith("sim:"):
        arg = spec[4:]
        if not arg:
            if default_sim_mb is None:
                raise GpuBackendError(f"--gpu sim needs a size here; {SPEC_HELP}")
            arg = str(default_sim_mb)
        return SimBackend(parse_sim_spec(arg))
    raise GpuBackendError(f"unknown GPU backend {spec!r}; {SPEC_HELP}")
