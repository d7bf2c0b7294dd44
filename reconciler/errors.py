"""Every exception the reconciler raises on purpose, in one place (httpx-style).

    ReconcilerError
    ├── InputError            a file the operator wrote is wrong; carries located diagnostics
    │   ├── ProfileError
    │   └── SnapshotError
    ├── GuardError            a request refused for safety (e.g. a profile that would stop everything)
    ├── LeaseRefused          a lease request not granted; its ``refusal`` says which way (a Refusal)
    ├── CallerGone            the caller of a waiting lease request went away; its demand was withdrawn
    ├── OperatorRefused       an operator's request (stop, restart…) that cannot be done: unknown, or a conflict
    └── HostError             the host could not be observed or changed
        ├── GpuBackendError   NVML missing or failing, a bad --gpu spec
        ├── DriverError       a process/docker/ollama driver failed
        └── StoreError        the state store could not be read or written

The CLI maps InputError to exit 1 with one ``file:line:col: message`` line per
diagnostic, and never shows a traceback for any of these. The HTTP API maps
each :class:`Refusal` to its status code (:mod:`reconciler.api.refusals`).
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

# the characters str.splitlines breaks at: a diagnostic is one line, whatever a file's names hold
_ONE_LINE = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


class Diagnostic(NamedTuple):
    """One located problem in a file. ``line`` and ``col`` are 1-based; sorted by file, line, column, message.

    A named tuple, not a dataclass: see :mod:`reconciler.core` (issue 10).
    """

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        """One line, always: a character that breaks lines (a name with U+2028 in it) is written escaped."""
        return f"{self.file}:{self.line}:{self.col}: {self.message}".translate(_ONE_LINE)


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


class Refusal(Enum):
    """Why a lease request was not granted."""

    UNKNOWN_SERVICE = "unknown service"  # the profile has no such service
    UNKNOWN_GPU = "unknown gpu"  # a VRAM lease for a GPU this node does not have
    QUEUE_FULL = "queue full"  # too many requests already wait for the service
    CANNOT_BE_MET = "cannot be met"  # not granted within its wait: the plan's reason says why
    ENDED = "ended"  # granted, but ended before it could be answered
    NO_VRAM = "insufficient vram"  # a VRAM lease larger than what is free
    NOT_OBSERVED = "not observed yet"  # the host has not been observed yet
    BUSY = "busy"  # the reconciler is busy for longer than a request waits
    CLOSING = "closing"  # the reconciler is shutting down


class LeaseRefused(ReconcilerError):
    """A lease request that is not granted: which way (``refusal``) and why, in words (``detail``)."""

    def __init__(self, refusal: Refusal, detail: str):
        super().__init__(detail)
        self.refusal = refusal
        self.detail = detail


class CallerGone(ReconcilerError):
    """The caller went away while its lease request waited; its demand was withdrawn."""


class OperatorRefused(ReconcilerError):
    """``reconciler stop|start|restart|reset`` refused: ``kind`` is ``unknown`` (no such service, a 404) or
    ``conflict`` (e.g. an adopted instance, which is never signalled: a 409); nothing was changed."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class HostError(ReconcilerError):
    """The host could not be observed or changed."""


class GpuBackendError(HostError):
    """NVML is missing or failing, or a --gpu spec is bad."""


class DriverError(HostError):
    """A process, docker or ollama driver failed."""


class StoreError(HostError):
    """The state store could not be read or written."""
