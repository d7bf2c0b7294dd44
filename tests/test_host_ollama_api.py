"""The Ollama API client against a real fake Ollama."""

from __future__ import annotations

import asyncio

import pytest

from reconciler.errors import DriverError
from reconciler.host.ollama_api import OllamaApi
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)
from reconciler.testing.ports import free_port


def test_ps_tags_unload(spawner):
    ollama = spawner.fake_ollama(models="llama3.2:3b,qwen2.5:7b", vram_mb=2900, unload_delay=0)  # unloads as it answers

    async def run():
        async with OllamaApi(ollama.port) as api:
            tags = await api.tags()
            loaded = await api.ps()
            vram = await api.vram_mb()
            await api.unload("llama3.2:3b")
            after_one = [m.name for m in await api.ps()]
            unloaded = await api.unload_all()
            return tags, loaded, vram, after_one, unloaded, await api.ps(), await api.vram_mb()

    tags, loaded, vram, after_one, unloaded, after_all, vram_after = asyncio.run(run())
    assert tags == ["llama3.2:3b", "qwen2.5:7b"]
    assert [(m.name, m.size_vram, m.vram_mb) for m in loaded] == [
        ("llama3.2:3b", 2900 * 1024 * 1024, 2900),
        ("qwen2.5:7b", 2900 * 1024 * 1024, 2900),
    ]
    assert vram == 5800
    assert after_one == ["qwen2.5:7b"]
    assert unloaded == ["qwen2.5:7b"]
    assert (after_all, vram_after) == ([], 0)


def test_unknown_model_is_a_driver_error(spawner):
    ollama = spawner.fake_ollama(models="a")

    async def run():
        async with OllamaApi(ollama.port) as api:
            await api.unload("nope")

    with pytest.raises(DriverError, match="HTTP 404"):
        asyncio.run(run())


def test_nothing_listening_is_a_driver_error():
    async def run():
        async with OllamaApi(free_port(), timeout_s=1) as api:
            await api.ps()

    with pytest.raises(DriverError, match="/api/ps"):
        asyncio.run(run())


def test_pull_streams_progress_and_installs_the_model(spawner):
    ollama = spawner.fake_ollama(models="llama3.2:3b", pull_s=0.2)
    lines: list[dict] = []

    async def run():
        async with OllamaApi(ollama.port) as api:
            before = await api.tags()
            await api.pull("mistral", lines.append)  # no tag: installed as :latest, as Ollama names it
            return before, await api.tags()

    before, after = asyncio.run(run())
    assert before == ["llama3.2:3b"] and after == ["llama3.2:3b", "mistral:latest"]
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    downloads = [line for line in lines if "completed" in line]
    assert [round(d["completed"] * 5 / d["total"]) for d in downloads] == [0, 1, 2, 3, 4, 5]


def test_a_pull_ollama_cannot_find_is_a_driver_error_naming_its_error(spawner):
    ollama = spawner.fake_ollama(models="llama3.2:3b", pullable="qwen2.5:7b")

    async def run():
        async with OllamaApi(ollama.port) as api:
            try:
                await api.pull("nosuch:1b", lambda line: None)
            finally:
                tags = await api.tags()
            return tags

    with pytest.raises(DriverError, match="could not pull nosuch:1b: pull model manifest: file does not exist"):
        asyncio.run(run())
