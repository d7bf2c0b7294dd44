"""The model gateway and cf-orch's VRAM leases across a cluster: a real etcd, three real nodes, real clients.

Each node is ``reconciler watch --api --gateway`` (what ``serve --gateway`` runs) with ``--node`` and
``--etcd``, on a simulated GPU of its own size — a: 8 GB, b: 16 GB, c: 24 GB — and a profile of its
own: every node serves the embedding model ``emb`` (always on only on c, so it is warm there and
nowhere else); a serves ``alpha`` and c ``gamma``, which no other node serves. The clients are the
real OpenAI SDK and httpx (Ollama's API, cf-orch's ``POST /api/leases``), mostly pointed at node a. All
nodes share one token (``--token-file``), which clients send and nodes forward with each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from reconciler.testing.fake_openai import embedding, reply
from tests.cluster_support import EtcdCluster, NodeProcess, etcd_binary, node_profile
from tests.e2e_support import Host, wait_until
from tests.gateway_support import fake, upstream_stats

TTL_S = 3
TOKEN = "cluster-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIZES = {"a": 8192, "b": 16384, "c": 24576}
MESSAGES = [{"role": "user", "content": "hello"}]


def profile(node: str, ports: dict[str, int]) -> str:
    blocks = [fake("embed", ports["embed"], model="emb", mb=1024, max_concurrent=4, always_on=node == "c")]
    if node == "a":
        blocks.append(fake("chat", ports["own"], model="alpha", mb=2048))
    if node == "c":  # slow chunks: a stream lasts long enough to be cut off by its client
        blocks.append(fake("llm", ports["own"], model="gamma", mb=4096, args="--chunk-delay 0.3"))
    return node_profile(node, SIZES[node], blocks)


@dataclass
class Node(NodeProcess):
    api: str = ""
    gateway: str = ""

    def start(self, etcd: EtcdCluster) -> None:
        token = self.host.root / "token"
        token.write_text(TOKEN + "\n")
        self.run = self.host.watch("--api", "127.0.0.1:0", "--gateway", "127.0.0.1:0", "--gpu",
                                   f"sim:{SIZES[self.name]}", "--node", self.name, "--etcd", etcd.endpoints,
                                   "--etcd-ttl", str(TTL_S), "--token-file", str(token))
        self.run.wait_kind("cluster.joined", timeout_s=30)
        self.api = (self.run.seen("api.started") or [self.run.wait_kind("api.started", timeout_s=30)])[0]["url"]
        self.gateway = (self.run.seen("gateway.started")
                        or [self.run.wait_kind("gateway.started", timeout_s=30)])[0]["url"]

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway}/v1", api_key=TOKEN, max_retries=0, timeout=60.0)

    def get(self, path: str) -> Any:
        answer = httpx.get(f"{self.api}{path}", headers=AUTH, timeout=30)
        answer.raise_for_status()
        return answer.json()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    etcd_binary()
    members = EtcdCluster(tmp_path / "etcd", size=1).start()  # one member: these tests are about the nodes
    try:
        yield members
    finally:
        members.stop()


@pytest.fixture
def nodes(tmp_path: Path, etcd: EtcdCluster) -> Iterator[dict[str, Node]]:
    made: dict[str, Node] = {}
    try:
        for name in SIZES:
            host = Host(tmp_path / name)
            ports = {"embed": host.port(), "own": host.port()}
            host.write(profile(name, ports))
            made[name] = Node(name, host, ports)
        for node in made.values():
            node.start(etcd)
        a = made["a"]

        def ready() -> bool:
            view = a.get("/v1/cluster")
            alive = sorted(n["node"] for n in view["nodes"] if n["alive"])
            return alive == ["a", "b", "c"] and "c" in view["services"].get("embed", [])

        wait_until(ready, 30, "three nodes in the cluster view, embed running on c")
        wait_until(lambda: {m["id"] for m in httpx.get(f"{a.gateway}/v1/models", timeout=10).json()["data"]}
                   >= {"alpha", "emb", "gamma"}, 20, "node a's gateway lists c's models")
        yield made
    finally:
        for node in made.values():
            node.host.close()


def test_the_openai_sdk_at_one_node_gets_models_served_on_another(nodes: dict[str, Node]) -> None:
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    sdk = a.sdk()
    listed = {m.id: m.owned_by for m in sdk.models.list()}  # every live node's models, from node a
    assert listed == {"alpha": "chat", "emb": "embed", "gamma": "llm"}
    assert sdk.models.retrieve("gamma").owned_by == "llm"
    tags = {t["name"]: t for t in httpx.get(f"{a.gateway}/api/tags", timeout=10).json()["models"]}
    assert set(tags) == {"alpha", "emb", "gamma"} and tags["gamma"]["size"] == 4096 * 1024 * 1024

    # gamma is served only on c: placed there (a start on c), proxied through a's gateway, answered
    chat = sdk.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=4)
    assert chat.choices[0].message.content == "".join(reply("gamma", 4))
    assert upstream_stats(c.ports["own"])["last"]["model"] == "gamma"
    stream = sdk.chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=5, stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert pieces == reply("gamma", 5)  # relayed chunk by chunk across two gateways
    assert "llm" not in {i["service"] for i in a.get("/v1/status")["instances"]}
    with httpx.stream("POST", f"{a.gateway}/api/chat", timeout=30, headers=AUTH,  # Ollama's API, translated on c
                      json={"model": "gamma", "messages": MESSAGES, "options": {"num_predict": 3}}) as ndjson:
        lines = [json.loads(line) for line in ndjson.iter_lines() if line]
    assert "".join(x["message"]["content"] for x in lines) == "".join(reply("gamma", 3)) and lines[-1]["done"]
    shown = httpx.post(f"{a.gateway}/api/show", json={"model": "gamma"}, headers=AUTH, timeout=10)
    assert shown.status_code == 200 and shown.json()["details"]["family"] == "llm"
    assert httpx.post(f"{a.gateway}/v1/chat/completions", json={"model": "gamma", "messages": MESSAGES},
                      timeout=10).status_code == 401  # no token: refused at a, never forwarded

    # warm first: emb runs on c only, so a request at a goes there rather than starting a's own
    before = upstream_stats(c.ports["embed"])["requests"]
    vectors = sdk.embeddings.create(model="emb", input=["hello"])
    assert vectors.data[0].embedding == pytest.approx(embedding("hello", 8), abs=1e-6)
    assert upstream_stats(c.ports["embed"])["requests"] == before + 1
    # counted in full where it was served, and at the node asked only as proxied there
    asked = {m["model"]: m for m in a.get("/v1/status")["models"]}
    assert asked["emb"]["requests"] == 0 and asked["emb"]["proxied"] == {"c": 1}
    served = {m["model"]: m for m in c.get("/v1/status")["models"]}
    assert served["emb"]["requests"] >= 1 and served["emb"]["proxied"] == {}
    metrics = httpx.get(f"{a.api}/metrics", headers=AUTH, timeout=10).text
    proxied = [line for line in metrics.splitlines() if line.startswith("reconciler_gateway_proxied_total{")]
    assert [line.rsplit(" ", 1)[1] for line in proxied if 'model="emb"' in line and 'to_node="c"' in line] == ["1.0"]
    assert "embed" not in {i["service"] for i in a.get("/v1/status")["instances"]}

    # a client that goes away mid-stream cancels the request on c (its upstream and its lease), at once
    with httpx.stream("POST", f"{a.gateway}/v1/chat/completions", timeout=30, headers=AUTH,
                      json={"model": "gamma", "messages": MESSAGES, "max_tokens": 100, "stream": True}) as cut:
        assert cut.status_code == 200
        first = next(cut.iter_raw())
        assert first.startswith(b"data: ")
    wait_until(lambda: upstream_stats(c.ports["own"])["in_flight"] == 0, 5, "c's upstream request cancelled")
    wait_until(lambda: not [x for x in c.get("/v1/status")["leases"] if x["service"] == "llm"
                            and x.get("state", "active") == "active"], 5, "c's gateway lease released")

    # a's own model is served at a, and c's gateway serves a's model too (placement from c); a choosing
    # itself confirms nothing with etcd (its ledger decides), a choosing another node does
    counters = a.get("/v1/cluster")["counters"]
    assert a.sdk().chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2).choices[0].message.content \
        == "".join(reply("alpha", 2))
    after = a.get("/v1/cluster")["counters"]
    assert after["placement_confirmations"] == counters["placement_confirmations"]
    assert after["local_placements"] == counters["local_placements"] + 1
    confirmed = c.get("/v1/cluster")["counters"]["placement_confirmations"]
    via_c = c.sdk().chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=3)
    assert via_c.choices[0].message.content == "".join(reply("alpha", 3))
    assert c.get("/v1/cluster")["counters"]["placement_confirmations"] == confirmed + 1

    # c dies: its models leave every listing within a TTL; emb is placed elsewhere, gamma is a 404
    assert c.run is not None
    c.run.kill()  # its services keep running; its gateway (in its process) is gone at once
    assert "c" in {n["node"] for n in a.get("/v1/cluster")["nodes"] if n["alive"]}  # still in the view (TTL)
    vectors = sdk.embeddings.create(model="emb", input=["again"])  # warm on c: refused there, placed again
    assert vectors.data[0].embedding == pytest.approx(embedding("again", 8), abs=1e-6)
    wait_until(lambda: "gamma" not in {m.id for m in sdk.models.list()}, TTL_S + 10, "gamma gone from a's list")
    served = {n: i for n in ("a", "b") for i in nodes[n].get("/v1/status")["instances"] if i["service"] == "embed"}
    assert list(served) == ["b"]  # fits without eviction, most free MB: b's 16 GB
    with pytest.raises(openai.NotFoundError) as gone:
        sdk.chat.completions.create(model="gamma", messages=MESSAGES)
    assert "not served by any live node" in str(gone.value)
    assert gone.value.body["code"] == "model_not_found"  # type: ignore[index]
    ollama = httpx.post(f"{b.gateway}/api/chat", json={"model": "gamma", "messages": MESSAGES}, headers=AUTH,
                        timeout=10)
    assert ollama.status_code == 404 and "not served by any live node" in ollama.json()["error"]


def post(node: Node, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{node.api}/api/leases", headers=AUTH, json=body, timeout=timeout)


def test_cf_orch_vram_lease_at_a_node_without_room_is_granted_on_another(nodes: dict[str, Node]) -> None:
    a = nodes["a"]
    lease = {"service": "trainer", "mb": 12000, "ttl_s": 60}
    here = post(a, {**lease, "node_id": "a", "gpu_id": 0})
    assert here.status_code == 503 and "Insufficient VRAM" in here.json()["detail"]  # a names itself: stays
    anywhere = post(a, {**lease, "node_id": "*"})
    assert anywhere.status_code == 200, anywhere.text
    granted = anywhere.json()["lease"]
    assert (granted["node_id"], granted["gpu_id"], granted["mb_granted"]) == ("c", 0, 12000)  # most free MB
    held = [x for x in nodes["c"].get("/v1/status")["leases"] if x["id"] == granted["lease_id"]]
    assert held and held[0]["mb"] == 12000
    pinned = post(a, {**lease, "node_id": "b", "gpu_id": 0})
    assert pinned.status_code == 200 and pinned.json()["lease"]["node_id"] == "b", pinned.text

    def free(node: str) -> int:
        view = a.get("/v1/cluster")
        return int(next(n for n in view["nodes"] if n["node"] == node)["gpus"][0]["free_mb"])

    wait_until(lambda: free("c") <= SIZES["c"] - 1024 - 12000 and free("b") <= SIZES["b"] - 12000, 10,
               "b and c published their VRAM leases")
    too_big = post(a, {**lease, "mb": 20000, "node_id": "*"})
    assert too_big.status_code == 503  # c has 24576 - 1024 (emb) - 12000 left: nowhere fits now
    assert "c: GPU 0 has" in too_big.json()["detail"] and "b: GPU 0 has" in too_big.json()["detail"]
    unknown = post(a, {**lease, "node_id": "zz", "gpu_id": 0})
    assert unknown.status_code == 404 and "no live node 'zz'" in unknown.json()["detail"]
    for node, held_lease in (("c", granted), ("b", pinned.json()["lease"])):  # released at a: forwarded
        released = httpx.delete(f"{a.api}/api/leases/{held_lease['lease_id']}", headers=AUTH, timeout=10)
        assert released.status_code == 200 and released.json()["released"] is True, released.text
        assert not [x for x in nodes[node].get("/v1/status")["leases"] if x["id"] == held_lease["lease_id"]]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # once c published the release, 20000 MB fit there again
        again = post(a, {**lease, "mb": 20000, "node_id": "*"})
        if again.status_code == 200:
            assert again.json()["lease"]["node_id"] == "c"
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"20000 MB never placed after the releases: {again.text}")


def test_a_gateway_cut_off_from_etcd_serves_its_own_models_and_says_why_not_the_others(
        nodes: dict[str, Node], etcd: EtcdCluster) -> None:
    a = nodes["a"]
    etcd.kill(0)  # no etcd at all: every node's services keep running
    sdk = a.sdk()
    chat = sdk.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=2)  # a's own: served here
    assert chat.choices[0].message.content == "".join(reply("alpha", 2))
    with pytest.raises(openai.APIStatusError) as elsewhere:
        sdk.chat.completions.create(model="gamma", messages=MESSAGES)  # c's only: a cannot place it now
    assert elsewhere.value.status_code == 503
    assert "not served on this node and the cluster state is unavailable" in str(elsewhere.value)
