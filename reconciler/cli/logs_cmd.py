"""``reconciler logs SERVICE``: a service's log — its stdout and stderr, with a header per launch.

    reconciler logs SERVICE [-n N] [-f] [--state-dir D]
    reconciler logs SERVICE [-n N] --url URL [--token-file F]

The process driver appends what a service prints to
``<state dir>/logs/<service>.log`` (one file across its restarts). Without
``--url`` this reads that file directly (it works whether or not a server
runs, like ``journalctl -u``): the last ``-n`` lines (default 100), and
with ``-f`` whatever is appended afterwards, until Ctrl-C (a file that is
truncated or replaced is followed from its start, as ``tail -F`` does).
With ``--url`` (a server on another host) it asks
``GET /v1/services/{name}/logs?tail=N`` instead, with the token as for
``reconciler status``; ``-f`` needs the file, so it is refused there.
Exit 0; 1 when there is no log (the service never started here, or it is a
docker service: ``docker logs``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import quote

from reconciler.cli.status_cmd import add_url_argument

FOLLOW_POLL_S = 0.25


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "logs", help="print a service's log (-f: follow it)",
        description="Print the last lines of a service's log file (<state dir>/logs/<service>.log); -f follows it.",
    )
    parser.add_argument("service", metavar="SERVICE")
    parser.add_argument("-n", "--lines", type=int, default=100, metavar="N", help="how many lines (default: 100)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended (Ctrl-C ends)")
    parser.add_argument("--state-dir", metavar="DIR", help="state directory (default: the reconciler's own)")
    add_url_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.runtime import logs

    if not 0 <= args.lines <= logs.MAX_LINES:
        print(f"reconciler logs: -n must be between 0 and {logs.MAX_LINES}, got {args.lines}", file=sys.stderr)
        return 64
    if args.url:
        if args.follow:
            print("reconciler logs: -f reads the log file itself; run it on the server's host, without --url",
                  file=sys.stderr)
            return 64
        return _through_api(args)
    from reconciler.store import default_state_dir

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    path = logs.log_path(state_dir, args.service)
    if not path.exists():
        print(f"reconciler logs: {logs.missing_reason(args.service, path, _container(state_dir, args.service))}",
              file=sys.stderr)
        return 1
    try:
        size = path.stat().st_size
        lines = logs.tail(path, args.lines)
    except OSError as exc:
        print(f"reconciler logs: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    _write(lines)
    if not args.follow:
        return 0
    follower = logs.Follower(path, size)
    try:
        while True:
            _write(follower.read())
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        return 0


def _write(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()


def _container(state_dir: Path, service: str) -> str | None:
    from reconciler.errors import ReconcilerError
    from reconciler.host.clock import SYSTEM_CLOCK
    from reconciler.store import DB_NAME, open_store

    if not (state_dir / DB_NAME).exists():
        return None
    try:
        with open_store(state_dir, SYSTEM_CLOCK) as store:
            instance = store.get_instance(service)
    except ReconcilerError:
        return None
    return instance.container if instance is not None else None


def _through_api(args: argparse.Namespace) -> int:
    from reconciler.api.client import ApiClient, load_token

    with ApiClient(args.url, load_token(args.token_file)) as client:
        answer = client.get(f"/v1/services/{quote(args.service, safe='')}/logs?tail={args.lines}")
    _write(answer["lines"])
    return 0
