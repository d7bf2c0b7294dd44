"""Fuzzing ``validate`` with mutated profiles and snapshots: never a traceback, always located lines."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler.cli import main
from reconciler.loading import dump_snapshot, parse_snapshot
from tests.test_loading_snapshot import YAML_SNAPSHOT

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [p.read_bytes() for p in sorted((ROOT / "profiles").glob("*.yaml"))]
SEEDS += [p.read_bytes() for p in sorted((ROOT.parent / "shared" / "cf-orch-profiles").glob("*.yaml"))]
SEEDS += [YAML_SNAPSHOT.encode(), dump_snapshot(parse_snapshot(YAML_SNAPSHOT, "s.yaml")).encode()]
LOCATED = re.compile(r"^.+:\d+:\d+: .+$")
YAMLISH = st.sampled_from([*":-[]{}&*!|>'\"#%@`,? \t\n\r", "\x00", "\xe9", "\u2028", "${", "{model}", "<<"])
VALUES = ["[]", "{}", "-1", "99999", "yes", "null", "'x'", "1.5", "*a", "&a x", "!!binary AA==", "[[[", '"${NOPE}"', ""]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["truncate", "delete", "insert", "replace", "swap-type", "bytes"]))
        if kind == "truncate":
            del data[where:]
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 40))]
        elif kind == "insert":
            data[where:where] = "".join(draw(st.lists(YAMLISH, min_size=1, max_size=6))).encode()
        elif kind == "replace" and where < len(data):
            data[where : where + 1] = draw(YAMLISH).encode()
        elif kind == "swap-type":
            lines = bytes(data).split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = re.sub(rb": .*$", b": " + draw(st.sampled_from(VALUES)).encode(), lines[i])
            data = bytearray(b"\n".join(lines))
        elif kind == "bytes":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def validate(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["validate", str(path)])
    return code, out.getvalue(), err.getvalue()


def check(path: Path) -> None:
    code, out, err = validate(path)
    assert code in (0, 1)
    assert err == "" and "Traceback" not in out
    if code == 1:
        lines = out.splitlines()
        assert lines and all(LOCATED.match(line) for line in lines), out
    else:
        assert out == f"ok: {path}\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(document=mutated())
@example(document=b"schema_version: 1\nname: x\nservices:\n  o\xe2\x80\xa8lama:")  # U+2028 in a name
def test_mutated_profiles_give_located_errors_or_pass(workdir, document):
    path = workdir / "mutated.yaml"
    path.write_bytes(document)
    check(path)


@settings(max_examples=100, deadline=None)
@given(document=st.binary(max_size=2000))
def test_random_bytes(workdir, document):
    path = workdir / "random.yaml"
    path.write_bytes(document)
    check(path)


def test_ten_megabyte_file(workdir):
    path = workdir / "huge.yaml"
    path.write_bytes(SEEDS[0] + b"#" * (10 << 20))
    check(path)
    assert "file too large" in validate(path)[1]
