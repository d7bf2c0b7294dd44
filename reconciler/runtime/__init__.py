"""The runtime: applies plans to the host and remembers what it did (DESIGN §3, §5, §6).

- :mod:`.runtime`   :class:`Runtime` — recover, reconcile (one pass), converge, wake
- :mod:`.report`    :class:`PassReport`, :class:`Outcome` — what a pass did
- :mod:`.events`    :class:`EventBus` — the event log, and subscribers to it
- :mod:`.guard`     :func:`check_profile_guard` — refuse a profile that would stop everything
"""

from reconciler.runtime.events import EventBus, Subscription
from reconciler.runtime.guard import check_profile_guard
from reconciler.runtime.report import Outcome, PassReport
from reconciler.runtime.runtime import Runtime

__all__ = ["EventBus", "Outcome", "PassReport", "Runtime", "Subscription", "check_profile_guard"]
