"""``reconciler plan``: what the reconciler would do, without touching the host.

    reconciler plan --profile P --snapshot S [--format text|json|markdown]
                    [--color auto|always|never]
                    [--cluster [--url URL] [--token-file F] [--node NAME]]

Reads a profile and a state snapshot (``reconciler observe`` writes one), plans,
and prints the plan to stdout: Terraform-style text (coloured only on a TTY
without ``NO_COLOR``, or with ``--color always``), the DESIGN §4 JSON, or
markdown for a pull-request comment.

Exit codes (DESIGN §4), so CI can act on them:

* ``0`` nothing to do;
* ``2`` actions to take;
* ``3`` something wanted cannot be reached (anything pending, even with actions);
* ``1`` an invalid profile or snapshot (``file:line:col: message`` on stderr),
  or a profile that asks what the snapshot's host cannot give (a
  ``gpu_count`` larger than its GPUs);
* ``64`` a usage error.

``--cluster`` adds what the profile would do across the node's cluster (a dry run of
placement: services this node would stop or start offering, leases held here that would
end and where their holders' next requests would go, where a new request for each
service would be placed before and after; :mod:`reconciler.cluster.whatif`). The
cluster view is read from a node's API, ``GET /v1/cluster`` (``--url``, else
``$RECONCILER_URL``; its token as ``status`` takes it), not from etcd: it needs no etcd
credentials or route to etcd, only what ``status --cluster`` needs. The node planned
for is ``--node``, else the snapshot's when it has a name of its own, else the node
answering. Exit codes as above; ``3`` also when a lease that would end here could be
placed on no node, ``2`` also for a change across the cluster alone; ``1`` when the node
or etcd cannot be read, or the node is not a live one of the cluster.

A reader that goes away early (``reconciler plan | head``) is not an error:
the rest of the output is dropped quietly and the exit code is the plan's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from reconciler.cli.status_cmd import add_url_argument
from reconciler.render import COLOR_MODES, FORMATS, render, want_color

if TYPE_CHECKING:
    from reconciler.core.plan import Plan
    from reconciler.core.profile import Profile
    from reconciler.core.snapshot import Snapshot

EXIT_USAGE = 64


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan the actions that make the host match the profile (dry run)",
        description="Plan the actions that make the host match the profile, from a state snapshot. "
        "Exit 0: nothing to do; 2: actions to take; 3: something pending; 1: invalid input; 64: usage.",
    )
    parser.add_argument("--profile", required=True, metavar="FILE", help="the profile (YAML)")
    parser.add_argument(
        "--snapshot", required=True, metavar="FILE", help="the state snapshot (YAML or JSON; see `reconciler observe`)"
    )
    parser.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    parser.add_argument(
        "--color", choices=COLOR_MODES, default="auto",
        help="colour the text plan: auto = on a terminal unless NO_COLOR is set (default: auto)",
    )
    group = parser.add_argument_group("cluster (what the profile would do to placement across the cluster)")
    group.add_argument("--cluster", action="store_true",
                       help="also plan across the cluster, from a node's GET /v1/cluster (--url)")
    add_url_argument(group)  # type: ignore[arg-type]  # an argument group takes add_argument just as well
    group.add_argument("--node", metavar="NAME",
                       help="the node whose profile changes (default: the snapshot's node, else the one at --url)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.core.checks import check_host
    from reconciler.core.planner import plan as make_plan
    from reconciler.loading import load_profile, load_snapshot

    profile = load_profile(args.profile)
    snapshot = load_snapshot(args.snapshot)
    if check_host(profile, snapshot):  # e.g. a gpu_count larger than the snapshot's GPUs: located errors
        profile = load_profile(args.profile, host=snapshot)
    result = make_plan(profile, snapshot)
    color = want_color(args.color, sys.stdout, os.environ)
    if args.cluster:
        return plan_cluster(args, profile, snapshot, result, color)
    if args.url or args.node or args.token_file:
        print("reconciler plan: --url, --token-file and --node go with --cluster (the plan across the cluster); "
              "add it, or leave them out for the node's own plan", file=sys.stderr)
        return EXIT_USAGE
    write_stdout(render(result, args.format, color=color))
    return result.exit_code


def plan_cluster(args: argparse.Namespace, profile: Profile, snapshot: Snapshot, local: Plan, color: bool) -> int:
    """``--cluster``: the cluster view from a node's API, the plan across it, printed after the local one."""
    from reconciler.api.client import ApiClient, load_token
    from reconciler.cluster.whatif import cluster_plan
    from reconciler.render.cluster_plan import cluster_markdown, cluster_text

    with ApiClient(args.url, load_token(args.token_file)) as client:
        view = client.get("/v1/cluster")
    node = args.node or (snapshot.node if snapshot.node != "local" else str(view.get("node")))
    result = cluster_plan(view, node, profile, snapshot, local)
    doc = result.to_json_dict()
    if args.format == "json":
        write_stdout(json.dumps(doc, indent=2) + "\n")
    elif args.format == "markdown":
        write_stdout(render(local, "markdown") + "\n" + cluster_markdown(doc))
    else:
        write_stdout(render(local, "text", color=color) + "\n" + cluster_text(doc))
    return result.exit_code


def write_stdout(text: str) -> None:
    """Write and flush; a closed pipe is the reader's choice, not an error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout() -> None:
    # Point stdout at /dev/null so the interpreter's final flush does not fail again.
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
