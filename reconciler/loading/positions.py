"""Where each value of a parsed document was written: path → line and column.

A *path* is the tuple of mapping keys and list indexes leading to a value, the
same shape as a pydantic error's ``loc`` (``("services", "vllm", "max_mb")``).
For each path we keep where its key was written and where its value starts,
both 1-based. Errors about a key (unknown, duplicate, a missing field of the
mapping it introduces) point at the key; errors about a value point at the
value. A path that was never written (a union tag in a pydantic ``loc``, a
field that is missing) falls back to its nearest recorded ancestor.

``Mark`` and ``Spot`` are named tuples, not frozen dataclasses: see :mod:`reconciler.core` (issue 10).
"""

from __future__ import annotations

from typing import NamedTuple

Path = tuple[str | int, ...]


class Mark(NamedTuple):
    line: int
    col: int


class Spot(NamedTuple):
    key: Mark
    value: Mark


class Positions:
    def __init__(self) -> None:
        self._spots: dict[Path, Spot] = {(): Spot(Mark(1, 1), Mark(1, 1))}

    def record(self, path: Path, key: Mark, value: Mark) -> None:
        # An alias re-expands a subtree; the first (anchor) position wins.
        self._spots.setdefault(path, Spot(key, value))

    def __contains__(self, path: Path) -> bool:
        return path in self._spots

    def nearest(self, path: Path) -> tuple[Path, Spot]:
        """The longest recorded prefix of ``path`` and its spot."""
        for end in range(len(path), -1, -1):
            spot = self._spots.get(path[:end])
            if spot is not None:
                return path[:end], spot
        raise AssertionError("the root is always recorded")

    def key(self, path: Path) -> Mark:
        return self.nearest(path)[1].key

    def value(self, path: Path) -> Mark:
        return self.nearest(path)[1].value


def dotted(path: Path) -> str:
    """``services.vllm.depends_on[0]``: a path as an operator would write it."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
