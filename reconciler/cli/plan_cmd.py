"""``reconciler plan``: placeholder until the planner's command lands (it replaces this file)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="plan the actions that make the host match the profile")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("reconciler plan: not implemented yet", file=sys.stderr)
    return 1
