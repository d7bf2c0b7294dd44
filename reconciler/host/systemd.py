"""Telling systemd how the service is doing: the ``sd_notify`` protocol, without libsystemd.

A unit with ``Type=notify`` (what ``reconciler install-service`` writes)
starts the reconciler with ``NOTIFY_SOCKET`` naming a Unix datagram socket;
the service sends newline-separated ``KEY=value`` assignments to it:
``READY=1`` once it serves (systemd then considers the start done, and
``systemctl start`` returns), ``STATUS=…`` a one-line state that ``systemctl
status`` shows, ``STOPPING=1`` when it begins to stop. A name starting with
``@`` is in the abstract namespace. Without ``NOTIFY_SOCKET`` (not started by
systemd) :func:`notify` does nothing; a failing send is ignored — being
supervised must never break the service.
"""

from __future__ import annotations

import os
import socket

NOTIFY_ENV = "NOTIFY_SOCKET"


def notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` to systemd's notification socket; True when it was sent."""
    path = (os.environ if environ is None else environ).get(NOTIFY_ENV)
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True
