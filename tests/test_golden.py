"""Golden scenarios: golden/NN-name/{profile,snapshot}.yaml → the expected plan.txt and plan.json.

Each scenario pins one piece of DESIGN §3 with concrete numbers; the expected
files were checked by hand against DESIGN before they were accepted. To
rewrite them from the current planner (and then review the diff):

    ./dev test tests/test_golden.py --regen-golden

Scenarios in ``KNOWN_DISCREPANCIES`` hold what DESIGN requires where the
planner does something else; they are strict xfails (they start to "fail"
as XPASS the moment the planner is fixed, so the mark can be removed), and
regeneration leaves their expected files alone.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest

from reconciler.core.planner import Planner, plan
from reconciler.core.simulate import simulate
from reconciler.loading import load_profile, load_snapshot
from reconciler.render import render_json, render_text

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SCENARIOS = sorted(p for p in GOLDEN.iterdir() if p.is_dir()) if GOLDEN.is_dir() else []
MODELINES = {
    "profile.yaml": "# yaml-language-server: $schema=../../schemas/profile.schema.json",
    "snapshot.yaml": "# yaml-language-server: $schema=../../schemas/snapshot.schema.json",
}

# scenario directory name → what the planner does differently from DESIGN.
KNOWN_DISCREPANCIES: dict[str, str] = {}


def _param(scenario: Path):
    reason = KNOWN_DISCREPANCIES.get(scenario.name)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(scenario, id=scenario.name, marks=marks)


def rendered(scenario: Path) -> dict[str, str]:
    profile = load_profile(scenario / "profile.yaml", environ={})
    snapshot = load_snapshot(scenario / "snapshot.yaml")
    result = plan(profile, snapshot)
    return {"plan.txt": render_text(result, color=False), "plan.json": render_json(result)}


def _diff(name: str, expected: str, actual: str) -> str:
    lines = difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                 fromfile=f"expected/{name}", tofile=f"actual/{name}")
    return "".join(lines)


@pytest.mark.parametrize("scenario", [_param(s) for s in SCENARIOS])
def test_golden_plan(scenario: Path, request: pytest.FixtureRequest) -> None:
    outputs = rendered(scenario)
    if request.config.getoption("--regen-golden") and scenario.name not in KNOWN_DISCREPANCIES:
        for name, text in outputs.items():
            (scenario / name).write_text(text, encoding="utf-8")
        return
    problems = []
    for name, actual in outputs.items():
        expected_path = scenario / name
        expected = expected_path.read_text(encoding="utf-8") if expected_path.exists() else ""
        if actual != expected:
            problems.append(_diff(name, expected, actual) or f"{name} differs")
    if problems:
        pytest.fail(f"{scenario.name}: the plan differs from the golden files "
                    f"(--regen-golden rewrites them):\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_applying_the_plan_converges(scenario: Path) -> None:
    """DESIGN §3, minimality: planning the host the plan leaves behind plans nothing."""
    profile = load_profile(scenario / "profile.yaml", environ={})
    snapshot = load_snapshot(scenario / "snapshot.yaml")
    first = plan(profile, snapshot)
    second = plan(profile, simulate(profile, snapshot, first))
    assert second.actions == [], [f"{a.id}: {a.reason}" for a in second.actions]
    assert [(p.service, p.demand) for p in second.pending] == [(p.service, p.demand) for p in first.pending]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_no_order_of_the_plan_over_commits_a_gpu(scenario: Path) -> None:
    """Invariant 4 at every moment: no order the executor may choose books more than a GPU has."""
    planner = Planner(load_profile(scenario / "profile.yaml", environ={}), load_snapshot(scenario / "snapshot.yaml"))
    assert planner.over_commits(planner.run()) == {}


def test_there_are_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 30


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_files_are_complete(scenario: Path) -> None:
    for name, modeline in MODELINES.items():
        first = (scenario / name).read_text(encoding="utf-8").splitlines()[0]
        assert first == modeline, f"{scenario.name}/{name} must start with {modeline!r}"
    for name in ("plan.txt", "plan.json"):
        assert (scenario / name).is_file(), f"{scenario.name}/{name} is missing"
    data = json.loads((scenario / "plan.json").read_text(encoding="utf-8"))
    assert data["format_version"] == 1 and set(data["summary"]) == {
        "adopt", "start", "restart", "stop", "evict", "lease", "release"}
