"""Simulation scopes: a simulated GPU counts only the carriers of its own ``RECONCILER_SIM_SCOPE``.

Without scopes, a demo left running and a test run on the same machine (or two
tests at once) would see each other's simulated memory.
"""

from __future__ import annotations

import pytest

from reconciler.host.gpu import open_gpu_backend
from reconciler.host.sim import SCOPE_ENV, EnvScanner, _declaration
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)


class FakeProc:
    def __init__(self, env):
        self.env = env

    def environ(self):
        return self.env


@pytest.mark.parametrize(
    ("env", "scope", "expected"),
    [
        ({"RECONCILER_SIM_GPU_MB": "100"}, None, ("0", 100)),
        ({"RECONCILER_SIM_GPU_MB": "100", SCOPE_ENV: ""}, None, ("0", 100)),  # empty = unset
        ({"RECONCILER_SIM_GPU_MB": "100", SCOPE_ENV: "a"}, None, None),
        ({"RECONCILER_SIM_GPU_MB": "100", SCOPE_ENV: "a"}, "a", ("0", 100)),
        ({"RECONCILER_SIM_GPU_MB": "100", SCOPE_ENV: "a"}, "b", None),
        ({"RECONCILER_SIM_GPU_MB": "100"}, "a", None),
    ],
)
def test_declaration_in_scope(env, scope, expected):
    assert _declaration(FakeProc(env), scope) == expected


def test_backends_in_different_scopes_do_not_see_each_other(spawner, monkeypatch):
    mine = spawner.service(env={"RECONCILER_SIM_GPU_MB": "700", SCOPE_ENV: "test-scope-mine"})
    other = spawner.service(env={"RECONCILER_SIM_GPU_MB": "900", SCOPE_ENV: "test-scope-other"})
    monkeypatch.setenv(SCOPE_ENV, "test-scope-mine")
    backend = open_gpu_backend("sim:8192")  # takes the scope of its environment
    pids = {p.pid: p.used_mb for p in backend.read()[0].processes}
    assert pids.get(mine.pid) == 700 and other.pid not in pids
    assert other.pid in EnvScanner(scope="test-scope-other").scan()
