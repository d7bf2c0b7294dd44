"""Hypothesis strategies: random but self-consistent profiles and snapshots.

A generated snapshot is one a real host could show: instances' processes exist
(or are deliberately dead), their GPU memory is in NVML, leases and demands
name services of the profile (mostly), times are around ``NOW``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from reconciler.core.launch import launch_spec
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot

NOW = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)
NAMES = ["ollama", "vllm", "comfyui", "stt", "tts", "embed", "vision", "docs"]


@st.composite
def profiles(draw, max_services: int = 6, gpu_count: int = 2,
             sizes: tuple[int, ...] = (0, 512, 1024, 2048, 4096, 6144, 9000), spans: bool = False) -> Profile:
    """``spans``: services may need several GPUs at once (``gpu_count`` up to 3, at most the GPUs there are)."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=max_services, unique=True))
    services = {}
    for i, name in enumerate(names):
        managed = None
        if draw(st.booleans()) or name == "ollama":
            if name == "ollama":
                managed = {"type": "process", "adopt": True, "exec_path": "/usr/local/bin/ollama",
                           "args_template": "serve", "port": 11434, "health_path": "/api/tags"}
            else:
                template = draw(st.sampled_from(["--port {port}", "--model {model} --port {port} --gpu {gpu_id}",
                                                 "--port {port} --gpus {gpu_ids}"]))
                managed = {"type": "process", "exec_path": f"/opt/{name}/bin/serve", "args_template": template,
                           "port": 8000 + i}
        earlier = names[:i]
        deps = draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True)) if earlier and i % 3 == 2 else []
        shared = draw(st.booleans())
        max_mb = draw(st.sampled_from(sizes))
        span = draw(st.integers(1, min(3, gpu_count))) if spans and max_mb and gpu_count > 1 else 1
        allowed = draw(st.one_of(st.none(), st.lists(st.integers(0, gpu_count - 1), min_size=1, unique=True)))
        if allowed is not None and len(allowed) < span:
            allowed = None
        services[name] = {
            "max_mb": max_mb,
            "gpu_count": span,
            "priority": draw(st.integers(1, 4)),
            "shared": shared,
            "max_concurrent": draw(st.integers(1, 3)) if shared else 1,
            "always_on": draw(st.booleans()) if i % 2 else False,
            "idle_stop_after_s": draw(st.sampled_from([0, 60, 600])),
            "model": draw(st.sampled_from([None, "m1"])),
            "managed": managed,
            "depends_on": deps,
            "gpus": allowed,
        }
    return Profile.model_validate({"schema_version": 1, "name": "random", "services": services})


