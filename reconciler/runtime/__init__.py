"""The runtime: applies plans to the host, grants leases, and runs the loop (DESIGN §3, §5, §6).

- :mod:`.runtime`   :class:`Runtime` — recover, reconcile (one pass), converge, wake; read between passes
- :mod:`.loop`      :class:`~.loop.Loop` — the daemon loop of ``watch``/``serve``: triggers, edits, signals
- :mod:`.leasing`   :class:`~.leasing.Leasing` — lease requests: warm path, demands, VRAM leases
- :mod:`.restarts`  :func:`~.restarts.request_restart` — an operator's restart (``reconciler restart``)
- :mod:`.ledger`    :class:`~.ledger.Ledger` — lease bookkeeping and the idle-time rule
- :mod:`.assembly`  :class:`~.assembly.Assembly` — lock, store, bus and runtime, put together once
- :mod:`.events`    :class:`EventBus` — the event log, and subscribers to it
- :mod:`.passes`    what waits on passes: the last pass's account, pass and grant signals
- :mod:`.guard`     :func:`check_profile_guard` — refuse a profile that would stop everything
- :mod:`.lifecycle`, :mod:`.actions`, :mod:`.executor`, :mod:`.inventory`, :mod:`.recovery`,
  :mod:`.backoff`, :mod:`.health`, :mod:`.memory`, :mod:`.driverset`, :mod:`.lock` — the parts of a pass
"""

from reconciler.runtime.events import EventBus, Subscription
from reconciler.runtime.guard import check_profile_guard
from reconciler.runtime.runtime import Runtime

__all__ = ["EventBus", "Runtime", "Subscription", "check_profile_guard"]
