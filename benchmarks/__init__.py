"""Benchmarks: ``./dev bench`` runs every ``benchmarks/bench_*.py`` and prints one table.

Each module exposes ``run() -> list[dict]``; a row has at least ``benchmark``,
and usually ``median_ms``, ``p95_ms`` (or ``p99_ms``) and ``target``. Targets
live here, not in timed tests that would flake.
"""
