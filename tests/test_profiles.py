"""Every cf-orch profile loads unchanged; the bundled profiles load and are portable."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.core.profile import ProcessSpec
from reconciler.loading import load_profile

ROOT = Path(__file__).resolve().parents[1]
CF_ORCH = Path(__file__).resolve().parents[2] / "shared" / "cf-orch-profiles"
BUNDLED = sorted((ROOT / "profiles").glob("*.yaml"))
OLLAMA = ProcessSpec(
    type="process",
    adopt=True,
    exec_path="/usr/local/bin/ollama",
    args_template="serve",
    port=11434,
    host_port=11434,
    health_path="/api/tags",
    env={"OLLAMA_HOST": "127.0.0.1:{port}"},
)


@pytest.mark.skipif(not CF_ORCH.is_dir(), reason=f"cf-orch profiles not found at {CF_ORCH} (the repo's ../shared)")
@pytest.mark.parametrize("path", sorted(CF_ORCH.glob("*.yaml")) if CF_ORCH.is_dir() else [], ids=lambda p: p.name)
def test_cf_orch_profile_loads_unchanged(path):
    profile = load_profile(path, environ={})
    assert profile.name == path.stem
    assert profile.services


def test_the_bundled_set_is_complete():
    assert [p.stem for p in BUNDLED] == [
        "cpu", "single-gpu-16gb", "single-gpu-24gb", "single-gpu-6gb", "single-gpu-8gb"
    ]


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_profile_loads_with_an_empty_environment(path):
    profile = load_profile(path, environ={})
    assert profile.name == path.stem
    assert profile.services["ollama"].managed == OLLAMA


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_profile_starts_with_the_schema_modeline(path):
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=../schemas/profile.schema.json"


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_profile_has_no_author_specific_paths(path):
    text = path.read_text()
    for fragment in ("/devl/", "/Library/", "miniconda", "/home/", "/Users/"):
        assert fragment not in text


@pytest.mark.skipif(not CF_ORCH.is_dir(), reason=f"cf-orch profiles not found at {CF_ORCH}")
@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_profile_keeps_cf_orch_services_vram_and_priorities(path):
    original = load_profile(CF_ORCH / ("cpu-16gb.yaml" if path.stem == "cpu" else path.name), environ={})
    bundled = load_profile(path, environ={})
    assert bundled.vram_total_mb == original.vram_total_mb
    assert {n: (s.max_mb, s.priority, s.max_concurrent) for n, s in bundled.services.items()} == {
        n: (s.max_mb, s.priority, s.max_concurrent) for n, s in original.services.items()
    }


def test_environment_overrides_reach_the_launch_strings():
    profile = load_profile(ROOT / "profiles" / "single-gpu-8gb.yaml",
                           environ={"CF_PYTHON": "/venv/bin/python", "CF_MODELS_DIR": "/m"})
    vllm = profile.services["vllm"].managed
    assert vllm.exec_path == "/venv/bin/python"
    assert '--model "/m/vllm/{model}"' in vllm.args_template
