"""Which running instances to evict on one GPU to make room (DESIGN §3, "Eviction").

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
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    service: str
    priority: int
    busy: bool
    mb: int  # what evicting it frees on the GPU in question


@dataclass(frozen=True)
class EvictionChoice:
    services: tuple[str, ...]  # sorted
    freed: int
    busy: int

    @property
    def key(self) -> tuple:
        return (self.busy, len(self.services), self.freed, self.services)


def cost_key(choice: EvictionChoice, candidates: Mapping[str, Candidate]) -> tuple:
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
        universe = frozenset().union(*(closures[n] for n in eligible)) if eligible else frozenset()
        if sum(candidates[m].mb for m in universe) < deficit:
            continue
        best = _search(candidates, closures, eligible, deficit)
        if best is not None:
            return best
    return None


def _search(candidates, closures, eligible, deficit) -> EvictionChoice | None:
    items = sorted(eligible, key=lambda n: (-sum(candidates[m].mb for m in closures[n]), n))
    suffix: list[frozenset[str]] = [frozenset()] * (len(items) + 1)
    for i in range(len(items) - 1, -1, -1):
        suffix[i] = suffix[i + 1] | closures[items[i]]

    def mb(members: frozenset[str]) -> int:
        return sum(candidates[m].mb for m in members)

    def busy(members: frozenset[str]) -> int:
        return sum(1 for m in members if candidates[m].busy)

    best: list[EvictionChoice | None] = [None]

    def visit(i: int, chosen: frozenset[str]) -> None:
        freed = mb(chosen)
        partial = (busy(chosen), len(chosen))
        if best[0] is not None and partial > best[0].key[:2]:
            return
        if freed >= deficit:
            choice = EvictionChoice(tuple(sorted(chosen)), freed, partial[0])
            if best[0] is None or choice.key < best[0].key:
                best[0] = choice
            return
        if best[0] is not None and partial == best[0].key[:2]:
            return  # anything added makes it larger than the best already found
        if i == len(items) or mb(chosen | suffix[i]) < deficit:
            return
        grown = chosen | closures[items[i]]
        if grown != chosen:
            visit(i + 1, grown)
        visit(i + 1, chosen)

    visit(0, frozenset())
    return best[0]
