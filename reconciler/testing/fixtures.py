"""Pytest fixtures for end-to-end tests; import them into a test module or conftest.

    from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)

    def test_x(spawner):
        svc = spawner.service(startup_delay=0.2)

Or, once for the whole suite, in ``tests/conftest.py``:
``pytest_plugins = ["reconciler.testing.fixtures"]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reconciler.testing.ports import Spawner


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    """A :class:`Spawner` whose processes are all gone when the test ends."""
    with Spawner() as spawn:
        yield spawn
