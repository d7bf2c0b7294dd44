"""The runtime benchmark still runs: its cheapest measurement, tiny (no timing is asserted)."""

from __future__ import annotations

from benchmarks import bench_runtime


def test_probe_fanout_runs_and_reports_a_row():
    row = bench_runtime.probe_fanout(count=3, rounds=2)
    assert row["runs"] == 2
    assert {"benchmark", "median_ms", "p95_ms", "target", "ok"} <= set(row)
    assert "all healthy" in row["value"]


def test_profile_text_is_a_valid_profile(tmp_path):
    from reconciler.loading import load_profile

    services = [{"name": "a", "label": "a", "port": 18001}, {"name": "slow", "label": "s", "port": 18002,
                                                             "args": "--startup-delay 0.5"}]
    for interval in (1, None):
        path = tmp_path / "profile.yaml"
        path.write_text(bench_runtime._profile_text(services, probe_interval_s=interval))
        profile = load_profile(path, environ={"RECONCILER_PYTHON": "/usr/bin/python3"})
        assert sorted(profile.services) == ["a", "slow"]
        assert profile.services["a"].probe_interval_s == (interval or 5)
