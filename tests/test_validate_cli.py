"""``reconciler validate``: exit codes, the three output formats, kind detection."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = ROOT / "profiles" / "single-gpu-8gb.yaml"
BAD_PROFILE = "schema_version: 1\nname: bad\nservices:\n  a: {max_mb: -1, priority: 1, depends: [b]}\n"
SNAPSHOT = "format_version: 1\nnode: local\nnow: 2026-11-22T16:00:00Z\ngpus: []\n"


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_PROFILE)
    return path


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(["validate", *argv])
    captured = capsys.readouterr()
    assert captured.err == ""
    return code, captured.out.splitlines()


def test_valid_files_exit_0_and_say_ok(capsys, tmp_path):
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(SNAPSHOT)
    assert run(capsys, str(GOOD), str(snapshot)) == (0, [f"ok: {GOOD}", f"ok: {snapshot}"])


def test_invalid_file_exits_1_with_one_line_per_problem(capsys, bad):
    assert run(capsys, str(bad)) == (
        1,
        [
            f"{bad}:4:15: services.a.max_mb: must be ≥ 0, got -1",
            f"{bad}:4:32: unknown key 'depends' in services.a; did you mean 'depends_on'?",
        ],
    )


def test_one_invalid_file_among_valid_ones_exits_1(capsys, bad):
    code, lines = run(capsys, str(GOOD), str(bad))
    assert code == 1
    assert lines[-1] == f"ok: {GOOD}" and len(lines) == 3


def test_json_format(capsys, bad):
    code = main(["validate", "--format", "json", str(bad)])
    assert code == 1
    assert json.loads(capsys.readouterr().out)[0] == {
        "file": str(bad),
        "line": 4,
        "col": 15,
        "message": "services.a.max_mb: must be ≥ 0, got -1",
    }


def test_json_format_of_valid_files_is_an_empty_list(capsys):
    assert main(["validate", "--format", "json", str(GOOD)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_github_format_escapes_properties(capsys, tmp_path):
    path = tmp_path / "a,b.yaml"
    path.write_text("schema_version: 1\nname: x\nservices: {a: {max_mb: 1, priority: 1, sharde: true}}\n")
    code, lines = run(capsys, "--format", "github", str(path))
    escaped = str(path).replace(",", "%2C").replace(":", "%3A")
    assert (code, lines) == (
        1,
        [f"::error file={escaped},line=3,col=40::unknown key 'sharde' in services.a; did you mean 'shared'?"],
    )


def test_kind_auto_detects_snapshots_and_kind_can_be_forced(capsys, tmp_path):
    path = tmp_path / "state.yaml"
    path.write_text(SNAPSHOT)
    assert run(capsys, str(path))[0] == 0
    code, lines = run(capsys, "--kind", "profile", str(path))
    assert code == 1
    assert any(line.startswith(f"{path}:1:1: unknown key 'format_version' at the top level") for line in lines)


def test_missing_file_is_a_located_problem_not_a_crash(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert run(capsys, str(missing)) == (1, [f"{missing}:1:1: cannot read file: no such file"])


def test_usage_error_exits_64(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["validate"])
    assert caught.value.code == 64
    capsys.readouterr()


def test_installed_command_exit_codes(bad):
    executable = Path(sys.executable).parent / "reconciler"
    if not executable.exists():
        pytest.skip(f"{executable} is not installed; run ./dev once")
    ok = subprocess.run([str(executable), "validate", str(GOOD)], capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, f"ok: {GOOD}\n", "")
    failed = subprocess.run([str(executable), "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert failed.stdout.startswith(f"{bad}:4:15: ") and "Traceback" not in failed.stderr



def test_a_bug_is_one_line_without_a_traceback(monkeypatch, capsys) -> None:
    """No traceback reaches a user: an unexpected error is said in one line, exit 1."""
    from reconciler.cli import main, validate_cmd

    def boom(args: object) -> int:
        raise KeyError(0)

    monkeypatch.setattr(validate_cmd, "run", boom)  # register() binds the module's run when the parser is built
    monkeypatch.delenv("RECONCILER_DEBUG", raising=False)
    assert main(["validate", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert "internal error (KeyError: 0)" in err and "Traceback" not in err and "RECONCILER_DEBUG=1" in err
