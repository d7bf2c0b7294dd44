"""``reconciler observe``: print a DESIGN §2 snapshot of the live host.

    reconciler observe --profile P [--gpu nvml|auto|sim:…] [--state-dir D]
                       [--node NAME] [--format json|yaml]

The profile says which ports to watch and which services to probe; the
inventory (instances, leases, demands) is read from the state store in
``--state-dir`` when one exists there — observing never creates one. The
output is what ``reconciler plan --snapshot`` reads.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.host.specs import SPEC_HELP

if TYPE_CHECKING:
    from reconciler.core.profile import Profile
    from reconciler.core.snapshot import Snapshot
    from reconciler.store import StoredState


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "observe",
        help="print a snapshot of the live host (GPUs, processes, probes, inventory)",
        description="Print a snapshot of the live host (DESIGN §2): GPUs, processes of interest, "
        "health probes and the inventory from the state store. `reconciler plan --snapshot` reads it.",
    )
    parser.add_argument("--profile", required=True, metavar="FILE", help="the profile (YAML)")
    parser.add_argument("--gpu", default="auto", metavar="SPEC", help=f"GPU backend; {SPEC_HELP} (default: auto)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (default: the reconciler's own)")
    parser.add_argument("--node", default="local", help="node name in the snapshot (default: local)")
    parser.add_argument("--format", choices=("json", "yaml"), default="json", help="output format (default: json)")
    parser.add_argument(
        "--show-secrets", action="store_true",
        help="print the launch specs as they are, with the values the profile read from ${VAR}s (by default "
        "those are shown as their ${VAR} reference, and a plan from such a snapshot restarts what they are in)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from reconciler.core.redaction import Redactor, redact_snapshot
    from reconciler.loading import load_profile

    profile = load_profile(args.profile)
    snapshot = asyncio.run(observe_once(profile, args.gpu, read_inventory(args.state_dir), node=args.node))
    snapshot = with_holds(snapshot, args.state_dir)
    if not args.show_secrets:
        snapshot = redact_snapshot(snapshot, Redactor(profile.expansions))
    try:
        sys.stdout.write(render(snapshot, args.format))
        sys.stdout.flush()
    except BrokenPipeError:  # `reconciler observe | head`: the reader is gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


async def observe_once(profile: Profile, gpu_spec: str, inventory: StoredState, *, node: str) -> Snapshot:
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.host.gpu import open_gpu_backend
    from reconciler.host.observer import Observer

    backend = open_gpu_backend(gpu_spec, default_sim_mb=profile.vram_total_mb)
    async with Observer(profile, backend, node=node, clock=SYSTEM_CLOCK) as observer:
        return await observer.observe(inventory.instances, inventory.leases, inventory.demands)


def read_inventory(state_dir: str | None) -> StoredState:
    """The store's instances, leases and demands; empty when there is no store yet."""
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.store import DB_NAME, StoredState, default_state_dir, open_store

    directory = Path(state_dir) if state_dir else default_state_dir()
    if not (directory / DB_NAME).is_file():
        return StoredState(instances=[], leases=[], demands=[])
    with open_store(directory, SYSTEM_CLOCK) as store:
        return store.state()


def with_holds(snapshot: Snapshot, state_dir: str | None) -> Snapshot:
    """``snapshot`` with the services an operator holds stopped (``reconciler stop``), as a pass plans with."""
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.store import DB_NAME, default_state_dir, open_store

    directory = Path(state_dir) if state_dir else default_state_dir()
    if not (directory / DB_NAME).is_file():
        return snapshot
    with open_store(directory, SYSTEM_CLOCK) as store:
        held = sorted(store.holds())
    return snapshot.model_copy(update={"held": held}) if held else snapshot


def render(snapshot: Snapshot, fmt: str) -> str:
    """The snapshot as JSON (what ``plan --snapshot`` reads) or YAML, field order kept."""
    if fmt == "json":
        from reconciler.loading import dump_snapshot

        return dump_snapshot(snapshot)
    from ruamel.yaml import YAML

    out = io.StringIO()
    # Nulls are kept: for some fields (a demand's ttl_s) null means "none", not "default".
    YAML().dump(snapshot.model_dump(mode="json"), out)  # round-trip dumper: keeps field order
    return out.getvalue()
