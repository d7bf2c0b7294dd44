"""Which GPUs a service that spans several goes to, and what is evicted there (DESIGN §3, extended).

A service with ``gpu_count: N`` needs ``need`` MB on each of N distinct GPUs
at once. The choice, among the allowed GPUs (a demand may also ask that one
of them be in the set):

1. a set where it fits without eviction (``free ≥ need`` on each of its
   GPUs), preferring the most free memory in total; ties: lowest indices
   (the ascending index tuples compared);
2. else the set whose eviction costs least: over every set and every
   eviction that makes it fit on each of the set's GPUs, the eviction order
   of :mod:`.eviction` applied to the *union* of what is evicted — (1) the
   least important most important member, (2) the fewest busy, (3) the
   fewest instances, (4) the fewest MB freed on the set's GPUs, (5) names —
   then the lowest indices.

An eviction is a set of candidates closed under "what depends on it goes
too". A candidate frees memory on every GPU it holds (a service spanning
several GPUs frees on each), so one eviction can serve two GPUs of the set.
With ``N = 1`` the rules are exactly the single-GPU placement of
:mod:`.placement` (most free first; else least eviction cost, then the
lowest index), and :func:`choose_gpu_set` gives the same answers.

Exact, not greedy. Rule (1) is settled as in :mod:`.eviction`: from the
least important priority level down, the candidates whose whole closure is
at least that level form a closed *universe*; a set of GPUs can be made to
fit at that level exactly when the universe frees enough on each of its
GPUs, and the first level at which some set can is the answer's level (no
eviction whose most important member is less important exists, or that
level would have been first). Within the level every set that can fit is
searched by branch and bound over the candidates that free something on
it, minimising (busy, count, MB, names) with one incumbent shared across
the sets (so a set is searched only for what beats the best found so far).
Every one of those only grows as members are added; the search prunes on
that, on each GPU's remaining deficit against what the remaining
candidates could still free there, and — when the incumbent has as many
busy members — on the total deficit against the largest gains that the
members still allowed could bring. Each bound is a necessary condition,
which is what keeps the pruning exact. ``tests/test_gpu_sets.py`` checks it
against brute force over every set and every closed eviction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import NamedTuple

from reconciler.core.eviction import EvictionChoice


class Spread(NamedTuple):
    """A running instance that may be evicted, with what evicting it frees on each GPU."""

    service: str
    priority: int
    busy: bool
    mb: Mapping[int, int]  # GPU → MB freed there (GPUs it does not hold: absent or 0)


class GpuSetChoice(NamedTuple):
    """The GPUs chosen (ascending) and what is evicted first (nothing when it fits as is)."""

    gpus: tuple[int, ...]
    eviction: EvictionChoice  # freed: MB freed on the chosen GPUs, all together


SetKey = tuple[int, int, int, tuple[str, ...], tuple[int, ...]]  # (busy, count, freed MB, names, gpus)


def fitting_set(
    need: int, count: int, allowed: Sequence[int], free: Mapping[int, int], include: int | None = None
) -> tuple[int, ...] | None:
    """Rule 1: the set of ``count`` GPUs where ``need`` fits on each without eviction, most free in total
    first, ties to the lowest indices; None when there is none. ``include``: a GPU the set must contain."""
    # the roomiest GPUs make the most in total; among equally roomy ones the lowest indices
    # make the smallest ascending tuple
    fits = sorted((g for g in set(allowed) if free[g] >= need), key=lambda g: (-free[g], g))
    if include is not None:
        if include not in fits:
            return None
        fits = [include] + [g for g in fits if g != include]
    chosen = fits[:count]
    return tuple(sorted(chosen)) if len(chosen) == count else None


def choose_gpu_set(
    need: int,
    count: int,
    allowed: Sequence[int],
    free: Mapping[int, int],
    candidates: Mapping[str, Spread],
    closures: Mapping[str, frozenset[str]],
    include: int | None = None,
) -> GpuSetChoice | None:
    """The GPUs for ``count`` × ``need`` MB and the eviction that makes room (see the module docstring).

    ``closures[name]`` is ``name`` plus everything evicted with it; every member
    must be a key of ``candidates``. None when no set of ``count`` allowed GPUs
    (holding ``include``, when given) can be made to fit.
    """
    gpus = sorted(set(allowed))
    if count < 1 or len(gpus) < count or (include is not None and include not in gpus):
        return None
    fitting = fitting_set(need, count, gpus, free, include)
    if fitting is not None:
        return GpuSetChoice(fitting, EvictionChoice((), 0, 0))
    for level in sorted({c.priority for c in candidates.values()}, reverse=True):
        eligible = [n for n in sorted(candidates) if all(candidates[m].priority >= level for m in closures[n])]
        universe = frozenset().union(*(closures[n] for n in eligible)) if eligible else frozenset()
        covered = [g for g in gpus if free[g] + sum(candidates[m].mb.get(g, 0) for m in universe) >= need]
        sets = [s for s in combinations(covered, count) if include is None or include in s]
        if not sets:
            continue
        search = _SetSearch(need, free, candidates, closures, eligible)
        for gpu_set in sets:
            search.run(gpu_set)
        if search.best is not None:
            busy, _, freed, names, chosen = search.best
            return GpuSetChoice(chosen, EvictionChoice(names, freed, busy))
    return None


class _SetSearch:
    """Branch and bound over one priority level's eligible candidates, one GPU set at a time."""

    def __init__(
        self, need: int, free: Mapping[int, int], candidates: Mapping[str, Spread],
        closures: Mapping[str, frozenset[str]], eligible: list[str],
    ):
        self.need, self.free = need, free
        self.candidates, self.closures, self.eligible = candidates, closures, eligible
        self.best: SetKey | None = None

    def run(self, gpu_set: tuple[int, ...]) -> None:
        candidates, closures = self.candidates, self.closures
        deficits = [self.need - self.free[g] for g in gpu_set]

        def gain(name: str) -> list[int]:
            return [sum(candidates[m].mb.get(g, 0) for m in closures[name]) for g in gpu_set]

        # only candidates freeing something on the set can help: anything else only adds members
        gains = {n: gain(n) for n in self.eligible}
        items = sorted((n for n in self.eligible if sum(gains[n]) > 0), key=lambda n: (-sum(gains[n]), n))
        names = sorted({m for n in items for m in closures[n]})
        bit = {n: 1 << i for i, n in enumerate(names)}
        member_mb = [[candidates[n].mb.get(g, 0) for g in gpu_set] for n in names]
        member_busy = [candidates[n].busy for n in names]
        masks = [sum(bit[m] for m in closures[n]) for n in items]
        width, size = len(gpu_set), len(items)
        item_gains = [gains[n] for n in items]
        top = [0] * (size + 1)  # top[i]: total gains of items[:i] (sorted by total gain, descending)
        for i, g in enumerate(item_gains):
            top[i + 1] = top[i] + sum(g)
        rest = [[0] * width for _ in range(size + 1)]  # rest[i][k]: what items[i:] could free on GPU k
        for i in range(size - 1, -1, -1):
            rest[i] = [rest[i + 1][k] + item_gains[i][k] for k in range(width)]

        def visit(i: int, chosen: int, freed: list[int], busy: int, count: int) -> None:
            incumbent = self.best
            if incumbent is not None and (busy, count) > incumbent[:2]:
                return
            short = [max(0, deficits[k] - freed[k]) for k in range(width)]
            if not any(short):
                key: SetKey = (busy, count, sum(freed), tuple(n for n in names if chosen & bit[n]), gpu_set)
                if incumbent is None or key < incumbent:
                    self.best = key
                return
            if incumbent is not None and (busy, count) == incumbent[:2]:
                return  # anything added makes it larger than the best already found
            if i == size or any(short[k] > rest[i][k] for k in range(width)):
                return
            if incumbent is not None and busy == incumbent[0]:
                slots = incumbent[1] - count  # more members than this cannot tie the best
                if top[min(size, i + slots)] - top[i] < sum(short):
                    return
            added = masks[i] & ~chosen
            if added:
                more, gained_busy, members = list(freed), 0, 0
                while added:
                    low = added & -added
                    index = low.bit_length() - 1
                    for k in range(width):
                        more[k] += member_mb[index][k]
                    gained_busy += member_busy[index]
                    members += 1
                    added ^= low
                visit(i + 1, chosen | masks[i], more, busy + gained_busy, count + members)
            visit(i + 1, chosen, freed, busy, count)

        visit(0, 0, [0] * width, 0, 0)
