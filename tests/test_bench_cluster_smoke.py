"""The cluster benchmark's profiles are valid, and it says why it skips without etcd (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_cluster
from reconciler.loading import load_profile


def test_bench_profiles_are_valid(tmp_path: Path) -> None:
    for node, size in bench_cluster.SIZES.items():
        path = tmp_path / f"{node}.yaml"
        path.write_text(bench_cluster._profile(node))
        profile = load_profile(path, environ={"RECONCILER_PYTHON": "/usr/bin/python3"})
        assert profile.vram_total_mb == size
        assert profile.services["embed"].always_on is (node == "c")


def test_without_etcd_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_cluster, "find_etcd", lambda: None)
    rows = bench_cluster.run()
    assert len(rows) == 1 and "etcd is not installed" in rows[0]["benchmark"]
