"""``reconciler apply``: make the host match the profile, now.

    reconciler apply --profile P [--gpu nvml|auto|sim:…] [--state-dir D] [--node N]
                     [--wait] [--timeout S] [--dry-run] [--allow-empty] [--format text|json]

Loads the profile (an invalid one exits 1 with ``file:line:col`` messages and
touches nothing), refuses a profile without services unless ``--allow-empty``
(it would stop everything), recovers what a previous run left half done, and
runs one pass — or, with ``--wait``, passes until nothing more can be done or
``--timeout`` seconds pass. Services it starts keep running after it exits
(their own session and process group); ``reconciler watch`` keeps them so.
``--dry-run`` observes and prints the plan without acting.

Exit codes: ``0`` converged (every action done, nothing pending); ``2``
actions remain (failed, skipped, deferred, or not yet confirmed); ``3``
something wanted is pending; ``1`` an error; ``64`` a usage error. With
``--dry-run``, the codes of ``reconciler plan``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.cli.plan_cmd import write_stdout
from reconciler.host.specs import SPEC_HELP

if TYPE_CHECKING:
    from reconciler.core.plan import Plan
    from reconciler.core.profile import Profile
    from reconciler.core.report import PassReport

DEFAULT_TIMEOUT_S = 300.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="make the host match the profile (one pass, or until converged with --wait)",
        description="Observe, plan and act once (or until converged with --wait). Exit 0: converged; "
        "2: actions remain; 3: something pending; 1: error; 64: usage.",
    )
    parser.add_argument("--profile", required=True, metavar="FILE", help="the profile (YAML)")
    parser.add_argument("--gpu", default="auto", metavar="SPEC", help=f"GPU backend; {SPEC_HELP} (default: auto)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (default: the reconciler's own)")
    parser.add_argument("--node", default="local", help="node name (default: local)")
    parser.add_argument("--wait", action="store_true", help="repeat passes until nothing more can be done")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"with --wait: give up after S seconds (default: {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument("--allow-empty", action="store_true",
                        help="apply a profile without services (stops every service the reconciler runs)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from reconciler.loading import load_profile
    from reconciler.render import render
    from reconciler.render.report import render_report
    from reconciler.runtime.guard import check_profile_guard
    from reconciler.store import default_state_dir

    profile = load_profile(args.profile)
    check_profile_guard(profile, args.allow_empty)
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    if args.dry_run:
        plan = asyncio.run(_dry_run(profile, args, state_dir))
        write_stdout(render(plan, args.format))
        return plan.exit_code
    report = asyncio.run(_apply(profile, args, state_dir))
    write_stdout(render_report(report, args.format))
    return report.exit_code


async def _apply(profile: Profile, args: argparse.Namespace, state_dir: Path) -> PassReport:
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.host.gpu import open_gpu_backend
    from reconciler.runtime.assembly import Assembly

    backend = open_gpu_backend(args.gpu, default_sim_mb=profile.vram_total_mb)
    async with Assembly(state_dir=state_dir, gpu_backend=backend, clock=SYSTEM_CLOCK, node=args.node,
                        purpose="apply") as parts:
        await parts.runtime.recover()
        from reconciler.runtime.controls import remember

        remember(parts.runtime, args.profile, args.gpu)
        if args.wait:
            return await parts.runtime.converge(profile, args.timeout)
        return await parts.runtime.reconcile(profile)


async def _dry_run(profile: Profile, args: argparse.Namespace, state_dir: Path) -> Plan:
    from reconciler.cli.observe_cmd import observe_once, read_inventory, with_holds
    from reconciler.core.planner import plan as make_plan

    snapshot = with_holds(await observe_once(profile, args.gpu, read_inventory(str(state_dir)), node=args.node),
                          str(state_dir))
    return make_plan(profile, snapshot)
