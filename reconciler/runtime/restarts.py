"""An operator's restart (issue 8.12): ``reconciler restart SERVICE [--now]``.

An edit that changes a *busy* instance's launch spec does not cut its
clients off: the restart waits until its leases end, with a pending reason
that says how to have it now. This is how: the request is written on the
instance in the inventory (``restart: when_idle | now``, DESIGN §2's
``instances[]``) and the loop is woken; the planner does the rest, as for
any restart — at once when the instance is idle or ``now`` was asked (its
leases are kept for the restarted instance, whose holders reconnect),
otherwise once its leases end, new requests waiting for the restarted one
meanwhile. ``when_idle`` on an idle instance restarts it at once: an
operator can also ask for a restart whose launch spec did not change (a
wedged server).

Only an instance we started can be restarted: an adopted one is never
signalled (409), a service with nothing running has nothing to restart
(409: a lease starts it), a service not in the profile is a 404. The
request is written between passes (the runtime's exclusive lock, as a
lease grant is), so no pass in flight overwrites it; if a pass keeps the
lock longer than :data:`WAIT_S`, the answer is 503 — ask again. A newer
request replaces an older one; the restarted instance carries none.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from reconciler.core.profile import Profile
from reconciler.core.snapshot import Instance
from reconciler.errors import RestartRefused
from reconciler.runtime.runtime import Runtime

WAIT_S = 10.0  # most a request waits for a pass in flight to finish

Mode = Literal["when_idle", "now"]


async def request_restart(runtime: Runtime, profile: Profile, service: str, mode: Mode) -> Instance:
    """Record ``mode`` on ``service``'s instance and wake the loop; returns the instance as recorded."""
    if service not in profile.services:
        known = ", ".join(sorted(profile.services)) or "none"
        raise RestartRefused(404, f"no service {service!r} in profile {profile.name!r} (services: {known})")
    try:
        await asyncio.wait_for(runtime.exclusive().acquire(), WAIT_S)
    except TimeoutError:
        raise RestartRefused(503, f"the reconciler is busy with a pass for more than {WAIT_S:g} s; "
                                  "ask again in a moment") from None
    try:
        instance = runtime.store.get_instance(service)
        if instance is None or instance.state in ("stopping", "failed"):
            raise RestartRefused(409, f"{service} is not running: there is nothing to restart (a lease "
                                      "starts it)")
        if instance.origin != "started":
            raise RestartRefused(409, f"{service} is adopted: the reconciler never signals a process it did "
                                      "not start; restart it the way it was started")
        recorded = instance.model_copy(update={"restart": mode})
        runtime.store.put_instance(recorded)
    finally:
        runtime.exclusive().release()
    runtime.wake()
    return recorded

