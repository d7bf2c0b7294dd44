"""What an operator sees of a cluster: ``plan --cluster``, the dashboard's cluster card, ``node``-labelled metrics.

A real etcd (one member) and two real ``reconciler watch --api`` nodes on simulated GPUs, each
with its own profile, state directory and simulation scope:

* ``a`` (8 GB): ``embed`` (always on, 2 slots) and ``solo`` (always on, 1 slot, only on ``a``);
* ``b`` (16 GB): ``embed`` on demand.

A lease on ``embed`` and one on ``solo`` are taken through ``a`` (both are warm there). The tests
then plan a profile change on ``a`` across the cluster, scrape both nodes' metrics (every series
labelled with its node; ``promtool check metrics`` passes), and open ``a``'s dashboard in chromium.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import webdriver
from tests.cluster_support import EtcdCluster, NodeProcess, etcd_binary, node_profile, service_block
from tests.e2e_support import Host, wait_until
from tests.test_metrics_prometheus import samples, value

SIZES = {"a": 8192, "b": 16384}

def block(name: str, port: int, *, mb: int, priority: int = 3, slots: int = 2, always_on: bool = False) -> str:
    # the interpreter's path as is, not ${RECONCILER_PYTHON}: `observe` shows a ${VAR}'s value as its
    # reference, and a plan from such a snapshot would restart what it is in
    return service_block(name, port, mb=mb, priority=priority, slots=slots, always_on=always_on,
                         python=sys.executable)


def profile_of(name: str, *blocks: str) -> str:
    return node_profile(name, SIZES[name], blocks)


@dataclass
class Node(NodeProcess):
    url: str = ""

    def get(self, path: str) -> Any:
        answer = httpx.get(f"{self.url}{path}", timeout=30)
        answer.raise_for_status()
        return answer.json() if path != "/metrics" else answer.text


@dataclass
class Cluster:
    etcd: EtcdCluster
    a: Node
    b: Node
    leases: dict[str, dict[str, Any]]

    def reconciler(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True,
                              timeout=60, env=env or self.a.host.env())

    def snapshot(self, tmp: Path) -> Path:
        """``observe`` on node a, as an operator runs it there (its profile, state directory and GPU)."""
        done = self.reconciler("observe", "--profile", str(self.a.host.profile), "--state-dir",
                               str(self.a.host.state_dir), "--gpu", f"sim:{SIZES['a']}", "--node", "a")
        assert done.returncode == 0, done.stderr
        path = tmp / "snapshot-a.json"
        path.write_text(done.stdout)
        return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    etcd_binary()
    root = tmp_path_factory.mktemp("cluster-views")
    etcd = EtcdCluster(root / "etcd", size=1).start()
    hosts = {name: Host(root / name) for name in SIZES}
    try:
        ports = {name: {"embed": host.port(), "solo": host.port(), "tts": host.port()} for name, host in hosts.items()}
        hosts["a"].write(profile_of("a", block("embed", ports["a"]["embed"], mb=1500, always_on=True),
                                    block("solo", ports["a"]["solo"], mb=1000, slots=1, always_on=True)))
        hosts["b"].write(profile_of("b", block("embed", ports["b"]["embed"], mb=1500)))
        nodes = {name: Node(name, host, ports[name]) for name, host in hosts.items()}
        for node in nodes.values():
            node.run = node.host.watch("--api", "127.0.0.1:0", "--gpu", f"sim:{SIZES[node.name]}", "--node",
                                       node.name, "--etcd", etcd.endpoints, "--etcd-ttl", "3")
        for node in nodes.values():
            assert node.run is not None
            node.run.wait_kind("cluster.joined", timeout_s=30)
            started = node.run.seen("api.started") or [node.run.wait_kind("api.started", timeout_s=30)]
            node.url = started[0]["url"]
        a, b = nodes["a"], nodes["b"]

        def ready() -> bool:
            view = a.get("/v1/cluster")
            alive = sorted(n["node"] for n in view["nodes"] if n["alive"])
            return alive == ["a", "b"] and sorted(view["services"]) == ["embed", "solo"]
        wait_until(ready, 30, "both nodes in the view, embed and solo running on a")
        leases = {}
        for service in ("embed", "solo"):
            answer = httpx.post(f"{a.url}/v1/leases", json={"service": service, "holder": f"{service}-user",
                                                            "ttl_s": 600}, timeout=60)
            assert answer.status_code == 200 and answer.json()["node"] == "a", answer.text
            leases[service] = answer.json()
        wait_until(lambda: len(a.get("/v1/cluster")["leases"].get("a", [])) == 2, 10, "both leases published")
        wait_until(lambda: a.get("/v1/cluster")["nodes"][0]["services"]["solo"]["slots_free"] == 0, 10,
                   "solo's slot taken in the view")
        yield Cluster(etcd, a, b, leases)
    finally:
        for host in hosts.values():
            host.close()
        etcd.stop()


# --- plan --cluster -------------------------------------------------------------------------------


def test_plan_cluster_on_an_unchanged_profile_plans_nothing_anywhere(cluster: Cluster, tmp_path: Path) -> None:
    snapshot = cluster.snapshot(tmp_path)
    done = cluster.reconciler("plan", "--profile", str(cluster.a.host.profile), "--snapshot", str(snapshot),
                              "--cluster", "--url", cluster.b.url, "--node", "a")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No changes across the cluster." in done.stdout
    assert "Across cluster default (node a):" in done.stdout


def test_plan_cluster_shows_what_leaves_the_node_and_where_its_leases_would_go(
    cluster: Cluster, tmp_path: Path,
) -> None:
    snapshot = cluster.snapshot(tmp_path)
    ports = cluster.a.ports
    changed = tmp_path / "a-without-embed.yaml"  # embed leaves a's profile; tts joins it (on demand)
    changed.write_text(profile_of("a", block("solo", ports["solo"], mb=1000, slots=1, always_on=True),
                                  block("tts", ports["tts"], mb=2000)))
    done = cluster.reconciler("plan", "--profile", str(changed), "--snapshot", str(snapshot), "--cluster",
                              "--url", cluster.a.url, "--format", "json")
    assert done.returncode == 2, done.stdout + done.stderr  # the snapshot names node a: no --node needed
    doc = json.loads(done.stdout)
    assert doc["node"] == "a" and doc["cluster"] == "default" and doc["changes"] is True
    local = {a["id"] for a in doc["local"]["actions"]}
    embed_lease = cluster.leases["embed"]["id"]
    assert {"stop:embed", f"release:{embed_lease}"} <= local, local
    assert [o["service"] for o in doc["withdrawn"]] == ["embed"]
    assert doc["withdrawn"][0]["reason"] == "no longer in the profile"
    assert [o["service"] for o in doc["offered"]] == ["tts"]
    assert "without eviction" in doc["offered"][0]["reason"]
    [ended] = doc["ended"]
    assert ended["kind"] == "lease" and ended["id"] == embed_lease and ended["holder"] == "embed-user"
    assert (ended["to"], ended["tier"]) == ("b", "fit")  # b has embed in its profile and room for it
    where = {w["service"]: w for w in doc["placement"]}
    assert where["embed"]["before"] == {"node": "a", "tier": "warm"}  # one of its two slots is free on a
    assert where["embed"]["after"] == {"node": "b", "tier": "fit"} and where["embed"]["changed"]
    assert where["tts"]["before"] is None and where["tts"]["after"] == {"node": "a", "tier": "fit"}
    assert not where["solo"]["changed"]
    # the same as text: the local plan first, then the cluster
    text = cluster.reconciler("plan", "--profile", str(changed), "--snapshot", str(snapshot), "--cluster",
                              "--url", cluster.a.url)
    assert text.returncode == 2, text.stderr
    local_part, _, cluster_part = text.stdout.partition("Across cluster default (node a):")
    assert "- stop:embed" in local_part and cluster_part, text.stdout
    assert "- no longer offered here: embed (no longer in the profile)" in cluster_part
    assert f"< lease {embed_lease} (embed, holder embed-user) ends:" in cluster_part
    assert "→ a new request goes to b (fit)" in cluster_part
    assert "~ placement of embed: a (warm) → b (fit)" in cluster_part
    assert "~ placement of tts: no node → a (fit)" in cluster_part
    # nothing was touched: the lease is still held on a, embed still runs there
    assert any(x["id"] == embed_lease for x in cluster.a.get("/v1/cluster")["leases"]["a"])
    assert "embed" in cluster.a.get("/v1/cluster")["services"]


def test_plan_cluster_exits_3_when_a_lease_ending_here_has_nowhere_to_go(cluster: Cluster, tmp_path: Path) -> None:
    snapshot = cluster.snapshot(tmp_path)
    changed = tmp_path / "a-empty-but-tts.yaml"  # solo exists on a only
    changed.write_text(profile_of("a", block("tts", cluster.a.ports["tts"], mb=2000)))
    done = cluster.reconciler("plan", "--profile", str(changed), "--snapshot", str(snapshot), "--cluster",
                              "--url", cluster.b.url, "--node", "a", "--format", "markdown")
    assert done.returncode == 3, done.stdout + done.stderr
    solo = cluster.leases["solo"]["id"]
    assert "#### Across cluster `default` (node `a`)" in done.stdout
    assert f"lease {solo} (solo, holder solo-user) ends" in done.stdout
    assert "no node could take it: b: no service 'solo' in its profile" in done.stdout


def test_plan_cluster_errors_say_what_and_what_to_do(cluster: Cluster, tmp_path: Path) -> None:
    snapshot = cluster.snapshot(tmp_path)
    profile = str(cluster.a.host.profile)
    unknown = cluster.reconciler("plan", "--profile", profile, "--snapshot", str(snapshot), "--cluster", "--url",
                                 cluster.a.url, "--node", "zz")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "reconciler: node 'zz' is not a live node of cluster 'default' (live: a, b)"
    usage = cluster.reconciler("plan", "--profile", profile, "--snapshot", str(snapshot), "--url", cluster.a.url)
    assert usage.returncode == 64 and "go with --cluster" in usage.stderr
    nobody = cluster.reconciler("plan", "--profile", profile, "--snapshot", str(snapshot), "--cluster", "--url",
                                "http://127.0.0.1:9")
    assert nobody.returncode == 1 and "no reconciler API at http://127.0.0.1:9" in nobody.stderr
    assert "Traceback" not in unknown.stderr + usage.stderr + nobody.stderr


# --- metrics ----------------------------------------------------------------------------------------


def test_every_series_carries_the_node_label_in_cluster_mode(cluster: Cluster) -> None:
    for node in (cluster.a, cluster.b):
        scrape = samples(node.get("/metrics"))
        assert len(scrape) > 30  # GPU, services, instances, actions, histograms, connections
        unlabelled = [name for name, labels in scrape if ("node", node.name) not in labels]
        assert unlabelled == [], unlabelled[:5]
        assert value(scrape, "reconciler_gpu_memory_total_bytes", node=node.name, gpu="0") == SIZES[node.name] * 2**20
        assert value(scrape, "reconciler_leases", node=node.name, service="embed", kind="service") == (
            1 if node.name == "a" else 0)
    a = cluster.a.get("/metrics")
    scrape = samples(a)
    assert value(scrape, "reconciler_leases", node="a", service="solo", kind="service") == 1
    assert value(scrape, "reconciler_actions_total", node="a", kind="start", outcome="done") >= 2  # counters too
    assert value(scrape, "reconciler_reconcile_duration_seconds_bucket", node="a", le="+Inf") >= 1  # histograms
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's `prometheus` package has it); .ci/run installs it")
    checked = subprocess.run([promtool, "check", "metrics"], input=a, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}"


# --- the dashboard ------------------------------------------------------------------------------------


@pytest.mark.skipif(webdriver.missing() is not None, reason=webdriver.missing() or "")
def test_the_dashboard_shows_every_node_what_runs_where_and_leases_by_node(cluster: Cluster, tmp_path: Path) -> None:
    with webdriver.Chrome.start() as browser:
        browser.viewport(1280, 900)
        browser.get(cluster.b.url + "/")  # seen from b: a's leases and services come from etcd
        wait_until(lambda: int(browser.script("return document.body.dataset.clusterRenders || 0")) > 0, 10,
                   "the cluster card rendered")
        assert browser.script("return document.getElementById('cluster-card').hidden") is False
        assert browser.text("#cluster-name") == "default"
        rows = browser.script(
            """
            return Object.fromEntries([...document.querySelectorAll('#cluster tbody tr')].map((tr) => [
              tr.dataset.node, Object.fromEntries([...tr.cells].map((td) => [
                [...td.classList].find((c) => c !== 'num' && c !== 'mono'), td.textContent.trim()]))
            ]));
            """)
        assert sorted(rows) == ["a", "b"]
        assert rows["a"]["alive"] == rows["b"]["alive"] == "yes"
        assert rows["a"]["running"] == "embed, solo"
        assert rows["a"]["leases"] == "2" and rows["b"]["leases"] == "0"
        assert rows["b"]["node"] == "b (this)"
        view = cluster.b.get("/v1/cluster")
        gpu_a = next(n for n in view["nodes"] if n["node"] == "a")["gpus"][0]
        assert rows["a"]["gpus"].startswith(f"GPU 0: {gpu_a['reserved_mb']:,} MB / 8,192 MB"), rows["a"]
        assert rows["b"]["gpus"].startswith("GPU 0: ") and "/ 16,384 MB" in rows["b"]["gpus"]
        leases = browser.script(
            "return [...document.querySelectorAll('#cluster-leases tbody tr')].map((tr) => "
            "[tr.dataset.node, tr.dataset.lease, tr.querySelector('.service').textContent, "
            "tr.querySelector('.holder').textContent])")
        assert sorted(leases) == sorted([["a", cluster.leases[s]["id"], s, f"{s}-user"] for s in ("embed", "solo")])
        # a lease granted on b shows on its node within the card's poll (2 s), without a reload
        browser.script("window.__sameDocument = true")
        answer = httpx.post(f"{cluster.b.url}/v1/leases", json={"service": "embed", "holder": "late", "node": "b",
                                                               "ttl_s": 60}, timeout=60)
        assert answer.status_code == 200, answer.text
        lease = answer.json()["id"]
        wait_until(lambda: browser.script(
            "return !!document.querySelector(`#cluster-leases tr[data-node='b'][data-lease='${arguments[0]}']`)",
            lease), 10, "b's new lease in the card")
        assert browser.script("return window.__sameDocument") is True
        wait_until(lambda: "embed" in browser.text("#cluster tr[data-node='b'] .running"), 10, "embed running on b")
        assert httpx.delete(f"{cluster.b.url}/v1/leases/{lease}", timeout=10).status_code == 200
        shot = tmp_path / "dashboard-cluster.png"
        browser.screenshot(shot)
        print(f"\nscreenshot: {shot}")
        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert errors == [], errors


def test_a_single_machine_dashboard_has_no_cluster_card_and_its_status_says_so(tmp_path: Path) -> None:
    """One machine: ``cluster`` is null in the status, the page never asks for /v1/cluster (a 404 there would
    show as a console error) and the card stays hidden; the metrics have no node label (tests/test_metrics_*)."""
    if webdriver.missing() is not None:
        pytest.skip(webdriver.missing() or "")
    with Host(tmp_path) as host:
        host.write(profile_of("a", block("embed", host.port(), mb=1500, always_on=True)))
        run = host.watch("--api", "127.0.0.1:0")
        url = run.wait_kind("api.started", timeout_s=30)["url"]
        status = httpx.get(f"{url}/v1/status", timeout=10).json()
        assert status["cluster"] is None
        assert 'node="' not in httpx.get(f"{url}/metrics", timeout=10).text
        with webdriver.Chrome.start() as browser:
            browser.get(url + "/")
            wait_until(lambda: browser.text("#profile") == "node-a", 10, "the status rendered")
            assert browser.script("return document.getElementById('cluster-card').hidden") is True
            assert browser.script("return document.body.dataset.clusterRenders") is None
            errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
            assert errors == [], errors