@st.composite
def snapshots(draw, profile: Profile, gpu_count: int = 2, crowded: bool = False) -> Snapshot:
    if crowded:  # small GPUs (one, unless told), most services running: evictions, slots and starts in one plan
        totals = [8192] * gpu_count
    else:
        totals = [draw(st.sampled_from([8192, 16384, 24576])) for _ in range(draw(st.integers(0, gpu_count)))]
    used = {i: draw(st.sampled_from([0, 0, 300, 1500])) for i in range(len(totals))}  # foreign
    gpu_procs: dict[int, list[dict]] = {i: [] for i in range(len(totals))}
    processes, instances, probes, leases, demands = [], [], {}, [], []
    pid = 1000
    for name, spec in profile.services.items():
        pid += 1
        states = ["absent", "started", "started", "started"] if crowded else [
            "absent", "absent", "started", "started", "dead", "adopted"]
        state = draw(st.sampled_from(states))
        gpu = draw(st.integers(0, len(totals) - 1)) if totals and spec.max_mb else None
        if spec.gpus is not None and gpu is not None and gpu not in spec.gpus:
            gpu = spec.gpus[0] if spec.gpus[0] < len(totals) else None
        span: list[int] = [gpu] if gpu is not None else []
        if gpu is not None and spec.gpu_count > 1:  # a pair (or more): mostly its own count, sometimes stale
            others = [g for g in range(len(totals)) if g != gpu and (spec.gpus is None or g in spec.gpus)]
            want = draw(st.sampled_from([spec.gpu_count, spec.gpu_count, 1]))
            span = sorted([gpu, *draw(st.permutations(others))[:want - 1]])
            gpu = span[0]
        port = spec.probe_port
        if state == "adopted" and not spec.adoptable:
            state = "absent"
        workers = []
        if state in ("started", "adopted") and span and spec.max_mb:
            mbs = [min(spec.max_mb, totals[g] - used[g]) for g in span]
            if min(mbs) <= 0:
                state = "absent"
            else:
                for k, (g, mb) in enumerate(zip(span, mbs, strict=True)):
                    used[g] += mb
                    worker = pid if k == 0 or draw(st.booleans()) else pid + 50_000 + k  # a worker per GPU
                    gpu_procs[g].append({"pid": worker, "used_mb": mb})
                    if worker != pid:
                        workers.append(worker)
        if state in ("started", "adopted"):
            processes.append({"pid": pid, "create_time": 1000.0 + pid, "cmdline": [name],
                              "listening": [port] if port else []})
            processes += [{"pid": w, "ppid": pid, "create_time": 1000.0 + w, "cmdline": [name, "worker"]}
                          for w in workers]
            if port:
                probes[name] = {"healthy": draw(st.booleans()) if state == "started" else True, "status": 200}
        if state in ("started", "dead") and spec.managed is not None:
            model = spec.model if draw(st.booleans()) else "m2"
            launch = launch_spec(name, spec, span, model)
            if draw(st.integers(0, 4)) == 0:
                launch = launch.model_copy(update={"argv": [*launch.argv, "--old-flag"]})
            since = NOW - timedelta(seconds=draw(st.sampled_from([30, 700])))
            instances.append({"service": name, "gpu": gpu, "gpus": span if len(span) > 1 else None,
                              "origin": "started", "pid": pid,
                              "create_time": 1000.0 + pid if state == "started" else 5.0,
                              "model": model, "launch": launch.model_dump(), "state": "running",
                              "since": since.isoformat()})
            if state == "started" and draw(st.booleans()):
                expires = NOW + timedelta(seconds=draw(st.sampled_from([-30, 120])))
                leases.append({"id": f"L{pid}", "service": name, "holder": "app", "gpu": gpu,
                               "model": model, "expires_at": expires.isoformat()})
        for d in range(draw(st.integers(0, 2))):
            demands.append({"id": f"D{pid}-{d}", "service": name, "holder": "client",
                            "model": draw(st.sampled_from([None, "m1", "m2"])),
                            "requested_at": (NOW - timedelta(seconds=d)).isoformat()})
    if draw(st.booleans()):
        demands.append({"id": "Dx", "service": "not-in-profile", "requested_at": NOW.isoformat()})
    gpus = [{"index": i, "uuid": f"GPU-{i}", "name": "sim", "total_mb": total, "used_mb": used[i],
             "processes": gpu_procs[i]} for i, total in enumerate(totals)]
    if gpus and not crowded and draw(st.integers(0, 7)) == 0:  # the GPU set changed: NVML no longer shows one
        gpus = gpus[:-1]
    return Snapshot.model_validate({
        "format_version": 1, "node": "local", "now": NOW.isoformat(), "gpus": gpus, "processes": processes,
        "probes": probes, "instances": instances, "leases": leases, "demands": demands,
    })


@st.composite
def worlds(draw) -> tuple[Profile, Snapshot]:
    profile = draw(profiles())
    return profile, draw(snapshots(profile))


@st.composite
def spanning_worlds(draw) -> tuple[Profile, Snapshot]:
    """Up to four GPUs; services may need two or three of them at once (``gpu_count``)."""
    profile = draw(profiles(gpu_count=4, sizes=(0, 1024, 4096, 6144, 9000, 12000), spans=True))
    return profile, draw(snapshots(profile, gpu_count=4))


@st.composite
def crowded_worlds(draw) -> tuple[Profile, Snapshot]:
    """A full 8 GB GPU: most of up to eight services of 1 to 4 GB running, demands for the rest."""
    profile = draw(profiles(max_services=8, gpu_count=1, sizes=(1024, 2048, 2048, 4096)))
    return profile, draw(snapshots(profile, gpu_count=1, crowded=True))


@st.composite
def crowded_spanning_worlds(draw) -> tuple[Profile, Snapshot]:
    """Three full 8 GB GPUs: up to eight services, some spanning two or three GPUs, most running."""
    profile = draw(profiles(max_services=8, gpu_count=3, sizes=(1024, 2048, 2048, 4096), spans=True))
    return profile, draw(snapshots(profile, gpu_count=3, crowded=True))
