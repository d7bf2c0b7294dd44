"""A service's log: where it is, its last lines, and what was appended since.

The process driver appends a service's stdout and stderr, after a header
line per launch, to ``<state dir>/logs/<service>.log`` (one file across
restarts, so the lines before a crash are still there after it). Both
``reconciler logs`` and ``GET /v1/services/{name}/logs`` read it from here:

* :func:`tail` reads backwards from the end, a block at a time, so the last
  lines of a large log cost what they are, not what the file is; it reads
  at most :data:`MAX_TAIL_BYTES` (a line longer than that is cut, marked
  ``…``), and bytes that are not UTF-8 are shown as ``\\ufffd``.
* :class:`Follower` remembers an offset and returns the complete lines
  appended since (``-f``); a file that shrank (truncated, or replaced by
  another one) is read again from its start, as ``tail -F`` does.

A docker service writes no such file (its output is the container's:
``docker logs``); :func:`missing_reason` says so, and says when a service
never started at all.
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_DIR = "logs"
BLOCK = 64 * 1024
MAX_TAIL_BYTES = 4 * 1024 * 1024
MAX_LINES = 10000
DEFAULT_LINES = 100


def log_path(state_dir: Path, service: str) -> Path:
    return Path(state_dir) / LOG_DIR / f"{service}.log"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def tail(path: Path, lines: int = DEFAULT_LINES) -> list[str]:
    """The last ``lines`` lines of ``path`` (without their newlines); OSError when it cannot be read."""
    lines = max(0, min(lines, MAX_LINES))
    if lines == 0:
        return []
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        data = b""
        position = end
        while position > 0 and data.count(b"\n") <= lines and end - position < MAX_TAIL_BYTES:
            step = min(BLOCK, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    cut = position > 0
    if data.endswith(b"\n"):
        data = data[:-1]
    parts = data.split(b"\n") if data else []
    if cut and parts and len(parts) <= lines:
        parts[0] = b"\xe2\x80\xa6" + parts[0]  # the first line read is only its end
    return [_decode(p) for p in parts[-lines:]]


class Follower:
    """Complete lines appended to a file since the last call (``reconciler logs -f``)."""

    def __init__(self, path: Path, offset: int | None = None):
        self.path = path
        self.offset = offset if offset is not None else (path.stat().st_size if path.exists() else 0)
        self._partial = b""

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                if size < self.offset:  # truncated or replaced: from its start again
                    self.offset, self._partial = 0, b""
                handle.seek(self.offset)
                data = handle.read(MAX_TAIL_BYTES)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        return [_decode(line) for line in complete]


def missing_reason(service: str, path: Path, container: str | None) -> str:
    """Why there is no log file to show, in words."""
    if container:
        return f"{service} runs in a docker container: its output is `docker logs {container}`"
    return f"no log for {service} yet ({path} does not exist: the reconciler has not started it here)"
