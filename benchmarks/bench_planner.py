"""Planner speed (issue 2): plan time for three shapes of input.

(a) the bundled 24 GB profile with a realistic snapshot (adopted Ollama,
    vLLM serving a lease, a leased slot, one demand granted and one pending
    because nothing less important is running);
(b) 8 GPUs × 200 services with 50 leases and 20 demands (20 starts,
    20 leases, 10 expired leases released);
(c) an eviction choice among 24 candidates on one GPU — exact, checked
    against the known optimum of the constructed case;
(d) the GPU set choice of a service spanning 4 of 8 GPUs (gpu_count 4)
    among 24 candidates, 8 of them spanning two GPUs themselves — exact,
    checked against an enumeration of evictions by size on every set.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import combinations
from pathlib import Path

from benchmarks.timing import measure
from reconciler.core.eviction import Candidate, choose_eviction
from reconciler.core.gpu_sets import Spread, choose_gpu_set
from reconciler.core.launch import launch_spec
from reconciler.core.planner import plan
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot
from reconciler.loading import load_profile

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)


def realistic_24gb() -> tuple[Profile, Snapshot]:
    profile = load_profile(ROOT / "profiles" / "single-gpu-24gb.yaml", environ={})
    vllm = profile.services["vllm"]
    launch = launch_spec("vllm", vllm, 0, "qwen2.5-7b")
    snapshot = Snapshot.model_validate({
        "format_version": 1, "node": "local", "now": NOW.isoformat(),
        "gpus": [{"index": 0, "uuid": "GPU-0", "name": "RTX 4090", "total_mb": 24576, "used_mb": 16100,
                  "processes": [{"pid": 4242, "used_mb": 6900}, {"pid": 5151, "used_mb": 8800}]}],
        "processes": [
            {"pid": 4242, "create_time": 1.0, "cmdline": ["/usr/local/bin/ollama", "serve"], "listening": [11434]},
            {"pid": 5151, "create_time": 2.0, "cmdline": launch.argv, "listening": [8000]},
        ],
        "probes": {"ollama": {"healthy": True, "status": 200}, "vllm": {"healthy": True, "status": 200},
                   "cf-docuvision": {"healthy": False, "error": "connection refused"}},
        "instances": [
            {"service": "ollama", "gpu": 0, "origin": "adopted", "pid": 4242, "create_time": 1.0},
            {"service": "vllm", "gpu": 0, "origin": "started", "pid": 5151, "create_time": 2.0,
             "model": "qwen2.5-7b", "launch": launch.model_dump(), "since": (NOW - timedelta(hours=1)).isoformat()},
        ],
        "leases": [{"id": "L1", "service": "vllm", "holder": "kiwi", "gpu": 0, "model": "qwen2.5-7b",
                    "expires_at": (NOW + timedelta(minutes=4)).isoformat()},
                   {"id": "L2", "service": "cf-embed", "holder": "search", "gpu": 0,
                    "expires_at": (NOW + timedelta(minutes=4)).isoformat()}],
        "demands": [{"id": "D1", "service": "cf-docuvision", "holder": "scanner", "requested_at": NOW.isoformat()},
                    {"id": "D2", "service": "cf-vision", "holder": "photos", "requested_at": NOW.isoformat()}],
    })
    return profile, snapshot


def large_cluster_box() -> tuple[Profile, Snapshot]:
    """8 GPUs × 200 services, half of them running, 50 leases, 20 demands."""
    services, instances, processes, leases, demands = {}, [], [], [], []
    gpu_procs: dict[int, list[dict]] = {g: [] for g in range(8)}
    for i in range(200):
        name = f"svc{i:03d}"
        services[name] = {
            "max_mb": 512 + (i % 7) * 256, "priority": 1 + i % 4, "shared": True, "max_concurrent": 4,
            "idle_stop_after_s": 600 if i % 3 else 0,
            "managed": {"type": "process", "exec_path": f"/opt/{name}/serve", "args_template": "--port {port}",
                        "port": 20000 + i},
        }
    profile = Profile.model_validate({"schema_version": 1, "name": "big", "services": services})
    for i in range(0, 200, 2):
        name, gpu, pid = f"svc{i:03d}", (i // 2) % 8, 10000 + i  # the running half, spread over all 8
        spec = profile.services[name]
        launch = launch_spec(name, spec, gpu, None)
        processes.append({"pid": pid, "create_time": float(pid), "cmdline": launch.argv, "listening": [20000 + i]})
        gpu_procs[gpu].append({"pid": pid, "used_mb": spec.max_mb - 100})
        instances.append({"service": name, "gpu": gpu, "origin": "started", "pid": pid, "create_time": float(pid),
                          "launch": launch.model_dump(), "since": (NOW - timedelta(seconds=300)).isoformat()})
        if len(leases) < 50:
            leases.append({"id": f"L{i}", "service": name, "gpu": gpu,
                           "expires_at": (NOW + timedelta(seconds=60 if i % 5 else -5)).isoformat()})
    for d in range(20):
        demands.append({"id": f"D{d}", "service": f"svc{1 + 2 * d:03d}", "requested_at": NOW.isoformat()})
    gpus = [{"index": g, "total_mb": 24576, "used_mb": sum(p["used_mb"] for p in gpu_procs[g]) + 200,
             "processes": gpu_procs[g]} for g in range(8)]
    snapshot = Snapshot.model_validate({
        "format_version": 1, "node": "local", "now": NOW.isoformat(), "gpus": gpus, "processes": processes,
        "probes": {f"svc{i:03d}": {"healthy": True, "status": 200} for i in range(0, 200, 2)},
        "instances": instances, "leases": leases, "demands": demands,
    })
    return profile, snapshot


def eviction_case() -> tuple[dict, dict, int]:
    """24 candidates of mixed size and busyness at one priority, so the whole search is exercised."""
    candidates = {}
    for i in range(24):
        name = f"c{i:02d}"
        candidates[name] = Candidate(name, 4 if i % 5 else 3, i % 4 == 0, 300 + (i * 137) % 1500)
    closures = {n: frozenset([n]) for n in candidates}
    idle_top = sorted((c.mb for c in candidates.values() if not c.busy and c.priority == 4), reverse=True)
    deficit = sum(idle_top[:7]) - 250  # needs seven or more of the idle priority-4 candidates
    return candidates, closures, deficit


def independent_optimum(candidates: dict, deficit: int) -> tuple[int, int, int, int]:
    """(−top priority, busy, count, MB) of the best set, by subset-sum bitsets (singleton closures only).

    A different method from the planner's branch and bound, so agreement means something.
    """
    for level in sorted({c.priority for c in candidates.values()}, reverse=True):
        pool = [c for c in candidates.values() if c.priority >= level]
        if sum(c.mb for c in pool) < deficit:
            continue
        busy = [c.mb for c in pool if c.busy]
        idle = [c.mb for c in pool if not c.busy]
        for b in range(len(busy) + 1):
            for k in range(b, len(pool) + 1):
                if k - b > len(idle):
                    break
                best = _min_sum(busy, b, idle, k - b, deficit)
                if best is not None:
                    top = min(c.priority for c in pool)
                    return (-top, b, k, best)
    raise AssertionError("no set frees enough")


def _reachable(values: list[int], count: int) -> int:
    reach = [1] + [0] * count  # reach[c]: bit s set ⇔ some c values sum to s
    for v in values:
        for c in range(count, 0, -1):
            reach[c] |= reach[c - 1] << v
    return reach[count]


def _min_sum(busy, b, idle, i, deficit) -> int | None:
    sums_b, sums_i = _reachable(busy, b), _reachable(idle, i)
    idle_sums = [s for s in range(sums_i.bit_length()) if sums_i >> s & 1]
    best = None
    for s1 in range(sums_b.bit_length()):
        if sums_b >> s1 & 1:
            for s2 in idle_sums:
                if s1 + s2 >= deficit:
                    best = s1 + s2 if best is None else min(best, s1 + s2)
                    break
    return best


def gpu_set_case() -> tuple[int, int, dict[int, int], dict[str, Spread], dict[str, frozenset[str]]]:
    """8 × 24 GB GPUs, each crowded by two single-GPU candidates and two that span it and a neighbour;
    a service needing 16000 MB on each of 4 GPUs must evict on every GPU of its set."""
    candidates = {}
    for i in range(24):
        name = f"c{i:02d}"
        held = [i // 2] if i < 16 else [i - 16, (i - 15) % 8]
        mb = 2000 + (i * 1373) % 4000
        candidates[name] = Spread(name, 4 if i % 5 else 3, i % 4 == 0, dict.fromkeys(held, mb))
    free = {g: 24576 - sum(c.mb.get(g, 0) for c in candidates.values()) - (g * 700) % 2000 for g in range(8)}
    return 16000, 4, free, candidates, {n: frozenset([n]) for n in candidates}


def independent_set_optimum(need: int, count: int, free: dict[int, int], candidates: dict[str, Spread]) -> tuple:
    """(−top priority, busy, count, MB, names, GPUs) of the best (set, eviction), by enumerating, on every set of
    GPUs, the evictions of the candidates that free something there by (busy, size) — the first feasible
    size is the answer (singleton closures only). A different method from the branch and bound."""
    for level in sorted({c.priority for c in candidates.values()}, reverse=True):
        pool = {n: c for n, c in candidates.items() if c.priority >= level}
        best = None
        for gpu_set in combinations(sorted(free), count):
            there = sorted(n for n, c in pool.items() if any(c.mb.get(g, 0) for g in gpu_set))
            busy = [n for n in there if pool[n].busy]
            idle = [n for n in there if not pool[n].busy]
            found = None
            for b in range(len(busy) + 1):
                for k in range(len(idle) + 1):
                    for chosen in (set(x) | set(y) for x in combinations(busy, b) for y in combinations(idle, k)):
                        if all(free[g] + sum(pool[n].mb.get(g, 0) for n in chosen) >= need for g in gpu_set):
                            freed = sum(pool[n].mb.get(g, 0) for n in chosen for g in gpu_set)
                            key = (b, b + k, freed, tuple(sorted(chosen)), gpu_set)
                            found = key if found is None or key < found else found
                    if found is not None:
                        break
                if found is not None:
                    break
            if found is not None and (best is None or found < best):
                best = found
        if best is not None:
            top = min(candidates[n].priority for n in best[3])
            return (-top, *best)
    raise AssertionError("no set can be made to fit")


def run() -> list[dict]:
    rows = []
    profile, snapshot = realistic_24gb()
    result = plan(profile, snapshot)
    assert result.actions, "the realistic case should plan something"
    rows.append({"benchmark": "plan: 24 GB profile, realistic snapshot",
                 **measure(lambda: plan(profile, snapshot), 300), "target": "< 5 ms"})
    profile, snapshot = large_cluster_box()
    rows.append({"benchmark": "plan: 8 GPUs x 200 services, 50 leases, 20 demands",
                 **measure(lambda: plan(profile, snapshot), 40), "target": "< 50 ms"})
    candidates, closures, deficit = eviction_case()
    choice = choose_eviction(candidates, closures, deficit)
    top = min(candidates[n].priority for n in choice.services)
    exact = (-top, choice.busy, len(choice.services), choice.freed) == independent_optimum(candidates, deficit)
    rows.append({"benchmark": "eviction: 24 candidates on one GPU (exact)",
                 **measure(lambda: choose_eviction(candidates, closures, deficit), 200), "target": "< 10 ms",
                 "value": "exact" if exact else "WRONG"})
    need, count, free, spread, singletons = gpu_set_case()
    chosen = choose_gpu_set(need, count, list(free), free, spread, singletons)
    assert chosen is not None, "the constructed case has an answer"
    names = chosen.eviction.services
    top = min(spread[n].priority for n in names)
    got = (-top, chosen.eviction.busy, len(names), chosen.eviction.freed, names, chosen.gpus)
    exact = got == independent_set_optimum(need, count, free, spread)
    rows.append({"benchmark": "GPU set: 4 of 8 GPUs, 24 candidates (exact)",
                 **measure(lambda: choose_gpu_set(need, count, list(free), free, spread, singletons), 100),
                 "target": "< 20 ms", "value": "exact" if exact else "WRONG"})
    for row, limit in zip(rows, (5, 50, 10, 20), strict=True):
        row["ok"] = row["median_ms"] < limit and row.get("value", "exact") == "exact"
    return rows
