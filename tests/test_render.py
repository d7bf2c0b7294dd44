"""Plan renderers: text (Terraform-style), JSON (DESIGN §4) and markdown."""

from __future__ import annotations

import io
import json
import re

import jsonschema
import pytest

from reconciler.core.plan import ACTION_KINDS, Action, GpuSummary, Pending, Plan
from reconciler.render import FORMATS, render, render_json, render_markdown, render_text, want_color
from reconciler.render.common import PENDING_SYMBOL, SYMBOLS
from reconciler.render.text import NO_CHANGES

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# DESIGN §4, as a JSON Schema: what `--format json` promises.
PLAN_SHAPE = {
    "type": "object",
    "required": ["format_version", "node", "profile", "changes", "actions", "pending", "gpus", "summary"],
    "additionalProperties": False,
    "properties": {
        "format_version": {"const": 1},
        "node": {"type": "string"},
        "profile": {"type": "string"},
        "changes": {"type": "boolean"},
        "actions": {"type": "array", "items": {
            "type": "object",
            "required": ["id", "kind", "service", "gpu", "requires", "reason"],
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"}, "kind": {"enum": list(ACTION_KINDS)}, "service": {"type": "string"},
                "gpu": {"type": ["integer", "null"]}, "mb": {"type": "integer"}, "lease": {"type": "string"},
                "model": {"type": "string"}, "requires": {"type": "array", "items": {"type": "string"}},
                "reason": {"type": "string", "minLength": 1},
            },
        }},
        "pending": {"type": "array", "items": {
            "type": "object", "required": ["service", "reason"], "additionalProperties": False,
            "properties": {"service": {"type": "string"}, "demand": {"type": "string"}, "reason": {"type": "string"}},
        }},
        "gpus": {"type": "array", "items": {
            "type": "object", "required": ["index", "total_mb", "free_mb", "free_mb_after"],
            "additionalProperties": False,
            "properties": {k: {"type": "integer"} for k in ("index", "total_mb", "free_mb", "free_mb_after")},
        }},
        "summary": {"type": "object", "required": list(ACTION_KINDS), "additionalProperties": False,
                    "properties": {k: {"type": "integer", "minimum": 0} for k in ACTION_KINDS}},
    },
}


def summary(actions: list[Action]) -> dict[str, int]:
    return {kind: sum(a.kind == kind for a in actions) for kind in ACTION_KINDS}


def design_example() -> Plan:
    """The plan of DESIGN §4, plus a pending demand."""
    actions = [
        Action(id="evict:comfyui", kind="evict", service="comfyui", gpu=0, mb=6144,
               reason="frees 6144 MB on GPU 0 for vllm (priority 1); comfyui has priority 4"),
        Action(id="start:vllm", kind="start", service="vllm", gpu=0, mb=6500, model="qwen2.5-3b",
               requires=["evict:comfyui"], reason="wanted (demand D1); starting on GPU 0"),
        Action(id="lease:D1", kind="lease", service="vllm", gpu=0, lease="D1", requires=["start:vllm"],
               reason="grant demand D1 from kiwi: once start:vllm is done, 1/1 leases held"),
    ]
    return Plan(node="local", profile="single-gpu-8gb", changes=True, actions=actions,
                pending=[Pending(service="vllm", demand="D2", reason="demand D2 waits: 1/1 leases held")],
                gpus=[GpuSummary(index=0, total_mb=8192, free_mb=1948, free_mb_after=1592)],
                summary=summary(actions))


def converged() -> Plan:
    return Plan(node="local", profile="cpu", changes=False, actions=[], pending=[],
                gpus=[GpuSummary(index=0, total_mb=8192, free_mb=7168, free_mb_after=7168)], summary=summary([]))


def every_kind() -> Plan:
    actions = [Action(id=f"{kind}:svc{i}", kind=kind, service=f"svc{i}", gpu=None, reason=f"because {kind}")
               for i, kind in enumerate(ACTION_KINDS)]
    return Plan(node="n", profile="p", changes=True, actions=actions, pending=[], gpus=[], summary=summary(actions))


# --- text ----------------------------------------------------------------------


def test_text_plan_lists_actions_in_order_with_symbols_reasons_and_requires():
    text = render_text(design_example())
    lines = text.splitlines()
    assert lines[0] == "Plan for profile single-gpu-8gb on node local"
    actions = [line for line in lines if line.startswith("  ") and line.strip()[:1] in SYMBOLS.values()]
    assert [line.split()[0] for line in actions] == ["!", "+", ">"]
    assert "evict:comfyui" in actions[0] and "6144 MB" in actions[0] and "comfyui has priority 4" in actions[0]
    assert "start:vllm (model qwen2.5-3b)" in actions[1] and actions[1].endswith("[after: evict:comfyui]")
    assert "lease:D1 (vllm)" in actions[2] and "[after: start:vllm]" in actions[2]


