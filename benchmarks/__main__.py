"""``python -m benchmarks [NAME…]``: run the benchmark modules and print a table.

Without names, every ``bench_*`` module but the slow ones (:data:`SLOW`: the
kill -9 soak), which run when named (``./dev bench soak``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

SLOW = {"bench_soak"}  # run only when named: ./dev bench soak
COLUMNS = ("benchmark", "median_ms", "p95_ms", "p99_ms", "throughput_rps", "value", "target", "ok")


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = argv or sorted(p.stem for p in here.glob("bench_*.py") if p.stem not in SLOW)
    rows: list[dict] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name if name.startswith('bench_') else 'bench_' + name}")
        print(f"running {module.__name__} …", file=sys.stderr, flush=True)
        rows.extend(module.run())
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    table = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return 0 if all(row.get("ok", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
