"""Adoption, Ollama eviction by unloading, and invariant 1: never signal what we did not start."""

from __future__ import annotations

import asyncio

import httpx

from reconciler.core.snapshot import Instance
from reconciler.testing.fixtures import spawner  # noqa: F401 (fixture)
from reconciler.testing.ports import free_port
from tests.runtime_support import env, fake_service, listeners, make_profile  # noqa: F401 (fixture)


def ollama_service(port: int, **extra) -> dict:
    return {"max_mb": 3000, "priority": 4, "managed": {
        "type": "process", "adopt": True, "exec_path": "/usr/local/bin/ollama", "args_template": "serve",
        "port": port, "host_port": port, "health_path": "/api/tags"}, **extra}


def test_a_running_ollama_is_adopted_and_never_started_twice(env, spawner):
    ollama = spawner.fake_ollama(vram_mb=3000)
    profile = make_profile({"ollama": ollama_service(ollama.port, always_on=True)})

    async def main():
        async with env.runtime() as rt:
            return rt, [await rt.reconcile(profile) for _ in range(3)]

    rt, reports = asyncio.run(main())
    assert [a.id for a in reports[0].plan.actions] == ["adopt:ollama"]
    assert reports[0].outcomes["adopt:ollama"].status == "done"
    assert reports[1].plan.actions == [] and reports[2].plan.actions == []
    instance = rt.store.get_instance("ollama")
    assert instance.origin == "adopted" and instance.pid == ollama.pid
    assert listeners(ollama.port) == [ollama.pid]  # one listener: ours was never started


def test_evicting_an_adopted_ollama_unloads_its_models_and_leaves_it_running(env, spawner):
    ollama = spawner.fake_ollama(vram_mb=3000, models="llama3.2:3b")
    profile = make_profile({
        "ollama": ollama_service(ollama.port),
        "big": fake_service(free_port(), max_mb=6000, priority=1, always_on=True),
    })

    async def main():
        async with env.runtime() as rt:
            return rt, await rt.reconcile(profile), await rt.reconcile(profile)

    rt, report, again = asyncio.run(main())
    assert [a.id for a in report.plan.actions] == ["adopt:ollama", "evict:ollama", "start:big"]
    assert {o.status for o in report.outcomes.values()} == {"done"}
    assert "unloaded llama3.2:3b" in report.outcomes["evict:ollama"].detail
    assert ollama.process.poll() is None  # never signalled
    assert httpx.get(f"http://127.0.0.1:{ollama.port}/api/ps").json()["models"] == []
    assert rt.store.get_instance("ollama").origin == "adopted"
    assert again.plan.actions == []


def test_a_foreign_process_on_a_claimed_port_is_never_signalled(env, spawner):
    foreign = spawner.service()
    claim = make_profile({"svc": fake_service(foreign.port, always_on=True)})
    gone = make_profile({"other": fake_service(free_port())})
    create_time = __import__("psutil").Process(foreign.pid).create_time()

    async def main():
        async with env.runtime() as rt:
            pending = await rt.reconcile(claim)
            # a stale record with the foreign pid but another create_time (the pid was reused):
            rt.store.put_instance(Instance(service="svc", origin="started", pid=foreign.pid,
                                           create_time=create_time - 30, state="running"))
            stale = await rt.reconcile(gone)
            return rt, pending, stale

    rt, pending, stale = asyncio.run(main())
    assert pending.plan.actions == []
    assert [p.reason for p in pending.plan.pending] == [
        f"port {foreign.port} is held by pid {foreign.pid} ({' '.join(foreign.process.args[:3])}), "
        "which is not svc's instance"]
    assert stale.plan.actions == []  # dead by identity: pruned, not stopped
    assert rt.store.instances() == []
    assert foreign.process.poll() is None


def test_an_adopted_service_that_leaves_the_profile_is_released_not_stopped(env, spawner):
    foreign = spawner.service()
    adopting = make_profile({"svc": {**fake_service(foreign.port, always_on=True),
                                     "managed": {**fake_service(foreign.port)["managed"], "adopt": True}}})

    async def main():
        async with env.runtime() as rt:
            first = await rt.reconcile(adopting)
            second = await rt.reconcile(make_profile({}))
            return rt, first, second

    rt, first, second = asyncio.run(main())
    assert [a.id for a in first.plan.actions] == ["adopt:svc"]
    assert [a.id for a in second.plan.actions] == ["release:svc"]
    assert "keeps running" in second.outcomes["release:svc"].detail
    assert rt.store.instances() == [] and foreign.process.poll() is None