def test_text_plan_has_pending_gpu_lines_and_a_summary():
    text = render_text(design_example())
    assert "Pending:\n  ? vllm (demand D2): demand D2 waits: 1/1 leases held\n" in text
    assert "  GPU 0: 8192 MB total, 1948 free → 1592 free after\n" in text
    assert text.endswith(
        "Plan: 0 to adopt, 1 to start, 0 to restart, 0 to stop, 1 to evict, 1 lease to grant, 0 to release; "
        "1 pending.\n")


def test_text_plan_of_a_converged_host_says_no_changes():
    text = render_text(converged())
    assert text.endswith(NO_CHANGES + "\n")
    assert "Plan:" not in text and "Symbols" not in text and "Actions" not in text


def test_pending_without_actions_is_not_no_changes():
    plan = converged().model_copy(update={"pending": [Pending(service="embed", reason="port 8100 is held")]})
    text = render_text(plan)
    assert NO_CHANGES not in text
    assert "? embed: port 8100 is held" in text and text.endswith("; 1 pending.\n")


def test_every_kind_has_its_own_symbol_and_a_legend():
    assert set(SYMBOLS) == set(ACTION_KINDS)
    assert len(set(SYMBOLS.values()) | {PENDING_SYMBOL}) == len(ACTION_KINDS) + 1
    text = render_text(every_kind())
    legend = next(line for line in text.splitlines() if line.startswith("Symbols: "))
    for kind in ACTION_KINDS:
        assert f"{SYMBOLS[kind]} {kind}" in legend
        assert f"  {SYMBOLS[kind]} {kind}:" in text
    assert "GPUs:\n  none (CPU only)\n" in text


def test_text_is_coloured_only_when_asked():
    plain, coloured = render_text(design_example()), render_text(design_example(), color=True)
    assert not ANSI.search(plain)
    assert ANSI.search(coloured)
    assert ANSI.sub("", coloured) == plain


@pytest.mark.parametrize(
    ("mode", "tty", "environ", "expected"),
    [
        ("auto", False, {}, False),
        ("auto", True, {}, True),
        ("auto", True, {"NO_COLOR": "1"}, False),
        ("auto", True, {"NO_COLOR": ""}, True),  # no-color.org: set *and non-empty*
        ("always", False, {"NO_COLOR": "1"}, True),
        ("never", True, {}, False),
    ],
)
def test_want_color(mode, tty, environ, expected):
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert want_color(mode, Stream(), environ) is expected


# --- json ----------------------------------------------------------------------


@pytest.mark.parametrize("plan", [design_example(), converged(), every_kind()], ids=["design", "converged", "kinds"])
def test_json_is_design_section_4(plan):
    text = render_json(plan)
    assert text.endswith("}\n") and not text.endswith("\n\n")
    data = json.loads(text)
    jsonschema.validate(data, PLAN_SHAPE)
    assert data == plan.to_json_dict()
    assert text == json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def test_json_key_order_is_stable():
    data = json.loads(render_json(design_example()))
    assert list(data) == ["format_version", "node", "profile", "changes", "actions", "pending", "gpus", "summary"]
    assert list(data["actions"][0]) == ["id", "kind", "service", "gpu", "mb", "requires", "reason"]
    assert list(data["summary"]) == list(ACTION_KINDS)


# --- markdown ------------------------------------------------------------------


def test_markdown_has_a_summary_heading_an_action_table_pending_and_gpus():
    md = render_markdown(design_example())
    lines = md.splitlines()
    assert lines[0] == "### reconciler plan: 1 to start, 1 to evict, 1 lease to grant; 1 pending"
    assert "| | Action | Kind | Service | GPU | MB | After | Reason |" in lines
    row = next(line for line in lines if "`start:vllm`" in line)
    assert row.startswith("| + | `start:vllm` | start | `vllm` | 0 | 6500 | `evict:comfyui` |")
    assert "- ? **vllm (demand D2)**: demand D2 waits: 1/1 leases held" in lines
    assert "| 0 | 8192 | 1948 | 1592 |" in lines


def test_markdown_escapes_table_cells():
    plan = every_kind()
    odd = plan.actions[0].model_copy(update={"reason": "a | b\nc"})
    md = render_markdown(plan.model_copy(update={"actions": [odd, *plan.actions[1:]]}))
    row = next(line for line in md.splitlines() if "`adopt:svc0`" in line)
    assert row.endswith("| a \\| b c |")
    assert "No GPUs (CPU only)." in md


def test_markdown_of_a_converged_host():
    md = render_markdown(converged())
    assert md.startswith("### reconciler plan: no changes\n")
    assert "| Action |" not in md and "| 0 | 8192 | 7168 | 7168 |" in md


def test_render_dispatches_and_refuses_unknown_formats():
    plan = design_example()
    assert [render(plan, f) for f in FORMATS] == [render_text(plan), render_json(plan), render_markdown(plan)]
    assert render(plan, "json", color=True) == render_json(plan)  # only text is ever coloured
    with pytest.raises(ValueError, match="unknown plan format"):
        render(plan, "yaml")
