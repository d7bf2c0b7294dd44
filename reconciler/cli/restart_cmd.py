"""``reconciler restart SERVICE``: see :mod:`reconciler.cli.service_cmd` (the verbs share one module)."""

from __future__ import annotations

import argparse

from reconciler.cli.service_cmd import register_verb


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_verb(subparsers, "restart")
