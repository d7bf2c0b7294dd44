"""A service's log read backwards (the last N lines) and followed (``reconciler logs -f``), on real files."""

from __future__ import annotations

from pathlib import Path

from reconciler.runtime import logs


def test_tail_reads_the_last_lines_of_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    path.write_bytes(b"".join(f"line {n}\n".encode() for n in range(100_000)) + b"no newline \xff")
    assert logs.tail(path, 3) == ["line 99998", "line 99999", "no newline \ufffd"]
    assert logs.tail(path, 0) == []
    assert len(logs.tail(path, logs.MAX_LINES + 5)) == logs.MAX_LINES
    path.write_text("")
    assert logs.tail(path, 5) == []


def test_a_very_long_line_is_cut_and_marked(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    path.write_bytes(b"x" * (logs.MAX_TAIL_BYTES + 10) + b"\nlast\n")
    first, last = logs.tail(path, 2)
    assert first.startswith("…") and last == "last"


def test_follow_returns_complete_lines_and_starts_over_after_a_truncation(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    path.write_text("old\n")
    follower = logs.Follower(path)
    assert follower.read() == []
    with open(path, "a") as out:
        out.write("one\ntw")
    assert follower.read() == ["one"]
    with open(path, "a") as out:
        out.write("o\n")
    assert follower.read() == ["two"]
    path.write_text("new\n")  # truncated and rewritten: shorter than where we were
    assert follower.read() == ["new"]
    path.unlink()
    assert follower.read() == []


def test_missing_reason_names_docker_and_never_started() -> None:
    assert "docker logs rc-x" in logs.missing_reason("x", Path("/s/logs/x.log"), "rc-x")
    assert "has not started it here" in logs.missing_reason("x", Path("/s/logs/x.log"), None)
