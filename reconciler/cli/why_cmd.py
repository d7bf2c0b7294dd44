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
    stalled = [c for c in status.get("conditions", []) if c["type"] == "stalled" and c.get("service") == name]
    on = set(instance.get("gpus") or [instance["gpu"]]) if instance is not None else set()
    over = [c for c in status.get("conditions", []) if c["type"] == "over_committed" and c.get("gpu") in on]
    lines = [_state(name, service, instance)]
    for action in actions:
        lines.append(f"The plan will {VERBS.get(action['kind'], action['kind'])}: {action['reason']}.")
    for item in pending:
        lines.append(f"It waits: {item['reason']}.")
    for demand in demands:
        if not any(p.get("demand") == demand["id"] for p in pending):
            who = f" from {demand['holder']}" if demand["holder"] else ""
            lines.append(f"Lease request {demand['id']}{who} waits: {demand['reason']}.")
    for condition in stalled:
        lines.append(f"It is backing off after repeated failures: {condition['message']}.")
    for condition in over:
        lines.append(f"Its {condition['message']}.")
    if not plan:
        lines.append("The reconciler has not planned yet; ask again in a moment.")
    elif not actions and not pending and not demands:
        lines.append(_settled(service, instance))
    return lines


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
