"""``reconciler why SERVICE``: why a service is or is not running, in plain words, from the plan.

    reconciler why SERVICE [--url URL] [--token-file FILE]

Reads ``GET /v1/status`` of a running ``reconciler serve`` (with its token
when it has one, found as ``reconciler status`` finds it): the service's
instance (state, health, leases), what the last plan does about it (each
action with its reason), what waits for it (pending reasons, queued
demands), whether it is backing off, and whether its GPU is booked beyond
its total (the ``over_committed`` condition: what the plan evicts there, or
why nothing can be). Exit 0; 1 when the service is not in
the profile or no server answers.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from reconciler.cli.status_cmd import add_url_argument, duration

VERBS = {"adopt": "adopt it", "start": "start it", "restart": "restart it", "stop": "stop it",
         "evict": "evict it", "lease": "grant a lease", "release": "release"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "why", help="why a service is or is not running, in plain words",
        description="Explain, from the plan of a running `reconciler serve`, why SERVICE is or is not running.",
    )
    parser.add_argument("service", metavar="SERVICE")
    add_url_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reconciler.api.client import ApiClient, load_token

    with ApiClient(args.url, load_token(args.token_file)) as client:
        status = client.get("/v1/status")
    lines = explain(status, args.service)
    if lines is None:
        known = ", ".join(s["service"] for s in status.get("services", [])) or "none"
        print(f"reconciler why: {args.service!r} is not in profile {status['profile']!r} (services: {known})",
              file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def explain(status: dict[str, Any], name: str) -> list[str] | None:
    """Sentences about ``name``; None when the profile has no such service."""
    service = next((s for s in status.get("services", []) if s["service"] == name), None)
    if service is None:
        return None
    instance = next((i for i in status.get("instances", []) if i["service"] == name), None)
    plan = status.get("plan") or {}
    actions = [a for a in plan.get("actions", []) if a["service"] == name]
    pending = [p for p in status.get("pending", []) if p["service"] == name]
    demands = [d for d in status.get("demands", []) if d["service"] == name]
    on = set(instance.get("gpus") or [instance["gpu"]]) if instance is not None else set()
    over = [c for c in status.get("conditions", []) if c["type"] == "over_committed" and c.get("gpu") in on]
    lines = [_state(name, service, instance)]
    if service.get("held"):
        lines.append(f"It is held stopped: {service['held']}.")
    backoff = service.get("backoff")
    waiting = backoff is not None and not backoff.get("recovered") and backoff.get("next_try_at")
    for action in actions:
        if waiting and action["kind"] in ("start", "restart"):
            continue  # held back by the backoff: said below, with when
        lines.append(f"The plan will {VERBS.get(action['kind'], action['kind'])}: {action['reason']}.")
    if backoff is not None and not backoff.get("recovered"):
        lines.append(backoff_sentence(name, backoff))
    for item in pending:
        lines.append(f"It waits: {item['reason']}.")
    for demand in demands:
        if not any(p.get("demand") == demand["id"] for p in pending):
            who = f" from {demand['holder']}" if demand["holder"] else ""
            lines.append(f"Lease request {demand['id']}{who} waits: {demand['reason']}.")
    for condition in over:
        lines.append(f"Its {condition['message']}.")
    if not plan:
        lines.append("The reconciler has not planned yet; ask again in a moment.")
    elif not actions and not pending and not demands and not service.get("held") and not (
            backoff is not None and not backoff.get("recovered")):
        lines.append(_settled(service, instance))
    return lines


def backoff_sentence(name: str, backoff: dict[str, Any]) -> str:
    """"Backing off: 3 failures, last error …, next try at … (in 20 s)" — or stalled, said the same way."""
    failures = backoff["failures"]
    head = "Stalled" if backoff.get("stalled") else "Backing off"
    text = f"{head}: {failures} failure{'s' if failures != 1 else ''}"
    if backoff.get("last_error"):
        text += f", last error: {backoff['last_error']}"
    if backoff.get("next_try_at"):
        when = backoff["next_try_at"].replace("T", " ").replace("+00:00", "Z")
        text += f"; next try at {when} (in {duration(backoff.get('next_try_in_s'))})"
    else:
        text += "; it may be tried now"
    return text + f". `reconciler reset {name}` forgets the failures and tries it at once."


def _state(name: str, service: dict[str, Any], instance: dict[str, Any] | None) -> str:
    if instance is None:
        return f"{name} is not running."
    where = f" on GPU {instance['gpu']}" if instance["gpu"] is not None else ""
    origin = "started by the reconciler" if instance["origin"] == "started" else "adopted (never signalled)"
    health = "healthy" if instance["healthy"] else "not healthy"
    model = f", serving {instance['model']}" if instance.get("model") else ""
    up = f", for {duration(instance['uptime_s'])}" if instance.get("uptime_s") is not None else ""
    leases = f"{instance['leases']}/{instance['max_concurrent']} leases held"
    text = f"{name} is {instance['state']} ({health}){where}, {origin}{model}, {leases}{up}."
    if instance.get("last_error"):
        text += f" Last error: {instance['last_error']}."
    return text


def _settled(service: dict[str, Any], instance: dict[str, Any] | None) -> str:
    if instance is not None and instance["state"] == "running":
        if service["always_on"]:
            return "Running, nothing to do: it is always_on."
        if instance["leases"]:
            return "Running, nothing to do: it holds leases."
        return "Running, nothing to do: nothing asks to stop it (not idle long enough, or never idle-stopped)."
    if service["managed"] == "unmanaged":
        return "Nothing to do: it is an unmanaged slot (accounted when leased, never started)."
    return "Nothing to do: nothing wants it (not always_on, no lease, no lease request)."
