"""``reconciler schema profile|snapshot``: print the JSON Schema of a file format.

The committed ``schemas/*.schema.json`` are this command's output:
``./dev reconciler schema profile > schemas/profile.schema.json``.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "schema",
        help="print the JSON Schema (draft 2020-12) of profiles or snapshots",
        description="Print the JSON Schema (draft 2020-12) of a file format, generated from the models.",
    )
    parser.add_argument("kind", choices=("profile", "snapshot"), help="which format")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.schema import render

    sys.stdout.write(render(args.kind))
    return 0
