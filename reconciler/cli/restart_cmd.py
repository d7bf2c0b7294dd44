"""``reconciler restart SERVICE [--now]``: restart a service's instance, now or once its leases end.

    reconciler restart SERVICE [--now] [--url URL] [--token-file FILE]

Asks a running ``reconciler serve`` (``POST /v1/services/SERVICE/restart``,
found and authenticated as ``reconciler status`` does). Without ``--now`` a
busy instance keeps serving until its leases end, new requests waiting for
the restarted one meanwhile — the rule an edit of its launch spec follows;
an idle one restarts at once. ``--now`` restarts it even while it holds
leases: their holders' requests are cut off, the leases are kept for the
restarted instance. What the pending reason of a drained restart tells an
operator to run. Exit 0 once the request is recorded (the next pass carries
it out: ``reconciler why SERVICE`` follows it); 1 when the service is not in
the profile, has nothing of ours running (an adopted instance is never
signalled), or no server answers.
"""

from __future__ import annotations

import argparse
from urllib.parse import quote

from reconciler.cli.status_cmd import add_url_argument


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "restart", help="restart a service's instance, now or once its leases end",
        description="Ask a running `reconciler serve` to restart SERVICE: once its leases end, or --now.",
    )
    parser.add_argument("service", metavar="SERVICE")
    parser.add_argument("--now", action="store_true",
                        help="restart even while it holds leases (their holders reconnect)")
    add_url_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.api.client import ApiClient, load_token

    with ApiClient(args.url, load_token(args.token_file)) as client:
        answer = client.post(f"/v1/services/{quote(args.service, safe='')}/restart", {"now": args.now})
    print(answer["message"])
    return 0
