"""OllamaDriver against the fake Ollama server on loopback: eviction unloads, never kills."""

from __future__ import annotations

import asyncio

import pytest

from reconciler.core.profile import Service
from reconciler.core.snapshot import Instance
from reconciler.drivers.base import Waiter
from reconciler.drivers.ollama import OllamaDriver
from reconciler.errors import DriverError
from reconciler.host.ollama_api import OllamaApi
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)
from reconciler.testing.ports import free_port


def adopted(pid: int) -> Instance:
    return Instance(service="ollama", origin="adopted", pid=pid, create_time=0.0)


def test_evicting_an_adopted_ollama_unloads_all_models_and_keeps_it_running(spawner):
    server = spawner.fake_ollama(models="llama3.2:3b,qwen2.5:7b", vram_mb=2048)
    service = Service(
        max_mb=6000, priority=1,
        managed={"type": "process", "exec_path": "/usr/local/bin/ollama", "adopt": True,
                 "port": 11434, "host_port": server.port},
    )
    driver = OllamaDriver.for_service(service, waiter=Waiter(interval_s=0.01))
    assert driver.port == server.port

    async def scenario():
        async with OllamaApi(server.port) as api:
            assert len(await api.ps()) == 2

            async def freed() -> bool:
                return await api.vram_mb() == 0

            result = await driver.stop(adopted(server.pid), timeout_s=5, memory_freed=freed, memory_timeout_s=5)
            assert (result.outcome, result.signals, result.memory_freed) == ("unloaded", [], True)
            assert "llama3.2:3b, qwen2.5:7b" in result.reason
            assert await api.ps() == []
            again = await driver.stop(adopted(server.pid), timeout_s=5)
            assert again.outcome == "unloaded" and "no model loaded" in again.reason

    asyncio.run(scenario())
    assert server.process.poll() is None  # still running: nothing was signalled


def test_unreachable_ollama_is_a_driver_error():
    driver = OllamaDriver(free_port())
    with pytest.raises(DriverError, match="/api/ps"):
        asyncio.run(driver.stop(adopted(1), timeout_s=1))


def test_an_eviction_waits_until_ollama_has_really_unloaded(spawner):
    """Ollama answers keep_alive 0 before the model is gone (the fake too, 0.5 s later): the eviction
    is done only once /api/ps no longer lists it, so nothing starts on memory still in use."""
    server = spawner.fake_ollama(models="llama3.2:3b", vram_mb=2048, unload_delay=0.5)
    driver = OllamaDriver(server.port, waiter=Waiter(interval_s=0.02))

    async def scenario() -> tuple[str, list[object]]:
        result = await driver.stop(adopted(server.pid), timeout_s=5)
        async with OllamaApi(server.port) as api:
            return result.reason, await api.ps()

    reason, loaded = asyncio.run(scenario())
    assert loaded == [] and "unloaded llama3.2:3b" in reason


def test_a_request_in_flight_keeps_the_model_and_the_eviction_fails_at_its_timeout(spawner):
    server = spawner.fake_ollama(models="llama3.2:3b", vram_mb=2048, unload_delay=0.1, generate_s=3)
    driver = OllamaDriver(server.port, waiter=Waiter(interval_s=0.02))

    async def scenario() -> None:
        async with OllamaApi(server.port, timeout_s=10) as api:
            busy = asyncio.ensure_future(api._request("POST", "/api/generate", {"model": "llama3.2:3b"}))
            await asyncio.sleep(0.3)  # the request is in flight
            with pytest.raises(DriverError, match=r"still holds llama3\.2:3b 0\.5 s after"):
                await driver.stop(adopted(server.pid), timeout_s=0.5)
            await busy

    asyncio.run(scenario())
