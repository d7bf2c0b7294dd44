"""The GPU set choice of a service spanning several GPUs is exact: it agrees with brute force over
every set of GPUs and every closed eviction, and with the single-GPU placement when N = 1."""

from __future__ import annotations

import os
from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.eviction import Candidate, EvictionChoice
from reconciler.core.gpu_sets import GpuSetChoice, Spread, choose_gpu_set, fitting_set
from reconciler.core.placement import EvictionOptions, NoPlacement, place


def brute_force(need, count, allowed, free, candidates, closures, include=None):
    sets = [s for s in combinations(sorted(set(allowed)), count) if include is None or include in s]
    fitting = [s for s in sets if all(free[g] >= need for g in s)]
    if fitting:
        best = min(fitting, key=lambda s: (-sum(free[g] for g in s), s))
        return GpuSetChoice(best, EvictionChoice((), 0, 0))
    names = sorted(candidates)
    evictions = []
    for size in range(1, len(names) + 1):
        for subset in combinations(names, size):
            chosen = frozenset(subset)
            if all(closures[n] <= chosen for n in chosen):
                evictions.append(chosen)
    best_key, best = None, None
    for gpu_set in sets:
        for chosen in evictions:
            freed_on = {g: sum(candidates[n].mb.get(g, 0) for n in chosen) for g in gpu_set}
            if any(free[g] + freed_on[g] < need for g in gpu_set):
                continue
            top = min(candidates[n].priority for n in chosen)
            busy = sum(candidates[n].busy for n in chosen)
            freed = sum(freed_on.values())
            key = (-top, busy, len(chosen), freed, tuple(sorted(chosen)), gpu_set)
            if best_key is None or key < best_key:
                best_key = key
                best = GpuSetChoice(gpu_set, EvictionChoice(tuple(sorted(chosen)), freed, busy))
    return best


@st.composite
def set_cases(draw, max_gpus=4, max_candidates=6):
    gpus = list(range(draw(st.integers(1, max_gpus))))
    free = {g: draw(st.sampled_from([-500, 0, 1000, 4000, 8000, 12000])) for g in gpus}
    count = draw(st.integers(1, len(gpus)))
    names = [f"s{i}" for i in range(draw(st.integers(0, max_candidates)))]
    candidates = {}
    for n in names:
        held = draw(st.lists(st.sampled_from(gpus), min_size=1, max_size=min(3, len(gpus)), unique=True))
        mb = draw(st.sampled_from([0, 2000, 4000, 6000, 9000]))
        candidates[n] = Spread(n, draw(st.integers(2, 5)), draw(st.booleans()), dict.fromkeys(held, mb))
    closures = {}
    for i, n in enumerate(names):  # dependents come later in the list: a DAG
        later = names[i + 1:]
        dependents = draw(st.lists(st.sampled_from(later), max_size=2, unique=True)) if later else []
        closures[n] = frozenset([n, *dependents])
    for n in reversed(names):
        closures[n] = closures[n].union(*(closures[d] for d in closures[n] - {n}))
    allowed = draw(st.lists(st.sampled_from(gpus), min_size=1, unique=True))
    include = draw(st.one_of(st.none(), st.sampled_from(gpus)))
    need = draw(st.sampled_from([2000, 6000, 10000, 14000]))
    return need, count, allowed, free, candidates, closures, include


EXAMPLES = int(os.environ.get("EVICTION_EXAMPLES", "400"))


@settings(max_examples=EXAMPLES, deadline=None)
@given(set_cases())
def test_set_choice_matches_brute_force(case):
    need, count, allowed, free, candidates, closures, include = case
    assert choose_gpu_set(need, count, allowed, free, candidates, closures, include) == brute_force(
        need, count, allowed, free, candidates, closures, include)


@settings(max_examples=EXAMPLES, deadline=None)
@given(set_cases())
def test_one_gpu_is_the_single_gpu_placement(case):
    """With gpu_count 1 the set choice is today's placement: most free; else least eviction cost, lowest index."""
    need, _, allowed, free, candidates, closures, _ = case

    def options_on(gpu):
        single = {n: Candidate(n, c.priority, c.busy, c.mb.get(gpu, 0)) for n, c in candidates.items()}
        return EvictionOptions(single, closures, [])

    placed = place(need, sorted(allowed), free, options_on)
    chosen = choose_gpu_set(need, 1, allowed, free, candidates, closures)
    if isinstance(placed, NoPlacement):
        assert chosen is None
    else:
        assert chosen == GpuSetChoice((placed.gpu,), placed.eviction)


def test_fits_on_the_pair_with_the_most_free_in_total():
    free = {0: 20000, 1: 24000, 2: 22000, 3: 24000}
    assert fitting_set(20000, 2, [0, 1, 2, 3], free) == (1, 3)
    assert fitting_set(20000, 2, [0, 1, 2, 3], free, include=0) == (0, 1)
    assert fitting_set(20000, 3, [0, 1], free) is None


def test_ties_go_to_the_lowest_indices():
    free = {0: 24000, 1: 24000, 2: 24000}
    assert fitting_set(20000, 2, [2, 1, 0], free) == (0, 1)


def test_one_eviction_on_a_pair_serves_both_gpus():
    free = {0: 4000, 1: 4000, 2: 24000}
    candidates = {
        "pair": Spread("pair", 4, False, {0: 18000, 1: 18000}),
        "a": Spread("a", 4, False, {0: 18000}),
        "b": Spread("b", 4, False, {1: 18000}),
    }
    closures = {n: frozenset([n]) for n in candidates}
    chosen = choose_gpu_set(20000, 2, [0, 1], free, candidates, closures)
    assert chosen == GpuSetChoice((0, 1), EvictionChoice(("pair",), 36000, 0))
    # with GPU 2 allowed, evicting one instance on GPU 0 or 1 is enough; fewest MB, then the name
    chosen = choose_gpu_set(20000, 2, [0, 1, 2], free, candidates, closures)
    assert chosen == GpuSetChoice((0, 2), EvictionChoice(("a",), 18000, 0))


def test_the_least_important_top_member_decides_first():
    free = {0: 0, 1: 0, 2: 0}
    candidates = {
        "important": Spread("important", 2, False, {0: 24000, 1: 24000}),
        "x": Spread("x", 5, True, {1: 24000}),
        "y": Spread("y", 5, True, {2: 24000}),
    }
    closures = {n: frozenset([n]) for n in candidates}
    chosen = choose_gpu_set(20000, 2, [0, 1, 2], free, candidates, closures)
    assert chosen is not None and chosen.gpus == (1, 2) and chosen.eviction.services == ("x", "y")


def test_no_set_can_fit():
    free = {0: 14000, 1: 24000}
    assert choose_gpu_set(20000, 2, [0, 1], free, {}, {}) is None
    assert choose_gpu_set(20000, 3, [0, 1], free, {}, {}) is None
