"""Every exception the reconciler raises on purpose, in one place (httpx-style).

    ReconcilerError
    ├── InputError            a file the operator wrote is wrong; carries located diagnostics
    │   ├── ProfileError
    │   └── SnapshotError
    ├── GuardError            a request refused for safety (e.g. a profile that would stop everything)
    └── HostError             the host could not be observed or changed
        ├── GpuBackendError   NVML missing or failing, a bad --gpu spec
        ├── DriverError       a process/docker/ollama driver failed
        └── StoreError        the state store could not be read or written

The CLI maps InputError to exit 1 with one ``file:line:col: message`` line per
diagnostic, and never shows a traceback for any of these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One located problem in a file. ``line`` and ``col`` are 1-based."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class ReconcilerError(Exception):
    """Base of all deliberate errors."""


class InputError(ReconcilerError):
    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sorted(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))


class ProfileError(InputError):
    """The profile is invalid; nothing was changed."""


class SnapshotError(InputError):
    """The state snapshot is invalid."""


class GuardError(ReconcilerError):
    """Refused for safety; the message says how to override, where one exists."""


class HostError(ReconcilerError):
    """The host could not be observed or changed."""


class GpuBackendError(HostError):
    """NVML is missing or failing, or a --gpu spec is bad."""


class DriverError(HostError):
    """A process, docker or ollama driver failed."""


class StoreError(HostError):
    """The state store could not be read or written."""
