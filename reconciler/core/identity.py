"""Which process is an instance: the identity rule (DESIGN §3, invariant 1).

A pid alone names nothing for long: the kernel hands a freed pid to the next
process that asks. An instance is therefore identified by its pid *and* the
start time the kernel recorded for that process (psutil's ``create_time``,
seconds since the epoch). A process with the instance's pid is the instance
only when the two start times agree within :data:`CREATE_TIME_TOLERANCE_S`
(the same process read twice can differ by rounding; two processes that
reuse a pid start seconds apart at the least). Otherwise the instance is dead,
and whatever has that pid now is someone else's — never to be signalled.

This module is the one place the rule is written; the planner's view of a
snapshot, the observer, the process driver's live checks and crash recovery
all ask it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

CREATE_TIME_TOLERANCE_S = 1.0


class Identified(Protocol):
    """Anything identified by a pid and a start time (an instance, an intent's record)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def create_time(self) -> float | None: ...


class Started(Protocol):
    @property
    def create_time(self) -> float: ...


def same_start(recorded: float | None, seen: float | None) -> bool:
    """Whether two start times are the same process's (within the tolerance)."""
    return recorded is not None and seen is not None and abs(recorded - seen) <= CREATE_TIME_TOLERANCE_S


def same_process(a: Identified, b: Identified) -> bool:
    """Whether two records name the same process: equal pids and the same start."""
    return a.pid is not None and a.pid == b.pid and same_start(a.create_time, b.create_time)


def is_running(subject: Identified, processes: Mapping[int, Started], *, trust_unknown_start: bool = False) -> bool:
    """Whether ``processes`` (pid → what runs under it now) shows ``subject`` itself running.

    ``trust_unknown_start``: a record without a start time (a snapshot written by
    hand) is taken to be whatever runs under its pid. The planner reads such
    snapshots; nothing that signals a process ever passes it.
    """
    if subject.pid is None:
        return False
    process = processes.get(subject.pid)
    if process is None:
        return False
    if subject.create_time is None:
        return trust_unknown_start
    return same_start(subject.create_time, process.create_time)
