"""``reconciler stop|start|restart|reset SERVICE``: an operator's verbs, through a running server's API.

    reconciler stop SERVICE [--wait S]          stop it and keep it stopped (across restarts) until `start`
    reconciler start SERVICE | --all            lift a stop (or `down`): it runs again as the profile wants
    reconciler restart SERVICE [--now]          restart our instance (once idle; --now even while leased)
    reconciler reset SERVICE                    forget its failures: a backing-off or stalled service is tried now

Each is one call to ``reconciler serve`` (``--url``, ``$RECONCILER_URL``, the
token as for ``reconciler status``); what each verb means — a held stop
that beats ``always_on`` and survives restarts, dependents stopping first,
adopted instances never signalled — is :mod:`reconciler.runtime.controls`.
The call waits for the pass that carries it out (``--wait``, default 60 s)
and prints what happened. Exit 0 when it is done; 1 when it refused (an
unknown service, an adopted one), no server answered, or it had not
finished within the wait (a restart waiting for leases to end says so).
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import quote

from reconciler.cli.status_cmd import add_url_argument

HELP = {
    "stop": "stop a service (and what depends on it) and keep it stopped until `reconciler start`",
    "start": "let a stopped service run again (--all: every one)",
    "restart": "restart a service's instance (once idle; --now even while it holds leases)",
    "reset": "forget a service's failures: a backing-off or stalled service is tried at once",
}


def register_verb(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], verb: str) -> None:
    parser = subparsers.add_parser(verb, help=HELP[verb], description=HELP[verb].capitalize() + ", through the API "
                                   "of a running `reconciler serve`.")
    if verb == "start":
        parser.add_argument("service", metavar="SERVICE", nargs="?")
        parser.add_argument("--all", action="store_true", help="lift every hold (`stop`, `down`)")
    else:
        parser.add_argument("service", metavar="SERVICE")
    if verb == "restart":
        parser.add_argument("--now", action="store_true",
                            help="restart it even while it holds leases (they end with it)")
    if verb != "reset":
        parser.add_argument("--wait", type=float, default=60.0, metavar="S",
                            help="wait up to S seconds for it to be done (default: 60)")
    add_url_argument(parser)
    parser.set_defaults(func=run, verb=verb)


def run(args: argparse.Namespace) -> int:
    from reconciler.api.client import ApiClient, load_token

    verb = args.verb
    if verb == "start" and bool(args.all) == bool(args.service):
        print("reconciler start: name a SERVICE, or give --all (lift every hold)", file=sys.stderr)
        return 64
    wait = getattr(args, "wait", 0.0)
    if wait < 0 or wait > 600:
        print(f"reconciler {verb}: --wait must be between 0 and 600 seconds, got {wait:g}", file=sys.stderr)
        return 64
    path = "/v1/up" if verb == "start" and args.all else f"/v1/services/{quote(args.service, safe='')}/{verb}"
    query = []
    if verb != "reset":
        query.append(f"wait_s={wait:g}")
    if getattr(args, "now", False):
        query.append("now=true")
    if query:
        path += "?" + "&".join(query)
    with ApiClient(args.url, load_token(args.token_file), timeout_s=wait + 30) as client:
        done = client.post(path)
    print(done["message"])
    return 0 if done["done"] else 1
