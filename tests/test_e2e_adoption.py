"""End to end: adopting a running Ollama, releasing it untouched, and leaving squatters alone.

A process the reconciler did not start is never signalled (invariant 1): a
healthy listener on the port of an ``adopt: true`` service is adopted (no
second one started); one that is unhealthy, or sits on the port of a service
that does not adopt, is left alone and the service waits, with a reason that
names the port and the squatter's pid.
"""

from __future__ import annotations

import signal

from reconciler.testing.ports import is_listening
from tests.e2e_support import (  # noqa: F401
    Host,
    alive,
    host,
    ollama_block,
    profile_text,
    service_block,
    wait_until,
)


def test_adopt_then_release_leaves_it_running(host: Host) -> None:
    port, other = host.port(), host.port()
    ollama = host.start_foreign("reconciler.testing.fake_ollama", "--port", str(port), sim_mb=1024)
    wait_until(lambda: is_listening(port), what="the fake Ollama listening")
    host.write(profile_text(ollama_block("ollama", port), service_block("alpha", other)))
    run = host.watch()
    first = run.wait_kind("pass.finished", reason="start")
    assert sorted(first["actions"]) == ["adopt:ollama", "start:alpha"]
    run.wait_converged()
    instance = host.instances()["ollama"]
    assert instance.origin == "adopted" and instance.pid == ollama.pid
    assert host.listeners(port) == [ollama.pid]  # nothing else was started on its port
    assert not any(e["kind"] == "instance.launched" and e["service"] == "ollama" for e in run.events)

    host.write(profile_text(service_block("alpha", other)))
    released = run.wait_kind("pass.finished", reason="profile")
    assert released["actions"] == ["release:ollama"] and released["outcomes"] == {"done": 1}
    assert "ollama" not in host.instances()
    assert alive(ollama.pid) and host.listeners(port) == [ollama.pid]
    run.signal(signal.SIGINT)
    assert run.wait_exit() == 0


def test_squatters_are_neither_adopted_nor_killed(host: Host) -> None:
    plain_port, adopt_port = host.port(), host.port()
    # healthy, but its service does not adopt
    plain = host.start_foreign("reconciler.testing.service", "--port", str(plain_port))
    # on an adopt: true service's port, but unhealthy
    sick = host.start_foreign("reconciler.testing.fake_ollama", "--port", str(adopt_port), "--no-load")
    wait_until(lambda: is_listening(plain_port) and is_listening(adopt_port), what="the squatters listening")
    sick_profile = ollama_block("ollama", adopt_port).replace("health_path: /api/tags", "health_path: /nowhere")
    host.write(profile_text(service_block("web", plain_port), sick_profile))
    run = host.watch()
    first = run.wait_kind("pass.finished", reason="start")
    assert first["actions"] == []
    reasons = {p["service"]: p["reason"] for p in first["pending"]}
    assert set(reasons) == {"web", "ollama"}
    assert str(plain_port) in reasons["web"] and str(plain.pid) in reasons["web"]
    assert str(adopt_port) in reasons["ollama"] and str(sick.pid) in reasons["ollama"]
    run.wait_kind("pass.finished", reason="liveness")  # looked again: still nothing done to them
    assert host.instances() == {}
    assert alive(plain.pid) and alive(sick.pid)
    assert host.listeners(plain_port) == [plain.pid] and host.listeners(adopt_port) == [sick.pid]
    run.signal(signal.SIGTERM)
    assert run.wait_exit() == 0
