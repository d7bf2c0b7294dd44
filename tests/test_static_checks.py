"""The type checker and the linter pass, as configured in pyproject.toml (both are test dependencies).

mypy checks the package (``files``), strict everywhere and in any case on ``reconciler.core``; its
cache is ``.mypy_cache`` in the repository (``cache_dir``), so a second run takes a few seconds.
ruff checks the package, the tests and the benchmarks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_passes() -> None:
    result = run("mypy")
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"


def test_ruff_passes() -> None:
    result = run("ruff", "check", "reconciler", "tests", "benchmarks")
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}{result.stderr}"
