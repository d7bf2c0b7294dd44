"""The idle benchmark still runs, briefly (no CPU figure asserted), and leaves nothing running behind it."""

from __future__ import annotations

import psutil

from benchmarks import bench_idle


def test_the_demo_profile_gets_ports_of_its_own():
    text, ports = bench_idle.demo_profile({"llm": 1234})
    assert sorted(ports) == ["comfyui", "embed", "llm", "ollama", "tts"]
    assert ports["llm"] == 1234 and "port: 1234\n" in text and "port: 18401" not in text
    assert len(set(ports.values())) == 5


def test_a_short_idle_measurement_stops_everything_it_started():
    with bench_idle.IdleDemo() as demo:
        status = demo.wait_converged()
        assert {i["service"] for i in status["instances"]} == {"ollama", "llm", "embed", "comfyui"}
        total, main = demo.measure(0.5)
        assert total >= 0 and main >= 0
        server, services = demo.process, list(demo.services)
    assert server.poll() is not None
    assert len(services) == 4
    for pid, create_time in services:
        assert (
            not psutil.pid_exists(pid)
            or abs(psutil.Process(pid).create_time() - create_time) >= 0.05
            or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        )
    assert not demo.root.exists()
