"""Shared pytest configuration.

``--regen-golden``: rewrite the expected ``plan.txt``/``plan.json`` of every
golden scenario from the current planner instead of comparing with them
(see golden/README.md). Scenarios marked as known planner discrepancies in
tests/test_golden.py keep their hand-written expectations.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden",
        action="store_true",
        default=False,
        help="rewrite golden/*/plan.txt and plan.json from the current planner (review the diff!)",
    )
