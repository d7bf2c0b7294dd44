"""Placement across nodes without a cluster: each node's offers (by its own planner) and the ranking of nodes;
the cluster options' errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from reconciler.cluster.confirming import Check, Confirmations, Revisions
from reconciler.cluster.etcd import EtcdUnavailable
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


# --- plan --cluster without a cluster (reconciler.cluster.whatif) ---------------------------------------


def whatif_world() -> tuple[Any, Any, dict[str, Any]]:
    """Golden 13's host (comfyui running on an 8 GB GPU) with a lease on comfyui and no demand, as node ``n1``
    of a cluster whose other node ``n2`` would start comfyui without eviction; the view as ``GET /v1/cluster``
    gives it, n1's services as n1 publishes them for its current profile."""
    from reconciler.cluster.whatif import services_after
    from reconciler.core.planner import plan
    from reconciler.core.snapshot import Lease

    scenario = GOLDEN / "13-evict-for-more-important"
    profile = load_profile(scenario / "profile.yaml", environ={})
    base = load_snapshot(scenario / "snapshot.yaml")
    lease = Lease(id="L1", service="comfyui", holder="bob", gpu=0, expires_at=base.now.replace(hour=17))
    snapshot = base.model_copy(update={"demands": [], "leases": [lease], "node": "n1"})
    published = services_after(profile, snapshot, plan(profile, snapshot))
    view = {"cluster": "lab", "node": "n2", "nodes": [
        {"node": "n1", "alive": True, "services": published},
        {"node": "n2", "alive": True, "services": {"comfyui": svc(tier="fit", free=20000)}},
        {"node": "n3", "alive": False, "services": {}},
    ], "placements": [
        {"id": "P1", "service": "comfyui", "model": None, "node": "n1", "tier": "warm", "by": "n2"},
        {"id": "P2", "service": "vllm", "model": None, "node": "n1", "tier": "fit", "by": "n2"},
    ]}
    return profile, snapshot, view


def test_whatif_an_unchanged_profile_changes_nothing_in_the_cluster() -> None:
    from reconciler.cluster.whatif import cluster_plan
    from reconciler.core.planner import plan

    profile, snapshot, view = whatif_world()
    result = cluster_plan(view, "n1", profile, snapshot, plan(profile, snapshot))
    assert (result.withdrawn, result.offered, result.ended) == ([], [], [])
    assert not result.cluster_changes and result.exit_code == 0
    where = {w.service: (w.before, w.after) for w in result.placement}
    # comfyui's one slot is bob's on n1: a new request goes where it would start; vllm must evict comfyui on n1
    assert where == {"comfyui": (("n2", "fit"), ("n2", "fit")), "vllm": (("n1", "evict"), ("n1", "evict"))}


def test_whatif_a_service_leaving_the_profile_moves_its_lease_and_its_placement_in_flight() -> None:
    from reconciler.cluster.whatif import cluster_plan
    from reconciler.core.planner import plan

    profile, snapshot, view = whatif_world()
    without = profile.model_copy(update={"services": {"vllm": profile.services["vllm"]}})
    local = plan(without, snapshot)
    result = cluster_plan(view, "n1", without, snapshot, local)
    assert {a.id for a in local.actions} == {"stop:comfyui", "release:L1"}
    assert [(o.service, o.reason) for o in result.withdrawn] == [("comfyui", "no longer in the profile")]
    assert [(e.kind, e.id, e.holder, e.to, e.tier) for e in result.ended] == [
        ("lease", "L1", "bob", "n2", "fit"), ("placement", "P1", "n2", "n2", "fit")]  # P2's vllm stays offered
    assert "no longer in the profile" in result.ended[0].why
    changed = {w.service: (w.before, w.after) for w in result.placement if w.changed}
    assert changed == {"vllm": (("n1", "evict"), ("n1", "fit"))}  # comfyui's stop makes room: no eviction
    assert result.exit_code == 2
    doc = result.to_json_dict()
    assert doc["changes"] is True and doc["local"]["summary"]["stop"] == 1
    # with n2 gone too, the lease has nowhere to go: something wanted cannot be reached
    alone = {**view, "nodes": [n for n in view["nodes"] if n["node"] != "n2"]}
    stranded = cluster_plan(alone, "n1", without, snapshot, local)
    assert [e.to for e in stranded.ended] == [None, None] and stranded.exit_code == 3
    assert stranded.ended[0].refusals == ()  # no node has comfyui at all
    from reconciler.render.cluster_plan import cluster_text

    text = cluster_text(stranded.to_json_dict())
    assert "  < placement P1 (comfyui, placed by n2) ends: in flight to n1, which would no longer offer comfyui\n" \
        "      → no node could take it: no other node has comfyui in its profile\n" in text
    assert "  ~ placement of comfyui: n1 (queue) → no node\n" in text
    assert text.endswith("Cluster: 1 service(s) withdrawn, 0 offered, 2 lease(s) or placement(s) ended, "
                         "2 placement(s) changed.\n")


