"""The JSON plan: exactly DESIGN §4, as :meth:`Plan.to_json_dict` gives it.

Two-space indent, keys in the model's field order (stable from run to run),
non-ASCII kept as UTF-8 (reasons use ``→``), and a trailing newline so the
output is a well-formed text file.
"""

from __future__ import annotations

import json

from reconciler.core.plan import Plan


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_json_dict(), indent=2, ensure_ascii=False) + "\n"
