"""The launch spec of a service on its GPUs with a model (DESIGN §3, "Launch spec").

What the planner compares with ``instances[].launch`` to decide a restart, and
what the drivers execute. ``argv`` = ``exec_path`` + the split, filled
``args_template``; ``cwd`` missing = ``""``; ``env`` as written (driver
additions such as ``CUDA_VISIBLE_DEVICES`` are not part of it); ``port``.
``{gpu_id}`` is the (first) GPU, ``{gpu_ids}`` every GPU a service spans,
comma-separated and ascending (``0,1``; just ``0`` on one GPU).
For containers ``argv`` is the filled ``command_template`` and ``image`` is set.

:func:`launch_digest` is a launch spec's short, stable fingerprint: a
service's failures are counted per digest (a changed spec starts afresh,
:mod:`.backoff`). :func:`launch_problem` says why a spec cannot be executed
at all (a NUL byte from a model name, an empty command) — the planner then
starts and stops nothing for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from reconciler.core.profile import DockerSpec, ProcessSpec, Service
from reconciler.core.snapshot import Instance, Launch
from reconciler.core.templates import fill, render_argv

Gpus = int | Sequence[int] | None  # one GPU, the GPUs a service spans, or none


def gpu_tuple(gpus: Gpus) -> tuple[int, ...]:
    """``gpus`` as an ascending tuple: ``0`` → ``(0,)``, ``[1, 0]`` → ``(0, 1)``, None → ``()``."""
    if gpus is None:
        return ()
    if isinstance(gpus, int):
        return (gpus,)
    return tuple(sorted(set(gpus)))


def template_values(name: str, service: Service, gpus: Gpus, model: str | None) -> dict[str, object]:
    managed = service.managed
    port = managed.port if managed else None
    placed = gpu_tuple(gpus)
    return {
        "port": port,
        "host_port": (managed.host_port or port) if managed else None,
        "gpu_id": placed[0] if placed else None,
        "gpu_ids": ",".join(map(str, placed)) if placed else None,
        "model": model,
        "service": name,
    }


def launch_spec(name: str, service: Service, gpus: Gpus, model: str | None) -> Launch | None:
    """The launch spec on ``gpus`` (one index, or every GPU it spans), or None for an unmanaged slot."""
    managed = service.managed
    values = template_values(name, service, gpus, model)
    if isinstance(managed, ProcessSpec):
        return Launch(
            argv=[managed.exec_path, *render_argv(managed.args_template, values)],
            cwd=managed.cwd or "",
            env={k: fill(v, values) for k, v in managed.env.items()},
            port=managed.port,
        )
    if isinstance(managed, DockerSpec):
        return Launch(
            argv=render_argv(managed.command_template, values),
            cwd="",
            env={k: fill(v, values) for k, v in managed.env.items()},
            port=managed.port,
            image=managed.image,
        )
    return None


def launch_changed(name: str, service: Service, instance: Instance) -> Launch | None:
    """The launch spec an instance of ours should run now, when it differs from the one it runs; else None."""
    if instance.origin != "started" or instance.launch is None:
        return None
    desired = launch_spec(name, service, instance.gpu_set, instance.model)
    return desired if desired is not None and desired != instance.launch else None


def launch_problem(launch: Launch) -> str | None:
    """Why the host could not execute ``launch`` (an empty argv, a NUL or control byte), or None."""
    if not launch.argv or not launch.argv[0]:
        return "its command is empty"
    for index, token in enumerate(launch.argv):
        if "\x00" in token:
            return f"argument {index} contains a NUL byte"
    for key, value in launch.env.items():
        if "\x00" in key or "\x00" in value or "=" in key or not key:
            return f"environment variable {key!r} is not one the host can set (empty, '=' or a NUL byte)"
    if "\x00" in launch.cwd:
        return "its working directory contains a NUL byte"
    return None


def launch_digest(launch: Launch | None) -> str:
    """A stable 16-hex-digit digest of a launch spec (None: an unmanaged slot)."""
    data = launch.model_dump(mode="json") if launch is not None else None
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
