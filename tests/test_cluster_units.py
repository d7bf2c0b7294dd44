"""Placement across nodes without a cluster: each node's offers (by its own planner) and the ranking of nodes;
the cluster options' errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from reconciler.cluster.placement import offers, rank, rank_model, rank_vram
from reconciler.loading import load_profile, load_snapshot

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def test_offers_come_from_the_nodes_planner() -> None:
    scenario = GOLDEN / "13-evict-for-more-important"
    profile = load_profile(scenario / "profile.yaml", environ={})
    snapshot = load_snapshot(scenario / "snapshot.yaml")
    got = offers(profile, snapshot, [], [], snapshot.now)
    # vllm (priority 1, 6500 MB) fits only by evicting comfyui (priority 4, 6144 MB): the planner's eviction
    assert got["vllm"].tier == "evict"
    assert got["vllm"].cost == (-4, 0, 1, 6144, ("comfyui",))
    assert got["comfyui"].tier == "warm"  # running, healthy, a free slot


def test_offers_fit_says_how_much_is_free() -> None:
    scenario = GOLDEN / "04-start-for-demand"
    profile = load_profile(scenario / "profile.yaml", environ={})
    snapshot = load_snapshot(scenario / "snapshot.yaml").model_copy(update={"demands": []})
    got = offers(profile, snapshot, [], [], snapshot.now)
    fitting = [o for o in got.values() if o.tier == "fit"]
    assert fitting and all(o.free_mb > 0 for o in fitting)


def node(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"services": services}


def svc(slots: int = 0, tier: str = "none", free: int = 0, cost: list[Any] | None = None, model: str | None = None,
        model_bound: bool = False, reason: str = "") -> dict[str, Any]:
    return {"slots_free": slots, "model": model, "model_bound": model_bound,
            "offer": {"tier": tier, "free_mb": free, "cost": cost or [], "reason": reason}}


def test_rank_warm_then_fit_most_free_then_cheapest_eviction_then_queue() -> None:
    states = {
        "a": node({"llm": svc(tier="fit", free=9000)}),
        "b": node({"llm": svc(tier="fit", free=20000)}),
        "c": node({"llm": svc(slots=1, tier="warm")}),
        "d": node({"llm": svc(tier="evict", cost=[-4, 0, 1, 6000, ["x"]])}),
        "e": node({"llm": svc(tier="evict", cost=[-3, 0, 1, 2000, ["y"]])}),
        "f": node({"llm": svc(tier="queue", reason="2/2 leases held")}),
        "g": node({"llm": svc(tier="none", reason="needs 7000 MB on GPU 0, 2000 free")}),
        "h": node({"other": svc(tier="fit", free=1)}),
    }
    choices, refusals = rank(states, "llm", None)
    assert [c.node for c in choices] == ["c", "b", "a", "d", "e", "f"]  # priority 4 evicted before priority 3
    assert [c.tier for c in choices] == ["warm", "fit", "fit", "evict", "evict", "queue"]
    assert "g: needs 7000 MB on GPU 0, 2000 free" in refusals and "h: no service 'llm' in its profile" in refusals


def test_rank_warm_needs_a_compatible_model_and_ties_go_by_slots_then_name() -> None:
    states = {
        "a": node({"llm": svc(slots=1, tier="warm", model="m1", model_bound=True)}),
        "b": node({"llm": svc(slots=2, tier="warm", model="m2", model_bound=True)}),
        "c": node({"llm": svc(slots=1, tier="warm", model="m2", model_bound=True)}),
    }
    assert [c.node for c in rank(states, "llm", "m2")[0]][:2] == ["b", "c"]
    assert rank(states, "llm", "m1")[0][0].node == "a"
    assert rank(states, "llm", None)[0][0].node == "b"  # most free slots


def test_a_node_not_observed_yet_is_the_last_resort() -> None:
    states = {"a": node({"llm": {"slots_free": 0, "offer": None}}), "b": node({"llm": svc(tier="queue")})}
    assert [(c.node, c.tier) for c in rank(states, "llm", None)[0]] == [("b", "queue"), ("a", "queue")]


def test_rank_pin_and_exclude() -> None:
    states = {"a": node({"llm": svc(slots=1)}), "b": node({"llm": svc(tier="fit", free=5)})}
    assert [c.node for c in rank(states, "llm", None, pin="b")[0]] == ["b"]
    assert [c.node for c in rank(states, "llm", None, exclude=frozenset({"a"}))[0]] == ["b"]
    choices, refusals = rank(states, "llm", None, pin="zz")
    assert choices == [] and refusals == ["zz: not a live node of the cluster"]


def test_a_node_running_another_model_is_a_queue_after_the_others() -> None:
    states = {"a": node({"llm": svc(slots=1, tier="warm", model="m1", model_bound=True)}),
              "b": node({"llm": svc(tier="queue", model="m2", model_bound=True, reason="2/2 leases held")})}
    choices, refusals = rank(states, "llm", "m2")
    assert [(c.node, c.tier) for c in choices] == [("b", "queue"), ("a", "queue")] and refusals == []
    assert "switches to m2 once idle" in choices[1].reason


def gateway_node(models: dict[str, tuple[str, str]], services: dict[str, dict[str, Any]],
                 gateway: str | None = "http://x:1") -> dict[str, Any]:
    return {"gateway": gateway, "services": services,
            "models": {n: {"service": s, "model": m, "api": "openai", "mb": 1} for n, (s, m) in models.items()}}


def test_rank_model_scores_each_node_on_the_service_its_gateway_routes_the_model_to() -> None:
    states = {
        "a": gateway_node({"qwen": ("vllm", "Qwen/Qwen2-7B")}, {"vllm": svc(tier="fit", free=9000)}),
        "b": gateway_node({"qwen": ("llama", "qwen.gguf"), "q": ("llama", "qwen.gguf")},
                          {"llama": svc(slots=1, tier="warm", model="qwen.gguf", model_bound=True)}),
        "c": gateway_node({"other": ("x", "x")}, {"x": svc(slots=3, tier="warm")}),
        "d": gateway_node({"qwen": ("vllm", "q")}, {"vllm": svc(tier="none", reason="needs 9000 MB")}),
        "e": gateway_node({"qwen": ("vllm", "q")}, {"vllm": svc(slots=4, tier="warm")}, gateway=None),
    }
    choices, refusals = rank_model(states, "qwen")
    assert [(c.node, c.service, c.model, c.tier) for c in choices] == [
        ("b", "llama", "qwen.gguf", "warm"), ("a", "vllm", "Qwen/Qwen2-7B", "fit")]  # e has no gateway
    assert refusals == ["d (vllm): needs 9000 MB"]  # c does not serve it: not a refusal
    assert [c.node for c in rank_model(states, "qwen", exclude=frozenset({"b"}))[0]] == ["a"]
    assert rank_model(states, "nope") == ([], [])


def test_rank_model_applies_ollamas_tag_rule() -> None:
    states = {"a": gateway_node({"llama3.2:latest": ("ollama", "llama3.2:latest")}, {"ollama": svc(slots=1)})}
    assert [c.model for c in rank_model(states, "llama3.2")[0]] == ["llama3.2:latest"]


def test_rank_vram_goes_where_most_is_free_and_says_why_not_elsewhere() -> None:
    def gpus(*free: int) -> dict[str, Any]:
        return {"gpus": [{"index": i, "total_mb": 24576, "reserved_mb": 0, "free_mb": f} for i, f in enumerate(free)]}

    reservations = {"a": gpus(8000), "b": gpus(3000, 16000), "c": gpus(12000)}
    choices, refusals = rank_vram(reservations, 10000, None)
    assert [(c.node, c.gpu) for c in choices] == [("b", 1), ("c", 0)]
    assert refusals == ["a: GPU 0 has 8000 MB free, 10000 MB requested"]
    assert [(c.node, c.gpu) for c in rank_vram(reservations, 2000, 0)[0]] == [("c", 0), ("a", 0), ("b", 0)]
    assert rank_vram(reservations, 100, 1)[1] == ["a: no GPU 1", "c: no GPU 1"]
    assert [c.node for c in rank_vram(reservations, 100, None, pin="c")[0]] == ["c"]
    assert rank_vram(reservations, 100, None, pin="zz") == ([], ["zz: not a live node of the cluster"])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_cluster_options_errors_are_clear_and_change_nothing(tmp_path: Path) -> None:
    scenario = GOLDEN / "03-start-always-on" / "profile.yaml"
    base = ["serve", "--profile", str(scenario), "--gpu", "sim:8192", "--state-dir", str(tmp_path / "s"),
            "--listen", "127.0.0.1:0"]
    cases = {
        ("--etcd", "http://127.0.0.1:1"): "needs a name of its own: add --node NAME",
        ("--etcd", "127.0.0.1:2379", "--node", "a"): "is not a URL",
        ("--etcd", "http://127.0.0.1:1", "--node", "a b"): "--node 'a b'",
        ("--etcd", "http://127.0.0.1:1", "--node", "a", "--etcd-cert", str(scenario)): "go together",
        ("--etcd", "http://127.0.0.1:1", "--node", "a", "--etcd-user", "u"): "needs a password",
        ("--etcd", "http://127.0.0.1:1", "--node", "a", "--etcd-ttl", "1"): "choose 2 to 300",
        ("--etcd", "http://127.0.0.1:1", "--node", "a", "--etcd-cacert", "/nonexistent"): "no such file",
    }
    for extra, message in cases.items():
        result = run_cli(*base, *extra)
        assert result.returncode == 1, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr
    watch = run_cli("watch", *base[1:-2], "--etcd", "http://127.0.0.1:1", "--node", "a")
    assert watch.returncode == 1 and "use `reconciler serve`" in watch.stderr
    assert not (tmp_path / "s" / "state.db").exists()
