"""``reconciler plan``: output formats and DESIGN §4 exit codes (0, 2, 3, 1, 64)."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.cli import build_parser, main, plan_cmd

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden"
SEED = GOLDEN / "01-seed-ollama-adopted-vllm-pending"  # pending → 3
CONVERGED = GOLDEN / "02-converged-no-changes"  # → 0
START = GOLDEN / "03-start-always-on"  # actions → 2
EVICT = GOLDEN / "13-evict-for-more-important"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RECONCILER = Path(sys.executable).with_name("reconciler")


def plan_args(scenario: Path, *extra: str) -> list[str]:
    return ["plan", "--profile", str(scenario / "profile.yaml"), "--snapshot", str(scenario / "snapshot.yaml"), *extra]


@pytest.mark.parametrize(("scenario", "code"), [(CONVERGED, 0), (START, 2), (SEED, 3)])
def test_exit_codes(scenario, code, capsys):
    assert main(plan_args(scenario)) == code
    out, err = capsys.readouterr()
    assert out == (scenario / "plan.txt").read_text(encoding="utf-8")
    assert err == ""


def test_pending_wins_over_actions(capsys):
    # The seed case adopts Ollama (an action) and leaves vllm pending: 3, not 2.
    assert main(plan_args(SEED, "--format", "json")) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["actions"] and data["pending"]


def test_json_format_is_the_golden_json(capsys):
    assert main(plan_args(EVICT, "--format", "json")) == 2
    assert capsys.readouterr().out == (EVICT / "plan.json").read_text(encoding="utf-8")


def test_markdown_format_has_a_table(capsys):
    assert main(plan_args(EVICT, "--format", "markdown")) == 2
    out = capsys.readouterr().out
    assert out.startswith("### reconciler plan: 1 to start, 1 to evict, 1 lease to grant; 0 pending\n")
    assert "| | Action | Kind | Service | GPU | MB | After | Reason |" in out
    assert "| ! | `evict:comfyui` | evict | `comfyui` | 0 | 6144 |" in out


def test_invalid_profile_exits_1_with_a_located_error(tmp_path, capsys):
    profile = tmp_path / "profile.yaml"
    profile.write_text("schema_version: 1\nname: x\nservices:\n  a:\n    max_mb: 10\n    priorty: 1\n")
    assert main(["plan", "--profile", str(profile), "--snapshot", str(START / "snapshot.yaml")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert re.search(rf"^{re.escape(str(profile))}:6:5: .*priorty", err, re.M), err
    assert "Traceback" not in err


def test_invalid_snapshot_exits_1_with_a_located_error(tmp_path, capsys):
    snapshot = tmp_path / "snapshot.yaml"
    snapshot.write_text(
        'format_version: 1\nnode: local\nnow: "2026-11-22T16:00:00Z"\ngpus: [{index: -1, total_mb: 8}]\n'
    )
    assert main(["plan", "--profile", str(START / "profile.yaml"), "--snapshot", str(snapshot)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"{snapshot}:4:")


def test_missing_file_exits_1(tmp_path, capsys):
    assert main(["plan", "--profile", str(tmp_path / "nope.yaml"), "--snapshot", str(START / "snapshot.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["plan"],
        ["plan", "--profile", "p.yaml"],
        plan_args(START, "--format", "yaml"),
        plan_args(START, "--color", "sometimes"),
        plan_args(START, "--bogus"),
    ],
    ids=["nothing", "no-snapshot", "bad-format", "bad-color", "unknown-option"],
)
def test_usage_errors_exit_64(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 64
    assert "usage:" in capsys.readouterr().err


def test_no_colour_when_not_a_tty(capsys):
    main(plan_args(EVICT))  # capsys' stdout is not a TTY
    assert not ANSI.search(capsys.readouterr().out)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_on_a_tty_unless_no_color(monkeypatch):
    for no_color, coloured in (("", True), ("1", False)):
        stream = _Tty()
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setenv("NO_COLOR", no_color)
        main(plan_args(EVICT))
        assert bool(ANSI.search(stream.getvalue())) is coloured


def test_color_flag_overrides_detection(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    main(plan_args(EVICT, "--color", "always"))
    assert ANSI.search(capsys.readouterr().out)
    monkeypatch.setattr(sys, "stdout", _Tty())
    main(plan_args(EVICT, "--color", "never"))
    assert not ANSI.search(sys.stdout.getvalue())


def test_json_and_markdown_are_never_coloured(capsys):
    for fmt in ("json", "markdown"):
        main(plan_args(EVICT, "--format", fmt, "--color", "always"))
        assert not ANSI.search(capsys.readouterr().out)


def test_a_closed_pipe_is_not_an_error(monkeypatch):
    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(plan_args(EVICT)) == 2
    plan_cmd.write_stdout("more")  # no exception either


def test_installed_command(tmp_path):
    result = subprocess.run([str(RECONCILER), *plan_args(SEED)], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 3, result.stderr
    assert result.stdout == (SEED / "plan.txt").read_text(encoding="utf-8")
    assert result.stderr == ""


def test_installed_command_survives_a_reader_that_goes_away():
    # `reconciler plan | head -0`: the pipe is closed before the plan is written.
    proc = subprocess.Popen([str(RECONCILER), *plan_args(EVICT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode == 2


@pytest.mark.parametrize(("watcher", "teardown"), [
    ("", False),
    ("import atexit; atexit.register(print, 'at exit')", True),
    ("sys.settrace(lambda *a: None)", True),
    ("sys.setprofile(lambda *a: None)", True),
])
def test_a_plan_ends_without_the_teardown_unless_something_wants_it(watcher, teardown):
    """A plan in its own process ends without the interpreter's teardown once its output is flushed
    (reconciler/cli/__init__.py), with its output and exit code, but not when something could want the
    teardown: a function registered with atexit, a tracer, a profiler."""
    script = f"import sys\n{watcher}\nsys.argv = ['reconciler', *{plan_args(START)!r}]\n" \
             "from reconciler.cli import main\ncode = main()\nprint('returned')\nsys.exit(code)\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == "", result.stderr
    plan = (START / "plan.txt").read_text(encoding="utf-8")
    assert result.stdout == (plan + "returned\n" + ("at exit\n" if "atexit" in watcher else "") if teardown else plan)


# What a command may not load: the HTTP stack, the runtime, the host's libraries, the other commands, and
# importlib.metadata (pydantic's plugin loader would import it: reconciler/cli/pydantic_plugins.py), and shutil
# (argparse's formatter would import it for the terminal's width: reconciler/cli/__init__.py).
NOT_FOR_PLAN = ("shutil", "fastapi", "starlette", "uvicorn", "httpx", "httpcore", "anyio", "psutil", "reconciler.api",
                "reconciler.gateway", "reconciler.runtime", "reconciler.host", "reconciler.store",
                "reconciler.cli.watch_cmd", "reconciler.cli.serve_cmd", "reconciler.cli.apply_cmd",
                "importlib.metadata")


@pytest.mark.parametrize("command", [
    plan_args(START),
    ["validate", str(START / "profile.yaml")],
])
def test_plan_and_validate_import_only_what_they_use(command):
    """A command imports what it uses (the CLI registers only the command run): a fresh interpreter
    that plans or validates has loaded none of the HTTP stack, the runtime or the host's libraries."""
    script = (
        "import sys\n"
        "from reconciler.cli import main\n"
        f"code = main({command!r})\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {NOT_FOR_PLAN!r} or m in {NOT_FOR_PLAN!r} "
        f"or any(m.startswith(p + '.') for p in {NOT_FOR_PLAN!r}))\n"
        "print(code, loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    code, _, loaded = result.stdout.strip().splitlines()[-1].partition(" ")
    assert code in ("0", "2") and loaded == "[]", result.stdout


@pytest.mark.parametrize("module", ["profile", "snapshot", "plan"])
def test_the_models_annotations_are_objects(module):
    """No ``from __future__ import annotations`` where the models are: pydantic would compile each annotation's
    text at every start (reconciler/core/profile.py)."""
    assert "annotations" not in vars(importlib.import_module(f"reconciler.core.{module}"))


@pytest.mark.parametrize("columns", ["30", "80", "200"])
@pytest.mark.parametrize("argv", [[], ["plan"], ["validate"]])
def test_help_is_laid_out_as_argparse_lays_it_out(argv, columns, monkeypatch):
    """The parser's formatter reads the terminal's width late (no shutil for a plan), to the same help."""
    monkeypatch.setenv("COLUMNS", columns)
    parser = build_parser(argv)
    if argv:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    ours = parser.format_help()
    parser.formatter_class = argparse.HelpFormatter
    assert ours == parser.format_help()


@pytest.mark.parametrize(("switch", "scanned"), [(None, False), ("", True), ("__all__", False)])
def test_pydantic_plugins_are_looked_for_only_when_pydantic_disable_plugins_is_set(switch, scanned):
    """The command line stands in for pydantic's plugin loader (no importlib.metadata, no scan of every
    installed distribution); with PYDANTIC_DISABLE_PLUGINS set, pydantic reads it as it always does."""
    script = (
        "import sys\n"
        "from reconciler.cli import main\n"
        f"code = main({plan_args(START)!r})\n"
        "from pydantic.plugin import _loader\n"
        "print(code, 'importlib.metadata' in sys.modules, _loader._plugins is not None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    if switch is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = switch
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["2", str(switch is not None), str(scanned)], result.stdout
