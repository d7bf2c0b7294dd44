"""``reconciler watch``: keep the host converged to a profile, and re-apply on every save.

    reconciler watch (--profile FILE | --profiles DIR) [--gpu nvml|auto|sim:…]
                     [--state-dir DIR] [--node NAME] [--resync S]
                     [--events text|json] [--allow-empty]
                     [--api [HOST:PORT]] [--gateway HOST:PORT] [--token-file FILE]

The loop itself — what triggers a pass, how an edit is accepted or
rejected, signals — is :class:`reconciler.runtime.loop.Loop`; this module
parses the arguments, puts the parts together and prints the events
(:mod:`reconciler.render.events`). ``--api`` also serves the HTTP API and
dashboard (:mod:`reconciler.api`) in this process, on the same event loop,
as the loop's companion; ``reconciler serve`` is the same with the API on by
default. ``--gateway HOST:PORT`` adds the model gateway (:mod:`reconciler.gateway`:
the OpenAI and Ollama APIs) as a second companion, with the same token rules;
both are made from the arguments in :mod:`.companions`.

Start-up: the profile is loaded (``--profiles DIR`` picks one by GPU size,
see :mod:`reconciler.loading.watcher`); an invalid one exits 1 with its
``file:line:col`` errors and touches nothing, and so does a profile without
services unless ``--allow-empty`` (invariant 3). One reconciler per state
directory: ``watch`` holds the lock that ``apply`` also takes.

Events go to stdout, one per line: readable text, or with ``--events json``
one JSON object per line (``kind`` plus data; the kinds are listed in
``reconciler/api/README.md``). Text mode leaves out passes that found nothing
to do.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.cli import cluster_opts
from reconciler.host.specs import SPEC_HELP

if TYPE_CHECKING:  # the command's parts are imported when it runs: other commands' parsers stay light
    from reconciler.host.gpu import GpuBackend
    from reconciler.loading.watcher import ProfileChange, ProfileWatcher
    from reconciler.render.events import Printer

DEFAULT_LISTEN = "127.0.0.1:7700"  # the API's (reconciler.api.auth.DEFAULT_LISTEN; not imported: watch stays light)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "watch",
        help="keep the host converged to a profile; re-apply on every save",
        description="Converge the host to the profile, then again on every saved change, every --resync "
        "seconds and whenever a service dies. Ctrl-C exits and leaves the services running.",
    )
    add_arguments(parser)
    parser.add_argument(
        "--api", nargs="?", const=DEFAULT_LISTEN, default=None, metavar="HOST:PORT",
        help=f"also serve the HTTP API and dashboard (default address {DEFAULT_LISTEN}); see `reconciler serve`",
    )
    add_token_argument(parser)
    parser.set_defaults(func=run)


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file", metavar="FILE",
        help="a file holding the token of the API and the gateway: mutating calls then need "
        "'Authorization: Bearer <token>' (required to listen off loopback)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The watch loop's options (``watch`` and ``serve`` share them)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", metavar="FILE", help="the profile (YAML)")
    source.add_argument(
        "--profiles", metavar="DIR",
        help="a directory of profiles: use the largest that fits the GPU (CPU profile without one)",
    )
    parser.add_argument("--gpu", default="auto", metavar="SPEC", help=f"GPU backend; {SPEC_HELP} (default: auto)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (default: the reconciler's own)")
    parser.add_argument("--node", default="local", help="node name (default: local)")
    parser.add_argument(
        "--resync", type=_positive, default=30.0, metavar="S",
        help="observe and plan again every S seconds (default: 30)",
    )
    parser.add_argument("--events", choices=("text", "json"), default="text", help="event output (default: text)")
    parser.add_argument(
        "--allow-empty", action="store_true", help="accept a profile without services (it stops everything)"
    )
    parser.add_argument(
        "--gateway", metavar="HOST:PORT", default=None,
        help="also serve the model gateway (OpenAI and Ollama APIs: a request for a model gets its service "
        "started, switched or swapped in, then proxied); off unless given; off loopback needs --token-file",
    )
    cluster_opts.add_arguments(parser)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(watch(args))


async def watch(args: argparse.Namespace) -> int:
    """Put the loop together from ``args`` and run it until a signal; 0, or raise (exit 1) at start-up."""
    import asyncio

    from reconciler.cli.companions import api_server, gateway_server
    from reconciler.host import systemd
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.render.events import Printer, print_events
    from reconciler.runtime.assembly import Assembly
    from reconciler.runtime.controls import remember
    from reconciler.runtime.loop import Companion, Loop, Started
    from reconciler.store import default_state_dir

    printer = Printer(args.events)
    api = api_server(args)
    gateway = gateway_server(args, api)
    cluster = cluster_opts.cluster_node(args, api, gateway)  # --etcd: join a cluster (reconciler.cluster.node)
    backend, watcher, first = load(args, printer)
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    assembly = Assembly(state_dir=state_dir, gpu_backend=backend, clock=SYSTEM_CLOCK, node=args.node,
                        purpose="watch")
    async with assembly:
        remember(assembly.runtime, first.path, args.gpu)
        for server in (api, gateway):
            if server is not None:
                server.bind()
        printing = asyncio.ensure_future(print_events(assembly.bus.subscribe(wants=printer.wants), printer))
        companions: list[Companion] = [c for c in (cluster, api, gateway) if c is not None]  # stopped in reverse
        started = Started(path=str(first.path), gpu=backend.name, state_dir=str(state_dir), detected=first.note)
        loop = Loop(assembly.runtime, watcher, first, bus=assembly.bus, started=started,
                    allow_empty=args.allow_empty, resync_s=args.resync, where=args.profiles or args.profile,
                    companions=companions, notify=systemd.notify)
        try:
            await loop.run()
        finally:
            assembly.runtime.events.close()
            await printing
    return 0


def load(args: argparse.Namespace, printer: Printer) -> tuple[GpuBackend, ProfileWatcher, ProfileChange]:
    """The GPU backend, the watcher and the first profile; raises (exit 1) when the profile is not usable."""
    from reconciler.core.events import EventKind
    from reconciler.errors import ProfileError
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.host.gpu import open_gpu_backend
    from reconciler.loading.watcher import (
        ProfileDirectory,
        ProfileFile,
        ProfileSource,
        ProfileWatcher,
        smallest_gpu_total,
    )
    from reconciler.runtime.guard import check_profile_guard
    from reconciler.runtime.loop import diagnostics_data

    source: ProfileSource
    if args.profiles:
        backend = open_gpu_backend(args.gpu)
        source = ProfileDirectory(args.profiles, smallest_gpu_total(backend.read))
    else:
        source = ProfileFile(args.profile)
    watcher = ProfileWatcher(source, clock=SYSTEM_CLOCK, resync_s=args.resync)
    first = watcher.load()
    if first.profile is None:
        if args.events == "json":  # machines read stdout; the located lines go to stderr as usual
            printer({"kind": EventKind.PROFILE_REJECTED, "message": "invalid profile at start-up; nothing changed",
                     "diagnostics": diagnostics_data(first.diagnostics)})
        raise ProfileError(list(first.diagnostics))
    check_profile_guard(first.profile, args.allow_empty)
    if not args.profiles:
        backend = open_gpu_backend(args.gpu, default_sim_mb=first.profile.vram_total_mb)
    return backend, watcher, first
