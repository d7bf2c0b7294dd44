"""Properties of the planner over random, self-consistent profiles and snapshots.

Every property also runs on hosts of up to four GPUs with services that span several of them
(``gpu_count``, :func:`tests.strategies.spanning_worlds`): no GPU over its total, convergence in
one step, and no order of an apply over-commits any GPU, each GPU counted on its own. Like the
one full GPU of :func:`~tests.strategies.crowded_worlds`, three full GPUs shared by pairs and
single-GPU services (:func:`~tests.strategies.crowded_spanning_worlds`) feed the every-order
property, where evictions, slots and starts meet in one plan.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.core.accounting import free_now, headroom, over_commits
from reconciler.core.compatibility import capacity
from reconciler.core.planner import Planner, plan
from reconciler.core.simulate import simulate
from reconciler.core.snapshot import Lease
from reconciler.core.world import World
from tests.strategies import crowded_spanning_worlds, crowded_worlds, spanning_worlds, worlds

SETTINGS = settings(
    max_examples=int(os.environ.get("PLANNER_EXAMPLES", "150")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def committed(world: World, gpu: int) -> int:
    view = world.gpus[gpu]
    return view.reserved + view.foreign


@SETTINGS
@given(st.one_of(worlds(), spanning_worlds()))
def test_every_action_has_a_reason_and_known_requirements(case):
    profile, snapshot = case
    result = plan(profile, snapshot)
    ids = {a.id for a in result.actions}
    assert len(ids) == len(result.actions)
    for position, action in enumerate(result.actions):
        assert action.reason.strip()
        earlier = {a.id for a in result.actions[:position]}
        assert set(action.requires) <= earlier, f"{action.id} requires something later or unknown"
    for item in result.pending:
        assert item.reason.strip()


@SETTINGS
@given(st.one_of(worlds(), spanning_worlds()))
def test_plan_never_reserves_more_than_a_gpu_holds(case):
    profile, snapshot = case
    result = plan(profile, snapshot)
    before, after = World(profile, snapshot), World(profile, simulate(profile, snapshot, result))
    before.account()
    after.account()
    for index, view in after.gpus.items():
        grew = committed(after, index) > committed(before, index)
        if grew:
            assert committed(after, index) <= view.total, f"GPU {index} over-committed by the plan"


@SETTINGS
@given(st.one_of(worlds(), spanning_worlds()))
def test_leases_never_exceed_max_concurrent(case):
    profile, snapshot = case
    result = plan(profile, snapshot)
    after = simulate(profile, snapshot, result)
    world = World(profile, after)
    for name, spec in profile.services.items():
        granted = [a for a in result.actions if a.kind == "lease" and a.service == name]
        if granted:
            assert len(world.leases_of(name)) <= capacity(spec)


@SETTINGS
@given(st.one_of(worlds(), spanning_worlds()))
def test_planning_the_simulated_result_converges_in_one_step(case):
    profile, snapshot = case
    first = plan(profile, snapshot)
    second = plan(profile, simulate(profile, snapshot, first))
    assert second.actions == [], "\n".join([
        profile.model_dump_json(exclude_defaults=True), snapshot.model_dump_json(exclude_defaults=True),
        *(f"first: {a.id}: {a.reason}" for a in first.actions),
        *(f"first pending: {p.service}: {p.reason}" for p in first.pending),
        *(f"second: {a.id}: {a.reason}" for a in second.actions)])
    if not second.pending:
        assert second.exit_code == 0
    else:
        assert second.exit_code == 3


@SETTINGS
@given(st.one_of(worlds(), crowded_worlds(), spanning_worlds(), crowded_spanning_worlds()))
def test_no_order_the_executor_may_choose_books_more_than_a_gpu_holds(case):
    """Invariant 4 at every moment of an apply: over every interleaving the ``requires`` DAG allows
    (the heaviest closure, :mod:`reconciler.core.interleavings`), a plan never books more than what
    was free before it (nor makes an over-committed GPU worse)."""
    profile, snapshot = case
    planner = Planner(profile, snapshot)
    result = planner.run()
    problems = planner.over_commits(result)
    assert not problems, "\n".join([
        *(f"GPU {gpu}: {why}" for gpu, why in problems.items()),
        *(f"{a.id} {a.mb} MB [after: {', '.join(a.requires)}]: {a.reason}" for a in result.actions)])


@SETTINGS
@given(st.one_of(worlds(), crowded_worlds(), spanning_worlds()), st.lists(
    st.tuples(st.integers(0, 1), st.integers(1, 4096), st.booleans()), max_size=8))
def test_vram_leases_added_as_a_sum_give_the_free_memory_of_accounting_them_one_by_one(case, vram):
    """The leasing service's hot path (issue 10): free memory from :func:`headroom` without VRAM leases, less
    their running sum per GPU, equals :func:`free_now` with every lease accounted."""
    profile, snapshot = case
    leases = list(snapshot.leases) + [
        Lease(id=f"v{n}", kind="vram", service=f"app{n}", holder=f"app{n}", gpu=gpu, mb=mb,
              expires_at=(snapshot.now + timedelta(hours=1)) if timed else None)
        for n, (gpu, mb, timed) in enumerate(vram)]
    made = plan(profile, snapshot)
    expected = free_now(profile, snapshot, made, leases, snapshot.now)
    rooms = headroom(profile, snapshot, [made], [lease for lease in leases if lease.kind != "vram"], snapshot.now)
    held = {}
    for lease in leases:
        if lease.kind == "vram" and lease.gpu is not None:
            held[lease.gpu] = held.get(lease.gpu, 0) + lease.mb
    assert {index: room.free(held.get(index, 0)) for index, room in rooms.items()} == expected


@SETTINGS
@given(st.one_of(worlds(), crowded_worlds(), spanning_worlds(), crowded_spanning_worlds()))
def test_an_over_committed_gpu_is_never_a_converged_plan(case):
    """Issue 8.2: a booked total above a GPU's total is relieved (an eviction or stop there) or said
    (a pending item naming the GPU), never a plan with nothing to do; and a plan that relieves it
    leaves the GPU within its total, or still says why not."""
    profile, snapshot = case
    world = World(profile, snapshot)
    world.account()
    result = plan(profile, snapshot)
    for over in over_commits(world):
        freed = [a for a in result.actions if a.kind in ("evict", "stop") and over.gpu in a.gpu_set]
        said = [p for p in result.pending if p.service == f"GPU {over.gpu}" or f"GPU {over.gpu}" in p.reason]
        assert freed or said, f"{over.describe()}, yet the plan neither frees memory there nor says why"
    after = World(profile, simulate(profile, snapshot, result))
    after.account()
    for over in over_commits(after):
        assert any(p.service == f"GPU {over.gpu}" for p in result.pending), \
            f"after the plan, {over.describe()} and no pending item says why"
