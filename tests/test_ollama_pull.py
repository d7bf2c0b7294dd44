"""``pull: true``: the planner lets a demand for a model an Ollama lacks wait, and the runtime pulls it.

The planner part is pure (profile + snapshot → plan); the runtime part (:class:`reconciler.runtime.pulls.Pulls`)
runs here against a stand-in Ollama API that records what it was asked — the real API client and the fake
Ollama's ``/api/pull`` are tested in ``tests/test_host_ollama_api.py``, the whole path end to end in
``tests/test_e2e_ollama.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from reconciler.core.events import EventKind
from reconciler.core.planner import plan as make_plan
from reconciler.errors import DriverError
from reconciler.loading import parse_profile, parse_snapshot
from reconciler.runtime.pulls import Pulls

PROFILE = """\
schema_version: 1
name: pull
vram_total_mb: 8192
services:
  ollama:
    max_mb: 4096
    priority: 1
    always_on: true
    {pull}
    managed: {{type: process, adopt: true, exec_path: /usr/local/bin/ollama, args_template: serve, port: 11434,
               health_path: /api/tags}}
"""
SNAPSHOT = """\
format_version: 1
node: local
now: "2026-11-22T16:00:00Z"
gpus:
  - {index: 0, uuid: GPU-0, name: "RTX 4000", total_mb: 8192, used_mb: 1100, processes: [{pid: 4242, used_mb: 1024}]}
processes:
  - {pid: 4242, create_time: 1763800000.0, cmdline: [/usr/local/bin/ollama, serve], listening: [11434]}
probes:
  ollama: {healthy: true, status: 200, models: ["llama3.2:latest"]}
instances:
  - {service: ollama, gpu: 0, origin: adopted, pid: 4242, create_time: 1763800000.0, state: running,
     since: "2026-11-22T15:00:00Z"}
demands:
  - {id: D1, service: ollama, holder: kiwi, model: "mistral:7b", requested_at: "2026-11-22T15:59:00Z"}
  - {id: D2, service: ollama, holder: lime, model: "mistral:7b", requested_at: "2026-11-22T15:59:30Z"}
"""


def world(pull: bool):
    profile = parse_profile(PROFILE.format(pull="pull: true" if pull else ""), "p.yaml")
    return profile, parse_snapshot(SNAPSHOT, "s.yaml")


def test_without_pull_the_demand_is_refused_at_once_with_the_installed_models() -> None:
    planned = make_plan(*world(pull=False))
    verdict = planned.verdict("D1")
    assert verdict is not None and verdict.state == "pending" and verdict.final
    assert "has not pulled model mistral:7b (installed: llama3.2:latest)" in verdict.reason


def test_with_pull_the_demand_waits_for_the_pull() -> None:
    planned = make_plan(*world(pull=True))
    verdict = planned.verdict("D1")
    assert verdict is not None and verdict.state == "pending" and not verdict.final
    assert "ollama is pulling model mistral:7b (pull: true; installed: llama3.2:latest)" in verdict.reason


class Events:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.announced: list[dict[str, Any]] = []

    def publish(self, kind: EventKind, **data: Any) -> dict[str, Any]:
        self.published.append({"kind": kind, **data})
        return data

    def announce(self, kind: EventKind, **data: Any) -> dict[str, Any]:
        self.announced.append({"kind": kind, **data})
        return data


class StandInApi:
    """What Pulls needs of :class:`reconciler.host.ollama_api.OllamaApi`: ``pull`` and ``async with``."""

    def __init__(self, asked: list[str], release: asyncio.Event, error: str | None) -> None:
        self.asked, self.release, self.error = asked, release, error

    async def pull(self, model: str, progress: Any) -> None:
        self.asked.append(model)
        progress({"status": "pulling manifest"})
        for done in (0, 3, 5, 6, 9, 10):  # 0 %, 30 %, 50 %, 60 %, 90 %, 100 %
            progress({"status": "pulling abc", "total": 10, "completed": done})
            progress({"status": "pulling abc", "total": 10, "completed": done})  # repeated: shown once
        await self.release.wait()
        if self.error:
            raise DriverError(self.error)
        progress({"status": "success"})

    async def __aenter__(self) -> StandInApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def run_pulls(error: str | None) -> tuple[list[str], Events, list[str], Any, Any, Any, int]:
    profile, snapshot = world(pull=True)
    events, asked, woken = Events(), [], []

    async def main() -> tuple[Any, Any, Any]:
        release = asyncio.Event()
        pulls = Pulls(events, lambda: woken.append("wake"), lambda: 0.0,  # type: ignore[arg-type]
                      api_for=lambda spec: StandInApi(asked, release, error))  # type: ignore[arg-type,return-value]
        first = pulls.after_plan(profile, snapshot, make_plan(profile, snapshot))
        again = pulls.after_plan(profile, snapshot, make_plan(profile, snapshot))  # one pull for both demands
        await asyncio.sleep(0)
        release.set()
        while pulls.running:
            await asyncio.sleep(0.01)
        after = pulls.after_plan(profile, snapshot, make_plan(profile, snapshot))
        nobody = pulls.after_plan(profile, snapshot.model_copy(update={"demands": []}),
                                  make_plan(profile, snapshot.model_copy(update={"demands": []})))
        assert nobody.pending == [] or all(p.demand is None for p in nobody.pending)
        return first, again, (after, len(pulls.failed))

    first, again, (after, failures) = asyncio.run(main())
    return asked, events, woken, first, again, after, failures


def test_one_pull_per_model_with_progress_shown_each_ten_percent_and_the_loop_woken() -> None:
    asked, events, woken, first, again, after, failures = run_pulls(error=None)
    assert asked == ["mistral:7b"]  # two demands, one pull
    assert [e["status"] for e in events.published] == ["started", "done"]
    shown = [(e["progress"], e["percent"]) for e in events.announced]
    assert shown == [("pulling manifest", None), ("pulling abc", 0), ("pulling abc", 30), ("pulling abc", 50),
                     ("pulling abc", 60), ("pulling abc", 90), ("pulling abc", 100), ("success", None)]
    assert woken == ["wake"] and failures == 0
    assert all(not p.final for p in first.pending + again.pending + after.pending)


def test_a_failed_pull_makes_its_demands_final_with_the_error_until_nobody_asks() -> None:
    asked, events, woken, _, _, after, failures = run_pulls(error="pull model manifest: file does not exist")
    assert asked == ["mistral:7b"] and woken == ["wake"]
    assert [e["status"] for e in events.published] == ["started", "failed"]
    assert "file does not exist" in events.published[-1]["error"]
    assert [p.final for p in after.pending] == [True, True]
    assert all("could not pull model mistral:7b: pull model manifest: file does not exist" in p.reason
               for p in after.pending)
    assert failures == 0  # forgotten once no demand asked for it: a later request tries again