def test_whatif_refuses_a_node_that_is_not_alive() -> None:
    import pytest

    from reconciler.cluster.whatif import ClusterViewError, cluster_plan
    from reconciler.core.planner import plan

    profile, snapshot, view = whatif_world()
    with pytest.raises(ClusterViewError, match=r"node 'n3' is not a live node of cluster 'lab' \(live: n1, n2\)"):
        cluster_plan(view, "n3", profile, snapshot, plan(profile, snapshot))


def test_confirmations_share_one_read_and_a_read_always_starts_after_the_choice() -> None:
    """Placements waiting together share one etcd read; one that asks while a call is in flight waits for
    the next (a call it did not see start cannot vouch for its choice); one alone sends its compare."""
    sent: list[tuple[str, asyncio.Future[Any]]] = []

    async def read() -> Revisions:
        sent.append(("read", asyncio.get_running_loop().create_future()))
        result: Revisions = await sent[-1][1]
        return result

    async def compare(checks: Any) -> bool:
        sent.append(("compare", asyncio.get_running_loop().create_future()))
        found = await sent[-1][1]
        return all(check.holds(found) for check in checks)

    async def settle() -> None:  # every task runs until it waits
        for _ in range(5):
            await asyncio.sleep(0)

    async def scenario() -> None:
        confirmations = Confirmations(read, compare)
        checks = [Check("nodes/c", "CREATE", 5), Check("reservations/c", "MOD", 9)]
        alone = asyncio.ensure_future(confirmations.confirm(checks))
        await settle()
        first = [asyncio.ensure_future(confirmations.confirm(checks)) for _ in range(3)]
        await settle()
        assert [kind for kind, _ in sent] == ["compare"]  # the three wait for the call in flight to end
        sent[0][1].set_result({"nodes/c": (5, 5), "reservations/c": (6, 9)})
        assert await alone is True
        await settle()
        assert [kind for kind, _ in sent] == ["compare", "read"]  # then share one read
        late = asyncio.ensure_future(confirmations.confirm(checks))
        await settle()
        sent[1][1].set_result({"nodes/c": (5, 5), "reservations/c": (6, 12)})  # reserved meanwhile: re-rank
        assert await asyncio.gather(*first) == [False, False, False]
        await settle()
        assert len(sent) == 3
        sent[2][1].set_result({"nodes/c": (5, 5), "reservations/c": (7, 12)})
        assert await late is False
        gone = asyncio.ensure_future(confirmations.confirm([Check("nodes/b", "CREATE", 3)]))
        await settle()
        sent[3][1].set_result({"nodes/c": (5, 5)})  # b's key is gone: b died
        assert await gone is False
        failing = [asyncio.ensure_future(confirmations.confirm(checks)) for _ in range(2)]
        await settle()
        sent[4][1].set_exception(EtcdUnavailable("no etcd member answered"))
        for waiting in failing:
            try:
                await waiting
            except EtcdUnavailable:
                pass
            else:
                raise AssertionError("a call that fails fails every placement waiting for it")
        assert confirmations.reads == 5

    asyncio.run(scenario())
