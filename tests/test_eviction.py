"""The eviction choice is exact: it agrees with brute force over every closed subset."""

from __future__ import annotations

import os
from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.eviction import Candidate, EvictionChoice, choose_eviction


def brute_force(candidates, closures, deficit):
    names = sorted(candidates)
    best = None
    for size in range(len(names) + 1):
        for subset in combinations(names, size):
            chosen = frozenset(subset)
            if any(not closures[n] <= chosen for n in chosen):
                continue  # not closed under "dependents go too"
            freed = sum(candidates[n].mb for n in chosen)
            if freed < deficit:
                continue
            top = min((candidates[n].priority for n in chosen), default=None)
            busy = sum(candidates[n].busy for n in chosen)
            key = (0 if top is None else -top, busy, len(chosen), freed, tuple(sorted(chosen)))
            if best is None or key < best[0]:
                best = (key, EvictionChoice(tuple(sorted(chosen)), freed, busy))
    return None if best is None else best[1]


@st.composite
def eviction_cases(draw):
    count = draw(st.integers(0, 7))
    names = [f"s{i}" for i in range(count)]
    candidates = {
        n: Candidate(n, draw(st.integers(2, 5)), draw(st.booleans()), draw(st.sampled_from([0, 256, 512, 1024, 2048])))
        for n in names
    }
    closures = {}
    for i, n in enumerate(names):  # dependents come later in the list: a DAG
        dependents = draw(st.lists(st.sampled_from(names[i + 1:]), max_size=2, unique=True)) if i + 1 < count else []
        closures[n] = frozenset([n, *dependents])
    for n in reversed(names):  # transitive closure
        closures[n] = closures[n].union(*(closures[d] for d in closures[n] - {n}))
    deficit = draw(st.integers(1, 6000))
    return candidates, closures, deficit


@settings(max_examples=int(os.environ.get("EVICTION_EXAMPLES", "400")), deadline=None)
@given(eviction_cases())
def test_choice_matches_brute_force(case):
    candidates, closures, deficit = case
    assert choose_eviction(candidates, closures, deficit) == brute_force(candidates, closures, deficit)


def test_nothing_to_free_evicts_nothing():
    assert choose_eviction({"a": Candidate("a", 4, False, 100)}, {"a": frozenset("a")}, 0).services == ()


def test_least_important_top_member_beats_fewer_instances():
    candidates = {
        "big": Candidate("big", 2, False, 6000),
        "x": Candidate("x", 4, False, 3000),
        "y": Candidate("y", 4, False, 3000),
    }
    closures = {n: frozenset([n]) for n in candidates}
    assert choose_eviction(candidates, closures, 6000).services == ("x", "y")


def test_idle_beats_busy_even_when_more_instances_go():
    candidates = {
        "busy": Candidate("busy", 3, True, 4000),
        "a": Candidate("a", 3, False, 2000),
        "b": Candidate("b", 3, False, 2000),
    }
    closures = {n: frozenset([n]) for n in candidates}
    assert choose_eviction(candidates, closures, 4000).services == ("a", "b")


def test_no_set_frees_enough():
    candidates = {"a": Candidate("a", 3, False, 100)}
    assert choose_eviction(candidates, {"a": frozenset("a")}, 101) is None
