"""``reconciler status``: what runs where, who holds what, what waits — from a running server.

    reconciler status [--url URL] [--token-file FILE] [--format text|json] [--cluster]

Reads ``GET /v1/status`` of ``reconciler serve`` (``--url``, else
``$RECONCILER_URL``, else ``http://127.0.0.1:7700``) and prints tables:
GPUs (memory by use), instances, leases (an expired one the next pass
releases says so), the model gateway's traffic per model (when it runs),
pending demands and conditions. ``--cluster`` prints the cluster view instead
(``GET /v1/cluster``, :mod:`reconciler.render.cluster`).
``--format json`` prints the document as it came. A server with a token
needs it: ``--token-file``, else ``$RECONCILER_TOKEN_FILE``, else
``$RECONCILER_TOKEN`` (see :mod:`reconciler.api.client`). Exit 0, or 1 when
no server answers or it refuses (a 401 says how to give the token).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status", help="GPUs, instances, leases and pending demands of a running `reconciler serve`",
        description="Print the status of a running `reconciler serve` (GET /v1/status) as tables.",
    )
    add_url_argument(parser)
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output (default: text)")
    parser.add_argument("--cluster", action="store_true",
                        help="the cluster instead (GET /v1/cluster): every node, its GPUs, what runs where")
    parser.set_defaults(func=run)


def add_url_argument(parser: argparse.ArgumentParser) -> None:
    """``--url`` and ``--token-file``: where the server is, and its token when it has one."""
    parser.add_argument("--url", metavar="URL",
                        help="the server (default: $RECONCILER_URL, else http://127.0.0.1:7700)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="the server's token, when it has one (default: the file $RECONCILER_TOKEN_FILE "
                             "names, else $RECONCILER_TOKEN)")


def run(args: argparse.Namespace) -> int:
    from reconciler.api.client import ApiClient, load_token

    with ApiClient(args.url, load_token(args.token_file)) as client:
        status = client.get("/v1/cluster" if args.cluster else "/v1/status")
    if args.cluster and args.format == "text":
        from reconciler.render.cluster import cluster_text

        print(cluster_text(status))
    elif args.format == "json":
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return 0


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned columns, numbers right-aligned; ``-`` for none."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [any(isinstance(row[i], (int, float)) for row in rows)
               and all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        pairs = enumerate(zip(values, widths, strict=True))
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in pairs).rstrip()

    return "\n".join([line(headers), *(line(r) for r in cells)])


def duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _remaining(lease: dict[str, Any]) -> str | None:
    """How long a lease has left; an expired one (the next pass releases it) says so."""
    if lease.get("state") == "expired":
        return "expired (released on the next pass)"
    return duration(lease["remaining_s"]) if lease["remaining_s"] is not None else "until released"


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def render(status: dict[str, Any]) -> str:
    observed = (status.get("observed_at") or "not yet")[:19].replace("T", " ")
    out = [f"node {status['node']} · profile {status['profile']} · observed {observed}", ""]
    gpus = status.get("gpus") or []
    if gpus:
        out.append(table(
            ["GPU", "NAME", "TOTAL MB", "STARTED", "ADOPTED", "LEASED", "FOREIGN", "FREE"],
            [[g["index"], g["name"], g["total_mb"], g["reserved_started_mb"], g["adopted_mb"], g["leased_mb"],
              g["foreign_mb"], g["free_mb"]] for g in gpus]))
        planned = [f"  GPU {g['index']}: {note}" for g in gpus for note in g.get("held_for") or []]
        if planned:
            out += ["held for planned actions (not yet observed):", *planned]
    else:
        out.append("no GPU")
    out.append("")
    instances = status.get("instances") or []
    if instances:
        out.append(table(
            ["SERVICE", "STATE", "HEALTH", "PID", "PRIO", "MB", "GPU", "ORIGIN", "MODEL", "LEASES", "UPTIME", "URL",
             "LAST ERROR"],
            [[i["service"], i["state"] + (" (stalled)" if i.get("stalled") else ""),
              "ok" if i["healthy"] else "down", i.get("pid"), i.get("priority"), i.get("mb"), i["gpu"], i["origin"],
              i["model"],
              f"{i['leases']}/{i['max_concurrent']}", duration(i.get("uptime_s")), i["url"], i.get("last_error")]
             for i in instances]))
    else:
        out.append("no instances")
    leases = status.get("leases") or []
    if leases:
        out += ["", table(
            ["LEASE", "KIND", "SERVICE", "HOLDER", "GPU", "MB", "MODEL", "REMAINING"],
            [[lease["id"], lease["kind"], lease["service"], lease["holder"] or None, lease["gpu"],
              lease["mb"] if lease["kind"] == "vram" else None, lease["model"],
              _remaining(lease)] for lease in leases])]
    models = status.get("models") or []
    if models:
        out += ["", table(
            ["MODEL", "SERVICE", "REQUESTS", "IN FLIGHT", "QUEUED", "TTFB P50", "TTFB P99", "TOTAL P50", "CAUSED",
             "ERRORS"],
            [[m["model"], m["service"], m["requests"], m["in_flight"], m["queued"], _ms(m.get("ttfb_p50_ms")),
              _ms(m.get("ttfb_p99_ms")), _ms(m.get("total_p50_ms")),
              ", ".join(f"{n} {k}" for k, n in (m.get("caused") or {}).items() if n) or None, m["errors"]]
             for m in models])]
    demands = status.get("demands") or []
    if demands:
        out += ["", table(["DEMAND", "SERVICE", "HOLDER", "WAITED", "REASON"],
                          [[d["id"], d["service"], d["holder"] or None, duration(d.get("waited_s")), d["reason"]]
                           for d in demands])]
    pending = [p for p in status.get("pending") or [] if not p.get("demand")]
    if pending:
        out += ["", "pending:"] + [f"  {p['service']}: {p['reason']}" for p in pending]
    services = status.get("services") or []
    held = [s for s in services if s.get("held")]
    if held:
        out += ["", "held stopped (`reconciler start SERVICE` lets it run):"] + [
            f"  {s['service']}: {s['held']}" for s in held]
    failing = [s for s in services if s.get("backoff") and not s["backoff"].get("recovered")]
    if failing:
        out += ["", table(["FAILING", "FAILURES", "NEXT TRY", "LAST ERROR"], [
            [s["service"] + (" (stalled)" if s["backoff"]["stalled"] else ""), s["backoff"]["failures"],
             (f"{s['backoff']['next_try_at'][11:19]} (in {duration(s['backoff']['next_try_in_s'])})"
              if s["backoff"].get("next_try_at") else "now"), s["backoff"].get("last_error")] for s in failing])]
        out.append("(`reconciler reset SERVICE` forgets the failures and tries it at once)")
    bad = [c for c in status.get("conditions") or [] if not c["ok"] and c["type"] in ("observed", "over_committed")]
    if bad:
        out += ["", "conditions:"] + [f"  {c['type']}{' ' + c['service'] if c.get('service') else ''}: {c['message']}"
                                      for c in bad]
    return "\n".join(out)
