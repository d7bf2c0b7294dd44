"""``reconciler serve``: the watch loop plus the HTTP API and dashboard, in one process.

    reconciler serve (--profile FILE | --profiles DIR) [--gpu nvml|auto|sim:…]
                     [--state-dir DIR] [--listen HOST:PORT] [--token-file FILE]
                     [--node NAME] [--resync S] [--events text|json] [--allow-empty]

Everything ``reconciler watch`` does (see :mod:`.watch_cmd`), and the API of
:mod:`reconciler.api` on ``--listen`` (default ``127.0.0.1:7700``): leases,
status, plan, events, metrics, the cf-orch routes, the dashboard at ``/``.
Off loopback it refuses to start without ``--token-file`` (invariant 7).
``watch --api [HOST:PORT]`` is the same thing.
"""

from __future__ import annotations

import argparse

from reconciler.cli import watch_cmd


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="watch, plus the HTTP API and dashboard (leases, status, events)",
        description="Keep the host converged to the profile (like watch) and serve the HTTP API: leases, "
        "status, plan, events, metrics, cf-orch compatible routes, and the dashboard at /.",
    )
    watch_cmd.add_arguments(parser)
    parser.add_argument(
        "--listen", default=watch_cmd.DEFAULT_LISTEN, metavar="HOST:PORT",
        help=f"where the API listens (default {watch_cmd.DEFAULT_LISTEN}; off loopback needs --token-file)",
    )
    watch_cmd.add_token_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.api = args.listen
    return watch_cmd.run(args)
