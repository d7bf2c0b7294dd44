"""The demo/test programs and the spawn helpers behave as documented."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import reconciler.testing.ports as ports_module
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)
from reconciler.testing.ports import Spawner, free_port, is_listening


def get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", trust_env=False, timeout=5)


def test_info_and_health(spawner):
    svc = spawner.service(name="vllm", env={"CUDA_VISIBLE_DEVICES": "1"})
    info = get(svc.port, "/").json()
    assert (info["name"], info["pid"], info["cuda_visible_devices"]) == ("vllm", svc.pid, "1")
    assert "--port" in info["argv"]
    health = get(svc.port, "/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert get(svc.port, "/nope").status_code == 404


def test_unhealthy_until_the_startup_delay(spawner):
    svc = spawner.service(startup_delay=1.0)
    assert get(svc.port, "/health").status_code == 503  # it listens at once, healthy later
    deadline = time.monotonic() + 10
    while get(svc.port, "/health").status_code != 200:
        assert time.monotonic() < deadline, "never became healthy"
        time.sleep(0.05)


def test_refuse_health(spawner):
    svc = spawner.service(refuse_health=True, health_path="/api/ok")
    assert get(svc.port, "/api/ok").status_code == 503


def test_crash_after_exits_with_the_code(spawner):
    svc = spawner.service(crash_after=0.2, exit_code=7)
    assert svc.process.wait(10) == 7


def test_sigterm_exits_cleanly(spawner):
    svc = spawner.service()
    svc.process.send_signal(signal.SIGTERM)
    assert svc.process.wait(5) == 0
    assert not is_listening(svc.port)


def test_ignore_sigterm_needs_sigkill():
    spawn = Spawner(grace_s=0.3)
    svc = spawn.service(ignore_sigterm=True)
    svc.process.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        svc.process.wait(0.3)
    assert get(svc.port, "/health").status_code == 200
    spawn.close()  # escalates to SIGKILL after the grace period
    assert svc.process.returncode == -signal.SIGKILL


def test_fake_ollama_api(spawner):
    ollama = spawner.fake_ollama(models="a,b", vram_mb=100, no_load=True)
    assert get(ollama.port, "/").text == "Ollama is running"
    assert [m["name"] for m in get(ollama.port, "/api/tags").json()["models"]] == ["a", "b"]
    assert get(ollama.port, "/api/ps").json() == {"models": []}
    url = f"http://127.0.0.1:{ollama.port}/api/generate"
    loaded = httpx.post(url, json={"model": "b"}, trust_env=False)  # no prompt: Ollama loads the model, no more
    assert loaded.json()["done_reason"] == "load"
    [model] = get(ollama.port, "/api/ps").json()["models"]
    assert (model["name"], model["size_vram"]) == ("b", 100 * 1024 * 1024)
    answered = httpx.post(url, json={"model": "b", "prompt": "hi", "stream": False, "options": {"num_predict": 3}},
                          trust_env=False).json()
    assert answered["response"] == "b: w1 w2" and answered["done"] is True and answered["eval_count"] == 3
    assert httpx.post(url, json={"model": "zz"}, trust_env=False).status_code == 404
    assert httpx.post(url, content=b"{", trust_env=False).status_code == 400


def test_start_failure_shows_the_output(spawner):
    taken = spawner.service()
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1 before listening.*Address already in use"):
        spawner.service(port=taken.port)


def test_free_port_is_free():
    port = free_port()
    assert not is_listening(port)
    assert json.loads(json.dumps(port)) == port and 0 < port < 65536


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_given_twice():
    """An outgoing connection takes its local port from the ephemeral range: a port handed out there could be
    taken before its service binds it (a cluster test's embed once backed off for that)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(ports_module.LOWEST_PORT <= port < low for port in ports)
