"""Pulling the model a lease asks for into an Ollama that has not got it (``pull: true``).

Without ``pull``, a lease (or a gateway request) for a model an Ollama has
not pulled is refused at once, with the installed models in the reason: a
request that Ollama itself would answer 404 should not wait for minutes.
With ``pull: true`` on the service, the planner lets the demand wait instead
("is pulling model …", :mod:`reconciler.core.granting`), and this module does
the pulling, between passes, since a pull can take minutes and a pass must
not:

* After each plan, :meth:`Pulls.after_plan` looks at the demands the plan
  keeps waiting for an Ollama with ``pull: true`` whose last probe answered
  (so its installed models are known) and lacks the model, and starts one
  ``POST /api/pull`` per (service, model) — two demands for one model share
  it. Pulls of different models run side by side, as Ollama allows.
* Progress goes out as ``ollama.pull`` events: ``started``, ``done`` and
  ``failed`` are recorded; the progress lines in between (each new status,
  and every 10 % of a download) are only shown, so a 40 GB pull does not
  fill the event log.
* When a pull ends the loop is woken: the next pass probes the Ollama again,
  finds the model installed and grants the lease — the request that asked
  for it was waiting all along, up to its ``wait_s``. A model pulled is not
  pulled again while the demands for it wait for that probe (a pass that
  observed just before the pull ended would otherwise start a second one).
* A pull that failed (a name the registry does not know, no network) makes
  the demands for that model final: their lease requests are answered at
  once with the error, not after their wait. The failure is forgotten once
  no demand asks for that model any more, so a later request tries again.

Only the reason of a waiting demand is changed here, never what the plan
does. The pulls belong to the runtime that started them: :meth:`aclose`
cancels those still running (Ollama then stops the download itself).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from reconciler.core.compatibility import ollama_has
from reconciler.core.events import EventKind
from reconciler.core.plan import Plan
from reconciler.core.profile import Profile, Service, is_ollama
from reconciler.core.snapshot import Snapshot
from reconciler.errors import DriverError
from reconciler.host.ollama_api import OllamaApi
from reconciler.runtime.events import EventBus

Key = tuple[str, str]  # (service, model as the demand names it)


def ollama_api(spec: Service) -> OllamaApi:
    """The API of the Ollama a service runs, where this host reaches it."""
    assert spec.probe_port is not None
    return OllamaApi(spec.probe_port, host=spec.url_host, timeout_s=10.0)


class Pulls:
    """The pulls in progress and the ones that failed (see the module docstring)."""

    def __init__(self, events: EventBus, wake: Callable[[], None], monotonic: Callable[[], float],
                 api_for: Callable[[Service], OllamaApi] = ollama_api):
        self.events = events
        self.monotonic = monotonic
        self.wake = wake
        self.api_for = api_for
        self.running: dict[Key, asyncio.Task[None]] = {}
        self.failed: dict[Key, str] = {}
        self.pulled: set[Key] = set()  # done, waiting for a probe to list it (a pass may have observed before)

    def after_plan(self, profile: Profile, snapshot: Snapshot, plan: Plan) -> Plan:
        """Start the pulls ``plan``'s waiting demands need; the plan, with a failed pull's demands made final."""
        demands = {d.id: d for d in snapshot.demands}
        wanted: set[Key] = set()
        pending = []
        for item in plan.pending:
            demand = demands.get(item.demand or "")
            spec = profile.services.get(demand.service) if demand is not None else None
            probe = snapshot.probes.get(demand.service) if demand is not None else None
            installed = probe.models if probe is not None and probe.healthy else None
            if (demand is None or spec is None or not spec.pull or not is_ollama(spec) or demand.model is None
                    or spec.probe_port is None or installed is None or ollama_has(installed, demand.model)):
                pending.append(item)
                continue
            key = (demand.service, demand.model)
            wanted.add(key)
            if key in self.failed:
                reason = (f"demand {demand.id}: {demand.service} could not pull model {demand.model}: "
                          f"{self.failed[key]} (installed: {', '.join(installed) or 'none'})")
                pending.append(item.model_copy(update={"reason": reason, "final": True}))
                continue
            if key not in self.running and key not in self.pulled:
                self.running[key] = asyncio.ensure_future(self._pull(key, spec))
            pending.append(item)
        for key in set(self.failed) - wanted:  # nobody asks any more: the next request tries again
            del self.failed[key]
        self.pulled &= wanted  # listed as installed now, or nobody asks
        return plan.model_copy(update={"pending": pending}) if self.failed else plan

    async def _pull(self, key: Key, spec: Service) -> None:
        service, model = key
        began = self.monotonic()
        self.events.publish(EventKind.OLLAMA_PULL, service=service, model=model, status="started",
                            message=f"{service}: pulling model {model} (pull: true) for a lease that asks for it")
        shown: dict[str, Any] = {"status": None, "tenth": -1}

        def progress(line: dict[str, Any]) -> None:
            status = str(line.get("status") or "")
            total, completed = line.get("total"), line.get("completed")
            percent = None
            if isinstance(total, int) and isinstance(completed, int) and total > 0:
                percent = min(100, completed * 100 // total)
            tenth = percent // 10 if percent is not None else -1
            if status == shown["status"] and tenth <= shown["tenth"]:
                return
            shown.update(status=status, tenth=tenth)
            words = f"{status} {percent} %" if percent is not None else status
            self.events.announce(EventKind.OLLAMA_PULL, service=service, model=model, status="progress",
                                 progress=status, percent=percent, message=f"{service}: pulling {model}: {words}")

        try:
            async with self.api_for(spec) as api:
                await api.pull(model, progress)
        except DriverError as exc:
            self.failed[key] = str(exc)
            self.events.publish(EventKind.OLLAMA_PULL, service=service, model=model, status="failed",
                                error=str(exc), message=f"{service}: pulling model {model} failed: {exc}")
        else:
            self.pulled.add(key)
            took = self.monotonic() - began
            self.events.publish(EventKind.OLLAMA_PULL, service=service, model=model, status="done",
                                duration_s=round(took, 1),
                                message=f"{service}: pulled model {model} in {took:.1f} s")
        finally:
            self.running.pop(key, None)
            self.wake()

    async def aclose(self) -> None:
        """Cancel the pulls still running."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
