"""Which running instances to evict on one GPU to make room (DESIGN §3, "Eviction").

(For a service spanning several GPUs, the same order over one eviction across
a set of GPUs, and the choice of the set: :mod:`.gpu_sets`. A candidate that
spans several GPUs itself counts here with what it frees on the GPU in
question.)

Exact, not greedy. Among the sets of candidates (each closed under "what
depends on it goes too") that free enough, the chosen one, in this order:

1. has the least important *most important member* (largest minimum priority number);
2. evicts the fewest leased (busy) instances;
3. evicts the fewest instances;
4. frees the fewest MB;
5. comes first by sorted names.

Rule 1 is settled by trying priority levels from the least important down: at
level ``p`` only candidates whose whole closure has priority ≥ ``p`` may be
used, and the first level whose universe frees enough is the answer's level.
Within it a branch-and-bound search minimises (busy, count, MB, names); every
one of those only grows as members are added, which is what makes the
pruning exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

ChoiceKey = tuple[int, int, int, tuple[str, ...]]  # (busy, count, freed MB, names)
CostKey = tuple[int, int, int, int, tuple[str, ...]]  # (-top priority, *ChoiceKey)

class Candidate(NamedTuple):
    service: str
    priority: int
    busy: bool
    mb: int  # what evicting it frees on the GPU in question


class EvictionChoice(NamedTuple):
    services: tuple[str, ...]  # sorted
    freed: int
    busy: int

    @property
    def key(self) -> ChoiceKey:
        return (self.busy, len(self.services), self.freed, self.services)


def cost_key(choice: EvictionChoice, candidates: Mapping[str, Candidate]) -> CostKey:
    """Comparable cost of a choice, for comparing GPUs: smaller is cheaper."""
    top = min((candidates[s].priority for s in choice.services), default=None)
    return (0 if top is None else -top, *choice.key)


def choose_eviction(
    candidates: Mapping[str, Candidate],
    closures: Mapping[str, frozenset[str]],
    deficit: int,
) -> EvictionChoice | None:
    """The best set freeing at least ``deficit`` MB, or None when no set does.

    ``closures[name]`` is ``name`` plus everything evicted with it; every member
    must be a key of ``candidates`` (the caller drops candidates whose closure
    reaches something that may not be evicted).
    """
    if deficit <= 0:
        return EvictionChoice((), 0, 0)
    for level in sorted({c.priority for c in candidates.values()}, reverse=True):
        eligible = [
            name for name in candidates if all(candidates[m].priority >= level for m in closures[name])
        ]
        universe: frozenset[str] = frozenset().union(*(closures[n] for n in eligible)) if eligible else frozenset()
        if sum(candidates[m].mb for m in universe) < deficit:
            continue
        best = _search(candidates, closures, eligible, deficit)
        if best is not None:
            return best
    return None


def _search(
    candidates: Mapping[str, Candidate],
    closures: Mapping[str, frozenset[str]],
    eligible: list[str],
    deficit: int,
) -> EvictionChoice | None:
    """Branch and bound over the eligible candidates, largest closures first; members as bits."""
    names = sorted({m for n in eligible for m in closures[n]})
    bit = {n: 1 << i for i, n in enumerate(names)}
    member_mb = [candidates[n].mb for n in names]
    member_busy = [candidates[n].busy for n in names]
    items = sorted(eligible, key=lambda n: (-sum(candidates[m].mb for m in closures[n]), n))
    masks = [sum(bit[m] for m in closures[n]) for n in items]
    gains = [sum(candidates[m].mb for m in closures[n]) for n in items]  # the most an item can add
    top = [0] * (len(items) + 1)  # top[i]: gains of items[:i]; items are sorted by gain, descending
    for i, gain in enumerate(gains):
        top[i + 1] = top[i] + gain
    best: list[tuple[int, int, int, tuple[str, ...], int] | None] = [None]  # (busy, count, freed, names, mask)

    def visit(i: int, chosen: int, freed: int, busy: int, count: int) -> None:
        incumbent = best[0]
        if incumbent is not None and (busy, count) > incumbent[:2]:
            return
        if freed >= deficit:
            key = (busy, count, freed, tuple(n for n in names if chosen & bit[n]))
            if incumbent is None or key < incumbent[:4]:
                best[0] = (*key, chosen)
            return
        if incumbent is not None and (busy, count) == incumbent[:2]:
            return  # anything added makes it larger than the best already found
        if i == len(items) or freed + top[-1] - top[i] < deficit:
            return
        if incumbent is not None and busy == incumbent[0]:
            slots = incumbent[1] - count  # more members than this cannot tie the best
            if freed + top[min(len(items), i + slots)] - top[i] < deficit:
                return
        added = masks[i] & ~chosen
        if added:
            gained = gained_busy = members = 0
            while added:
                low = added & -added
                index = low.bit_length() - 1
                gained += member_mb[index]
                gained_busy += member_busy[index]
                members += 1
                added ^= low
            visit(i + 1, chosen | masks[i], freed + gained, busy + gained_busy, count + members)
        visit(i + 1, chosen, freed, busy, count)

    visit(0, 0, 0, 0, 0)
    if best[0] is None:
        return None
    busy, _, freed, chosen_names, _ = best[0]
    return EvictionChoice(chosen_names, freed, busy)
