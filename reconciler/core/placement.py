"""Where a new instance goes (DESIGN §3, "Placement").

Where the service already runs (or last ran); else the GPU where it fits
without eviction, most free first; else the GPU where eviction costs least
(the eviction order of :mod:`.eviction`, compared across GPUs); ties go to
the lowest index. ``gpus:`` (and a demand's ``gpu``) restrict the choice.
When nothing fits, the answer is :class:`NoPlacement` with a reason that
names the numbers.

A service with ``gpu_count: N > 1`` goes to a *set* of N GPUs
(:func:`place_set`): where it already ran, when that set still fits; else
the exact choice of :mod:`.gpu_sets` — the set where it fits without
eviction with the most free in total, else the set whose eviction (one
eviction across the set's GPUs) costs least, ties to the lowest indices. A
demand's ``gpu`` must then be one of the set. The refusal names each
allowed GPU's numbers: "needs 20000 MB on 2 GPUs; GPU 0: 14000 free, ollama
(priority 1) is not evictable; GPU 1: 24000 free".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from reconciler.core.eviction import Candidate, CostKey, EvictionChoice, choose_eviction, cost_key
from reconciler.core.gpu_sets import Spread, choose_gpu_set


class EvictionOptions(NamedTuple):
    """What may be evicted on one GPU for one requester."""

    candidates: Mapping[str, Candidate]
    closures: Mapping[str, frozenset[str]]
    blockers: list[str]  # "ollama (priority 1)" — running there, not evictable


class EvictionPool(NamedTuple):
    """What may be evicted for one requester, on every GPU at once (a candidate frees on each GPU it holds)."""

    candidates: Mapping[str, Spread]
    closures: Mapping[str, frozenset[str]]
    blockers: Mapping[int, list[str]]  # GPU → "ollama (priority 1)": running there, not evictable

    def on(self, gpu: int) -> EvictionOptions:
        """The same choice seen from one GPU."""
        single = {name: Candidate(name, c.priority, c.busy, c.mb.get(gpu, 0)) for name, c in self.candidates.items()}
        return EvictionOptions(single, self.closures, list(self.blockers.get(gpu, [])))


class Placement(NamedTuple):
    """Where it goes (one GPU, or every GPU it spans, ascending), and what is evicted first (nothing when
    it fits as is)."""

    gpus: tuple[int, ...]
    eviction: EvictionChoice

    @property
    def gpu(self) -> int:
        return self.gpus[0]


class NoPlacement(NamedTuple):
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
        return Placement((prefer,), NOTHING_EVICTED)
    fitting = [g for g in allowed if free[g] >= need]
    if fitting:
        roomiest = min(fitting, key=lambda g: (-free[g], g))
        return Placement((roomiest,), NOTHING_EVICTED)
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
            best_key, best = key, Placement((gpu,), choice)
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


def place_set(
    need: int,
    count: int,
    allowed: list[int],
    free: Mapping[int, int],
    pool: EvictionPool,
    prefer: tuple[int, ...] = (),
    include: int | None = None,
) -> Placement | NoPlacement:
    """A placement for ``need`` MB on each of ``count`` of the ``allowed`` GPUs (holding ``include``, when
    given), or why there is none. ``prefer``: the set it ran on last, kept when it still fits."""
    gpus = sorted(set(allowed))
    head = f"needs {need} MB on {count} GPUs"
    if len(gpus) < count:
        if not gpus:
            return NoPlacement(f"{head} and no GPU here is allowed")
        listed = ", ".join(str(g) for g in gpus)
        return NoPlacement(f"{head} and only {len(gpus)} may be used (GPU {listed})")
    if include is not None and include not in gpus:
        return NoPlacement(f"{head}, one of them GPU {include}, which may not be used")
    if (len(prefer) == count and set(prefer) <= set(gpus) and (include is None or include in prefer)
            and all(free[g] >= need for g in prefer)):
        return Placement(tuple(sorted(prefer)), NOTHING_EVICTED)
    choice = choose_gpu_set(need, count, gpus, free, pool.candidates, pool.closures, include)
    if choice is not None:
        return Placement(choice.gpus, choice.eviction)
    parts = [f"{head}" + (f", one of them GPU {include}" if include is not None else "")]
    for gpu in gpus:
        words = [f"GPU {gpu}: {max(0, free[gpu])} free"]
        there = sorted(n for n, c in pool.candidates.items() if c.mb.get(gpu, 0) > 0)
        if there and free[gpu] < need:
            freed = sum(pool.candidates[n].mb.get(gpu, 0) for n in there)
            words.append(f"evicting {', '.join(there)} would free {freed} MB")
        blockers = pool.blockers.get(gpu, [])
        if blockers and free[gpu] < need:
            words.append(f"{', '.join(blockers)} {'is' if len(blockers) == 1 else 'are'} not evictable")
        parts.append(", ".join(words))
    return NoPlacement("; ".join(parts))
