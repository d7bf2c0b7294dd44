"""``reconciler status --cluster``: the cluster view (``GET /v1/cluster``) as text.

One line per node (alive, its advertised API, each GPU as reserved/total MB, what
runs there, how many leases it holds), then where each service runs. A node this
server cannot see in etcd (itself, cut off) shows as not alive.
"""

from __future__ import annotations

from typing import Any


def cluster_text(doc: dict[str, Any]) -> str:
    rows = [["NODE", "ALIVE", "URL", "GPUS (reserved/total MB)", "RUNNING", "LEASES"]]
    for node in doc.get("nodes", []):
        gpus = ", ".join(f"{g['index']}: {g['reserved_mb']}/{g['total_mb']}" for g in node.get("gpus", [])) or "-"
        rows.append([node["node"], "yes" if node.get("alive") else "no", node.get("url") or "-", gpus,
                     ", ".join(node.get("running", [])) or "-", str(node.get("leases", 0))])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"cluster {doc.get('cluster')} (seen from node {doc.get('node')}, etcd revision {doc.get('revision')})",
             ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += ["", "services:"]
    services = doc.get("services", {})
    lines += [f"  {name}: {', '.join(nodes)}" for name, nodes in sorted(services.items())] or ["  none running"]
    return "\n".join(lines)
