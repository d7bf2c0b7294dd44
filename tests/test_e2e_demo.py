"""The demo profile does what demo/README.md says: converges, and evicts comfyui for tts.

A copy of demo/profile.yaml runs under ``watch`` with its ports moved to free
ones (a demo left running on 184xx must not clash with the test).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from reconciler.loading import load_profile
from tests.e2e_support import Host, host  # noqa: F401

DEMO = Path(__file__).resolve().parent.parent / "demo"


def test_demo_profiles_are_valid_and_fill_the_gpu() -> None:
    profile = load_profile(DEMO / "profile.yaml", environ={})
    assert profile.vram_total_mb == 8192
    on = {name: s for name, s in profile.services.items() if s.always_on}
    assert sum(s.max_mb for s in on.values()) == profile.vram_total_mb
    assert profile.services["ollama"].managed.adopt
    assert (DEMO / "profile.yaml").read_text().startswith(
        "# yaml-language-server: $schema=../schemas/profile.schema.json\n")
    assert load_profile(DEMO / "empty.yaml").services == {}


def test_demo_converges_and_the_eviction_edit_evicts_comfyui(host: Host) -> None:
    text = re.sub(r"port: 18\d\d\d", lambda _: f"port: {host.port()}", (DEMO / "profile.yaml").read_text())
    host.write(text)
    run = host.watch()
    first = run.wait_kind("pass.finished", reason="start")
    assert sorted(first["actions"]) == ["start:comfyui", "start:embed", "start:llm", "start:ollama"]
    assert first["outcomes"] == {"done": 4}
    before = host.pids()

    edited = text.replace("    priority: 4\n    always_on: true\n", "    priority: 4\n")
    edited = edited.replace("  tts:\n    max_mb: 2048\n    priority: 2\n", "  tts:\n    max_mb: 2048\n    priority: 2\n"
                            "    always_on: true\n")
    assert edited.count("always_on: true") == 4
    host.write(edited)
    evicted = run.wait_kind("pass.finished", reason="profile")
    assert evicted["actions"] == ["evict:comfyui", "start:tts"] and evicted["outcomes"] == {"done": 2}
    after = host.pids()
    assert set(after) == {"ollama", "llm", "embed", "tts"}
    assert all(after[name] == before[name] for name in ("ollama", "llm", "embed"))
    run.signal(signal.SIGINT)
    assert run.wait_exit() == 0
