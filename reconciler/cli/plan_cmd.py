"""``reconciler plan``: what the reconciler would do, without touching the host.

    reconciler plan --profile P --snapshot S [--format text|json|markdown]
                    [--color auto|always|never]

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

A reader that goes away early (``reconciler plan | head``) is not an error:
the rest of the output is dropped quietly and the exit code is the plan's.
"""

from __future__ import annotations

import argparse
import os
import sys

from reconciler.render import COLOR_MODES, FORMATS, render, want_color


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
    write_stdout(render(result, args.format, color=color))
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
