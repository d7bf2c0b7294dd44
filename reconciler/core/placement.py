"""Where a new instance goes (DESIGN §3, "Placement").

Where the service already runs (or last ran); else the GPU where it fits
without eviction, most free first; else the GPU where eviction costs least
(the eviction order of :mod:`.eviction`, compared across GPUs); ties go to
the lowest index. ``gpus:`` (and a demand's ``gpu``) restrict the choice.
When nothing fits, the answer is :class:`NoPlacement` with a reason that
names the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from reconciler.core.eviction import Candidate, CostKey, EvictionChoice, choose_eviction, cost_key


@dataclass(frozen=True)
class EvictionOptions:
    """What may be evicted on one GPU for one requester."""

    candidates: Mapping[str, Candidate]
    closures: Mapping[str, frozenset[str]]
    blockers: list[str]  # "ollama (priority 1)" — running there, not evictable


@dataclass(frozen=True)
class Placement:
    """Where it goes, and what is evicted there first (nothing when it fits as is)."""

    gpu: int
    eviction: EvictionChoice


@dataclass(frozen=True)
class NoPlacement:
    """No allowed GPU can take it, even with evictions: why, with the numbers."""

    reason: str


NOTHING_EVICTED = EvictionChoice((), 0, 0)


def place(
    need: int,
    allowed: list[int],
    free: Mapping[int, int],
    options_on: Callable[[int], EvictionOptions],
    prefer: int | None = None,
) -> Placement | NoPlacement:
    """A placement for ``need`` MB on one of ``allowed`` GPUs, or why there is none."""
    if not allowed:
        return NoPlacement(f"needs {need} MB of GPU memory and no GPU here is allowed")
    if prefer is not None and prefer in allowed and free[prefer] >= need:
        return Placement(prefer, NOTHING_EVICTED)
    fitting = [g for g in allowed if free[g] >= need]
    if fitting:
        roomiest = min(fitting, key=lambda g: (-free[g], g))
        return Placement(roomiest, NOTHING_EVICTED)
    best_key: tuple[CostKey, int] | None = None
    best: Placement | None = None
    refusals: list[str] = []
    for gpu in sorted(allowed):
        options = options_on(gpu)
        choice = choose_eviction(options.candidates, options.closures, need - free[gpu])
        if choice is None:
            refusals.append(refusal(need, gpu, free[gpu], options))
            continue
        key = (cost_key(choice, options.candidates), gpu)
        if best_key is None or key < best_key:
            best_key, best = key, Placement(gpu, choice)
    return best if best is not None else NoPlacement(" | ".join(refusals))


def refusal(need: int, gpu: int, free: int, options: EvictionOptions) -> str:
    parts = [f"needs {need} MB on GPU {gpu}, {free} free"]
    if options.candidates:
        freed = sum(c.mb for c in options.candidates.values())
        names = ", ".join(sorted(options.candidates))
        parts.append(f"evicting {names} would free only {freed} MB")
    if options.blockers:
        verb = "is" if len(options.blockers) == 1 else "are"
        parts.append(f"{', '.join(options.blockers)} {verb} not evictable")
    return "; ".join(parts)
