"""The executor: runs a plan's ``requires`` DAG with asyncio.

Every action gets its own task, all created up front. A task first waits for
the actions it requires; if any of them did not end ``done``, it is
``skipped`` (never tried) and says which requirement stopped it — so a
failure skips everything that transitively requires it. Independent actions
run in parallel. Each action runs under its own timeout; an exception or a
timeout is a ``failed`` outcome with the reason, never an escape from the
pass. (Only non-``Exception`` errors — a crash — propagate.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

from reconciler.core.plan import Action
from reconciler.core.report import Outcome
from reconciler.errors import ReconcilerError

Handler = Callable[[Action], Awaitable[str]]
Hook = Callable[[Action, Outcome | None], None]


class Executor:
    """Runs actions with ``handler`` (returns a detail line, raises on failure)."""

    def __init__(
        self,
        handler: Handler,
        *,
        timeout_for: Callable[[Action], float | None] = lambda action: None,
        on_start: Hook | None = None,
        on_finish: Hook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.handler = handler
        self.timeout_for = timeout_for
        self.on_start = on_start
        self.on_finish = on_finish
        self.clock = clock

    async def run(self, actions: Iterable[Action]) -> dict[str, Outcome]:
        actions = list(actions)
        tasks: dict[str, asyncio.Task[Outcome]] = {}
        for action in actions:
            tasks[action.id] = asyncio.ensure_future(self._run_one(action, tasks))
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise
        return {action_id: task.result() for action_id, task in tasks.items()}

    async def _run_one(self, action: Action, tasks: dict[str, asyncio.Task[Outcome]]) -> Outcome:
        for required in action.requires:
            task = tasks.get(required)
            if task is None:
                continue  # not in this plan (the planner only names actions it emitted)
            outcome = await asyncio.shield(task)
            if not outcome.ok:
                how = "failed" if outcome.status == "failed" else f"was {outcome.status}"
                detail = f"requires {required}, which {how}"
                if outcome.status == "failed" and outcome.detail:
                    detail += f": {outcome.detail}"
                return self._finish(action, Outcome("skipped", detail, 0.0), started=False)
        if self.on_start:
            self.on_start(action, None)
        began = self.clock()
        timeout = self.timeout_for(action)
        try:
            detail = await asyncio.wait_for(self.handler(action), timeout)
            outcome = Outcome("done", detail or "", self.clock() - began)
        except TimeoutError:
            outcome = Outcome("failed", f"timed out after {timeout:g} s", self.clock() - began)
        except Deferred as exc:
            outcome = Outcome("deferred", str(exc), self.clock() - began)
        except ReconcilerError as exc:
            outcome = Outcome("failed", str(exc), self.clock() - began)
        except Exception as exc:  # a bug or an unexpected host error: report it, keep the pass going
            outcome = Outcome("failed", f"{type(exc).__name__}: {exc}", self.clock() - began)
        return self._finish(action, outcome, started=True)

    def _finish(self, action: Action, outcome: Outcome, *, started: bool) -> Outcome:
        if self.on_finish:
            self.on_finish(action, outcome)
        return outcome


class Deferred(Exception):
    """Raised by a handler that left its action for a later pass (the message says why)."""
