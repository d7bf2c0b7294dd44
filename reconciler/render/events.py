"""Events as lines: what ``watch`` and ``serve`` print, one event per line.

:func:`format_text` turns an event (``{"id", "ts", "kind", ...data}``, see
:mod:`reconciler.core.events`) into a readable line — or a few, for a
rejected profile and its diagnostics — or None for what text mode leaves
out: ``pass.started`` and the runtime's own ``pass`` (``pass.finished`` sums
them up), passes that found nothing to do, and the implicit leases of the
model gateway's requests, two per request (``reconciler status`` counts
them per model; ``gateway.cold`` says when one caused something).
:class:`Printer` writes either those lines or, in JSON mode, one JSON object
per line; its caller says when to flush (``watch`` flushes at most every
50 ms while events come: one write per burst under load); a pipe reader that went away (``watch | head``) does not
stop the reconciler. :func:`kinds_table` lists every kind for the API's
README.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any, TextIO

from reconciler.core.events import EventKind

_SYMBOLS = {"done": "✓", "failed": "✗", "skipped": "-", "deferred": "…"}
_SILENT = {EventKind.PASS_STARTED, EventKind.PASS}  # the runtime's own "pass" is summed up by pass.finished
_GATEWAY_LEASES = {EventKind.LEASE_GRANTED, EventKind.LEASE_RELEASED}
GATEWAY_HOLDER = "gateway "  # the holder of a gateway request's implicit lease: "gateway 127.0.0.1:53422"


def shown(event: dict[str, Any]) -> bool:
    """False for what text mode surely leaves out, checked cheaply before an event is queued for printing
    (the gateway's two lease events per request, the runtime's own pass events, a quiet pass's end)."""
    kind = event.get("kind")
    if kind in _SILENT or (kind == EventKind.PASS_FINISHED and event.get("quiet")):
        return False  # a quiet pass (every second on a converged host) wakes no printer
    return not (kind in _GATEWAY_LEASES and str(event.get("holder", "")).startswith(GATEWAY_HOLDER))


def format_text(event: dict[str, Any]) -> str | None:
    """One readable line (or a few) for an event; None when text mode leaves it out."""
    kind = event.get("kind", "?")
    ts = str(event.get("ts", ""))[11:19]
    message = event.get("message") or ""
    if kind in _SILENT or (kind == EventKind.PASS_FINISHED and event.get("quiet")):
        return None
    if kind in _GATEWAY_LEASES and str(event.get("holder", "")).startswith(GATEWAY_HOLDER):
        return None
    if kind == EventKind.WATCH_STARTED:
        held = event.get("held") or []
        return (f"{ts} watching {event.get('path')}: profile {event.get('profile')}, GPU {event.get('gpu')}, "
                f"state {event.get('state_dir')}" + (f" ({event['detected']})" if event.get("detected") else "")
                + (f"; held stopped: {', '.join(held)} (`reconciler start --all` lets them run)" if held else ""))
    if kind == EventKind.PROFILE_REJECTED:
        lines = [f"{ts} profile rejected, {event.get('keeping') or 'the last good profile'} stays: {message}"]
        lines += [f"    {d['file']}:{d['line']}:{d['col']}: {d['message']}" for d in event.get("diagnostics", [])]
        return "\n".join(lines)
    if kind == EventKind.PROFILE_HELD:
        return f"{ts} profile held: {message}"
    if kind == EventKind.PROFILE_RELOADED:
        return f"{ts} profile reloaded: {message}" + (f" ({event['detected']})" if event.get("detected") else "")
    if kind == EventKind.ACTION_STARTED:
        return f"{ts}   → {event.get('action')}: {message}"
    if kind == EventKind.ACTION_FINISHED:
        status = event.get("status", "?")
        symbol = _SYMBOLS.get(status, "?")
        return f"{ts}   {symbol} {event.get('action')} {status} in {event.get('duration_s')} s: {message}"
    if kind == EventKind.PASS_FINISHED:
        counts = event.get("outcomes") or {}
        bits = [", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing to do"]
        bits += [f"pending {p['service']}: {p['reason']}" for p in event.get("pending", [])]
        bits += [f"stalled {name}: {why}" for name, why in (event.get("stalled") or {}).items()]
        head = f"{ts} pass {event.get('pass')} ({event.get('reason')}) in {event.get('duration_s')} s: "
        return head + "; ".join(bits)
    if kind in (EventKind.WATCH_STOPPED, EventKind.WATCH_DEGRADED, EventKind.PASS_FAILED):
        return f"{ts} {message}"
    detail = message or " ".join(
        f"{k}={v}" for k, v in event.items() if k not in ("id", "ts", "kind", "service", "message", "action_kind"))
    return f"{ts}     {kind}: {detail}"


class Printer:
    """Writes events to a stream (stdout by default) as text lines or JSON lines.

    Lines wait in the printer's own buffer until a flush, whatever the stream's buffering: with
    ``PYTHONUNBUFFERED=1`` (common in containers, and in the systemd unit we write) every ``write`` of a
    text stream is a system call, which under lease traffic cost two per request."""

    def __init__(self, fmt: str, out: TextIO | None = None):
        self.fmt = fmt
        self._out = out
        self._lines: list[str] = []

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def wants(self, event: dict[str, Any]) -> bool:
        """Whether this printer prints ``event`` at all (every one in JSON mode)."""
        return self.fmt == "json" or shown(event)

    def __call__(self, event: dict[str, Any], *, flush: bool = True) -> None:
        if self.fmt == "json":
            line: str | None = json.dumps(event, default=str, ensure_ascii=False)
        else:
            line = format_text(event)
        if line is not None:
            self._lines.append(line + "\n")
        if flush:
            self.flush()

    def flush(self) -> None:
        text = "".join(self._lines)
        self._lines.clear()
        try:
            if text:
                self.out.write(text)
            self.out.flush()
        except BrokenPipeError:  # `watch | head`: the reader is gone; keep reconciling
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())


PRINT_FLUSH_S = 0.05  # the longest a printed event waits in the buffer


async def print_events(events: AsyncIterator[dict[str, Any]], printer: Printer) -> None:
    """Print each event; flush at most every :data:`PRINT_FLUSH_S` while they come (one write per burst, not
    per line: under lease traffic the flushes cost more than the leases), and once more at the end."""
    loop = asyncio.get_running_loop()
    flushing: asyncio.TimerHandle | None = None

    def flush() -> None:
        nonlocal flushing
        flushing = None
        printer.flush()

    try:
        async for event in events:
            printer(event, flush=False)
            if flushing is None:
                flushing = loop.call_later(PRINT_FLUSH_S, flush)
    finally:
        if flushing is not None:
            flushing.cancel()
        printer.flush()


def kinds_table() -> str:
    """Every event kind with what it says, as a Markdown table (``reconciler/api/README.md`` holds it)."""
    rows = ["| kind | what it says |", "|---|---|"]
    rows += [f"| `{kind.value}` | {kind.doc} |" for kind in EventKind]
    return "\n".join(rows) + "\n"
