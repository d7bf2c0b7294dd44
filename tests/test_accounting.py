"""The over-commit figure (issue 8.2): how far each GPU's booked total is above its total.

Pure: a golden scenario's profile and snapshot in, a figure per GPU out —
the one :mod:`reconciler.api.status` shows as ``over_committed_mb`` and an
``over_committed`` condition, and a per-GPU gauge can read.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.core.accounting import OverCommit, over_commits, over_committed_mb
from reconciler.core.world import World
from reconciler.loading import load_profile, load_snapshot

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def world_of(scenario: str) -> World:
    directory = next(GOLDEN.glob(f"{scenario}-*"))
    world = World(load_profile(directory / "profile.yaml", environ={}), load_snapshot(directory / "snapshot.yaml"))
    world.account()
    return world


def test_a_gpu_booked_beyond_its_total_says_by_how_much() -> None:
    world = world_of("63")  # comfyui + tts, 4608 MB each, both running on an 8 GB GPU after a crash
    assert over_commits(world) == [OverCommit(gpu=0, total_mb=8192, booked_mb=9216)]
    assert over_committed_mb(world) == {0: 1024}
    assert over_commits(world)[0].describe() == (
        "GPU 0 is over-committed: 9216 MB booked on 8192 MB, 1024 MB too many")


def test_foreign_usage_counts_and_an_exact_fit_is_not_over() -> None:
    assert over_commits(world_of("44")) == []  # an exact fit is enough (DESIGN §3)
    world = world_of("44")
    view = world.gpus[0]
    assert view.reserved + view.foreign <= view.total
    view.foreign += view.total - view.reserved - view.foreign + 1  # one MB of foreign growth too many
    assert over_committed_mb(world) == {0: 1}


def test_every_gpu_has_a_figure_zero_where_it_fits() -> None:
    world = world_of("30")  # several GPUs, none over-committed
    figures = over_committed_mb(world)
    assert sorted(figures) == sorted(world.gpus) and len(figures) > 1
    assert set(figures.values()) == {0}
