"""Plan renderers: one module per output format (DESIGN §4).

* :mod:`.text` — the Terraform-style plan for a terminal (optionally coloured);
* :mod:`.json_format` — exactly :meth:`Plan.to_json_dict`, for machines;
* :mod:`.markdown` — a pull-request comment.

Every renderer is a pure function ``Plan → str`` ending in a newline; choosing
colour (TTY, ``NO_COLOR``) is the caller's business, see :func:`want_color`.

The renderers are imported when first used: the command line's parser reads
:data:`FORMATS` here without paying for the models behind them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from reconciler.core.plan import Plan
    from reconciler.render.json_format import render_json
    from reconciler.render.markdown import render_markdown
    from reconciler.render.text import render_text

FORMATS = ("text", "json", "markdown")
COLOR_MODES = ("auto", "always", "never")


def render(plan: Plan, fmt: str = "text", *, color: bool = False) -> str:
    """The plan in ``fmt`` (one of :data:`FORMATS`); only ``text`` is ever coloured."""
    if fmt == "text":
        from reconciler.render.text import render_text

        return render_text(plan, color=color)
    if fmt == "json":
        from reconciler.render.json_format import render_json

        return render_json(plan)
    if fmt == "markdown":
        from reconciler.render.markdown import render_markdown

        return render_markdown(plan)
    raise ValueError(f"unknown plan format {fmt!r}; expected one of {', '.join(FORMATS)}")


def want_color(mode: str, stream: TextIO, environ: Mapping[str, str]) -> bool:
    """``always``/``never`` as said; ``auto``: only on a TTY and when ``NO_COLOR`` is unset or empty."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


_LAZY = {"render_json": "json_format", "render_markdown": "markdown", "render_text": "text"}


def __getattr__(name: str) -> Any:
    """``render_json``, ``render_markdown``, ``render_text``: imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"reconciler.render.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'reconciler.render' has no attribute {name!r}")


__all__ = ["COLOR_MODES", "FORMATS", "render", "render_json", "render_markdown", "render_text", "want_color"]
