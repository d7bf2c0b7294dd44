"""``reconciler lease SERVICE``: hold a service while this command runs.

    reconciler lease SERVICE [--model M] [--ttl S] [--holder NAME] [--wait S] [--gpu N]
                     [--url URL] [--token-file FILE]

Asks the running server for a lease (``POST /v1/leases``: at once when a
compatible instance has room, else after it is started), prints the
service's URL as the first line of stdout, then renews the lease every
third of its TTL until SIGINT (Ctrl-C) or SIGTERM, and releases it on the
way out. Ctrl-C while it still waits for the grant withdraws the request
(the server sees the connection close). The token, when the server has one:
``--token-file``, else ``$RECONCILER_TOKEN_FILE``, else ``$RECONCILER_TOKEN``.
Exit 0 after a clean release; 1 when the lease is refused (the reason is
printed) or lost (expired or evicted while held).
"""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from reconciler.cli.status_cmd import add_url_argument

DEFAULT_TTL_S = 60.0
_Handler = Callable[[int, FrameType | None], Any] | int | None  # what signal.signal returns and takes


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "lease", help="hold a service (started if needed) while this runs; prints its URL",
        description="Lease SERVICE from a running `reconciler serve`, print its URL, renew the lease while "
        "this runs, release it on exit (Ctrl-C).",
    )
    parser.add_argument("service", metavar="SERVICE")
    parser.add_argument("--model", help="the model it must serve")
    parser.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, metavar="S",
                        help=f"lease lifetime, renewed every S/3 (default {DEFAULT_TTL_S:g})")
    parser.add_argument("--holder", default=None, help="who holds it (default: user@lease)")
    parser.add_argument("--wait", type=float, default=120.0, metavar="S",
                        help="how long to wait for a start or a free slot (default 120)")
    parser.add_argument("--gpu", type=int, default=None, metavar="N", help="the GPU it must be on")
    add_url_argument(parser)  # and --token-file
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.api.client import ApiClient, ApiError, load_token

    if not args.ttl > 0:
        print("reconciler lease: --ttl must be more than 0", file=sys.stderr)
        return 64
    stop = threading.Event()
    previous: dict[signal.Signals, _Handler] = {}
    body = {"service": args.service, "holder": args.holder or f"{getpass.getuser()}@lease", "ttl_s": args.ttl,
            "wait_s": args.wait}
    if args.model:
        body["model"] = args.model
    if args.gpu is not None:
        body["gpu"] = args.gpu
    try:
        with ApiClient(args.url, load_token(args.token_file)) as client:
            lease = client.post("/v1/leases", body, timeout_s=args.wait + 10)
            previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
            print(lease["url"] or "", flush=True)
            where = ", ".join(bit for bit in (f"GPU {lease['gpu']}" if lease["gpu"] is not None else "no GPU",
                                              f"model {lease['model']}" if lease.get("model") else "") if bit)
            print(f"lease {lease['id']} on {lease['service']} ({where}); "
                  f"renewing every {args.ttl / 3:g} s; Ctrl-C releases it", file=sys.stderr, flush=True)
            try:
                while not stop.wait(args.ttl / 3):
                    try:
                        client.post(f"/v1/leases/{lease['id']}/renew", {"ttl_s": args.ttl})
                    except ApiError as exc:
                        if exc.status == 404:
                            print(f"reconciler lease: lease {lease['id']} is gone (expired or evicted)",
                                  file=sys.stderr)
                            return 1
                        print(f"reconciler lease: renewal failed, retrying: {exc}", file=sys.stderr)
            finally:
                try:
                    client.delete(f"/v1/leases/{lease['id']}")
                    print(f"released lease {lease['id']}", file=sys.stderr)
                except ApiError as exc:
                    if exc.status != 404:
                        print(f"reconciler lease: could not release {lease['id']}: {exc}", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
