"""``reconciler plan --cluster``: the cluster part of the plan, after the node's own plan.

Works on the document of :meth:`reconciler.cluster.whatif.ClusterPlan.to_json_dict` (the
renderers sit below the cluster layer, so they read its JSON, which is also what
``--format json`` prints). Text::

    Across cluster lab (node gpu1):
      - no longer offered here: embed (no longer in the profile)
      + placeable here: tts (it would start here without eviction (6144 MB free))
      < lease 5f0c… (embed, holder kiwi) ends: lease 5f0c…: service 'embed' is no longer in the profile
          → a new request goes to gpu2 (warm)
      ~ embed: gpu1 (warm) → gpu2 (warm)

    Cluster: 1 service withdrawn, 1 offered, 1 lease or placement ended, 1 placement changed.

or "No changes across the cluster." A lease that no node could take says why each
node refuses. Markdown is the same content as a list under a heading, for a
pull-request comment below the local plan's.
"""

from __future__ import annotations

from typing import Any


def _choice(choice: dict[str, str] | None) -> str:
    return "no node" if choice is None else f"{choice['node']} ({choice['tier']})"


def _lines(doc: dict[str, Any]) -> list[str]:
    lines = [f"- no longer offered here: {o['service']} ({o['reason']})" for o in doc["withdrawn"]]
    lines += [f"+ placeable here: {o['service']} ({o['reason']})" for o in doc["offered"]]
    for ended in doc["ended"]:
        role = "holder" if ended["kind"] == "lease" else "placed by"
        who = f", {role} {ended['holder']}" if ended.get("holder") else ""
        lines.append(f"< {ended['kind']} {ended['id']} ({ended['service']}{who}) ends: {ended['why']}")
        if ended["to"] is not None:
            lines.append(f"    → a new request goes to {ended['to']} ({ended['tier']})")
        else:
            lines.append("    → no node could take it: " + ("; ".join(ended["refusals"])
                                                          or f"no other node has {ended['service']} in its profile"))
    lines += [f"~ placement of {w['service']}: {_choice(w['before'])} → {_choice(w['after'])}"
              for w in doc["placement"] if w["changed"]]
    return lines


def summary(doc: dict[str, Any]) -> str:
    changed = sum(1 for w in doc["placement"] if w["changed"])
    if not (doc["withdrawn"] or doc["offered"] or doc["ended"] or changed):
        return "No changes across the cluster."
    return (f"Cluster: {len(doc['withdrawn'])} service(s) withdrawn, {len(doc['offered'])} offered, "
            f"{len(doc['ended'])} lease(s) or placement(s) ended, {changed} placement(s) changed.")


def cluster_text(doc: dict[str, Any]) -> str:
    """The cluster section, as text (ends with a newline)."""
    head = f"Across cluster {doc['cluster']} (node {doc['node']}):"
    body = [f"  {line}" for line in _lines(doc)]
    return "\n".join([head, *body, "", summary(doc)]) + "\n"


def cluster_markdown(doc: dict[str, Any]) -> str:
    """The cluster section, for a pull-request comment (ends with a newline)."""
    lines = [f"#### Across cluster `{doc['cluster']}` (node `{doc['node']}`)", ""]
    lines += [f"- `{line[0]}` {line[2:].strip()}" if not line.startswith("    ") else f"  {line.strip()}"
              for line in _lines(doc)]
    return "\n".join([*lines, "", summary(doc)]) + "\n"
