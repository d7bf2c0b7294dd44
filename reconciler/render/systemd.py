"""A systemd unit for ``reconciler serve``: what ``reconciler install-service`` writes.

The unit runs the reconciler as a long-lived service:

* ``Type=notify`` — the reconciler says ``READY=1`` once its API listens and
  it has found its instances again, so ``systemctl start`` returns when it
  really serves, and ``STATUS=`` lines show in ``systemctl status``;
* ``Restart=on-failure`` — a crash is restarted after ``RestartSec``; the
  reconciler finds its instances again (invariant 5);
* ``KillMode=process`` — stopping or restarting the *reconciler* signals only
  its own process, never the GPU services it started (they run in the unit's
  cgroup, but in sessions of their own). A reconciler upgrade or restart thus
  never interrupts a model that is serving; ``reconciler down`` is how to stop
  them. (The default, ``control-group``, would SIGTERM every model server
  with the reconciler — and a ``Restart=`` would then start them all again.)
* the state directory: ``StateDirectory=reconciler`` (``/var/lib/reconciler``
  for a system unit) unless one is given; a user unit keeps the reconciler's
  own default (``~/.local/state/reconciler``).

:func:`unit_text` is pure: given the command line and the options, the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class UnitOptions:
    """What goes into the unit besides the command."""

    description: str
    user_unit: bool
    state_directory: bool  # a system unit whose state lives in /var/lib/reconciler
    environment: dict[str, str]
    env_file: str | None = None  # NAME=value lines the profile's ${NAME}s read (kept out of the unit)
    restart_sec: float = 5.0


def unit_text(argv: Sequence[str], options: UnitOptions) -> str:
    """The unit file for ``argv`` (an absolute ``reconciler serve …`` command line)."""
    command = " ".join(_quote(a) for a in argv)
    lines = [
        "# Written by `reconciler install-service`; edit it there and install again, or override with",
        "# `systemctl edit`. KillMode=process: restarting the reconciler never stops the GPU services",
        "# it runs (`reconciler down` does that).",
        "[Unit]",
        f"Description={options.description}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={command}",
        "Restart=on-failure",
        f"RestartSec={options.restart_sec:g}",
        "KillMode=process",
        "TimeoutStopSec=30",
    ]
    if options.state_directory:
        lines.append("StateDirectory=reconciler")
    if options.env_file:
        lines.append(f"EnvironmentFile={_quote(options.env_file)}")
    for key, value in sorted(options.environment.items()):
        lines.append(f"Environment={_quote(f'{key}={value}')}")
    lines += ["", "[Install]", f"WantedBy={'default.target' if options.user_unit else 'multi-user.target'}", ""]
    return "\n".join(lines)


def _quote(word: str) -> str:
    """A word as systemd reads it in ``ExecStart=``/``Environment=``: ``%`` and ``$`` escaped, quoted if needed."""
    escaped = word.replace("%", "%%").replace("$", "$$")
    if escaped and all(c.isalnum() or c in "/._-:=,@+%$" for c in escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
