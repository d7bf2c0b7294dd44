"""The executor: the requires DAG, parallelism, failures skip dependents, timeouts; on a fake clock."""

from __future__ import annotations

import asyncio

from reconciler.core.plan import Action
from reconciler.errors import DriverError
from reconciler.runtime.executor import Deferred, Executor


def action(id_: str, *requires: str) -> Action:
    kind, service = id_.split(":")
    return Action(id=id_, kind=kind, service=service, requires=list(requires), reason="test")


class Script:
    """A handler that records the order of events and obeys per-action scripts."""

    def __init__(self, **behaviour):
        self.behaviour = behaviour
        self.log: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}

    async def __call__(self, a: Action) -> str:
        self.log.append(f"begin {a.id}")
        what = self.behaviour.get(a.id.replace(":", "_"))
        if what == "fail":
            raise DriverError(f"{a.id} broke")
        if what == "crash":
            raise ValueError("unexpected")
        if what == "defer":
            raise Deferred("later")
        if what == "hang":
            await asyncio.Event().wait()
        if what == "gate":
            self.gates.setdefault(a.id, asyncio.Event())
            await self.gates[a.id].wait()
        await asyncio.sleep(0)
        self.log.append(f"end {a.id}")
        return f"{a.id} ok"


def run(executor: Executor, actions):
    return asyncio.run(executor.run(actions))


def test_dependencies_run_first_and_independent_actions_overlap():
    script = Script()
    outcomes = run(Executor(script), [action("start:a"), action("start:b"), action("start:c", "start:a", "start:b")])
    assert {k: o.status for k, o in outcomes.items()} == {"start:a": "done", "start:b": "done", "start:c": "done"}
    # a and b both began before either ended: they ran in parallel; c began only after both ended
    assert script.log[:2] == ["begin start:a", "begin start:b"]
    assert script.log.index("begin start:c") > max(script.log.index("end start:a"), script.log.index("end start:b"))
    assert outcomes["start:a"].detail == "start:a ok"


def test_a_failure_skips_everything_that_transitively_requires_it_and_nothing_else():
    script = Script(start_a="fail")
    outcomes = run(Executor(script), [
        action("start:a"), action("start:b", "start:a"), action("lease:L1", "start:b"), action("start:x"),
    ])
    assert outcomes["start:a"].status == "failed" and "start:a broke" in outcomes["start:a"].detail
    assert outcomes["start:b"].status == "skipped"
    assert outcomes["start:b"].detail.startswith("requires start:a, which failed: start:a broke")
    assert outcomes["lease:L1"].status == "skipped"
    assert outcomes["lease:L1"].detail == "requires start:b, which was skipped"
    assert outcomes["start:x"].status == "done"
    assert "begin start:b" not in script.log and "begin lease:L1" not in script.log


def test_unexpected_exceptions_and_deferrals_are_outcomes_not_escapes():
    outcomes = run(Executor(Script(start_a="crash", start_b="defer")), [action("start:a"), action("start:b")])
    assert outcomes["start:a"].status == "failed" and outcomes["start:a"].detail == "ValueError: unexpected"
    assert outcomes["start:b"].status == "deferred" and outcomes["start:b"].detail == "later"


def test_each_action_has_its_own_timeout():
    ticks = iter(range(100))
    executor = Executor(Script(start_a="hang"), timeout_for=lambda a: 0.05 if a.id == "start:a" else None,
                        clock=lambda: float(next(ticks)))
    outcomes = run(executor, [action("start:a"), action("start:b"), action("stop:c", "start:a")])
    assert outcomes["start:a"].status == "failed" and outcomes["start:a"].detail == "timed out after 0.05 s"
    assert outcomes["start:b"].status == "done"
    assert outcomes["stop:c"].status == "skipped"


def test_hooks_see_every_start_and_finish():
    seen = []
    executor = Executor(Script(start_a="fail"), on_start=lambda a, _: seen.append(("start", a.id)),
                        on_finish=lambda a, o: seen.append((o.status, a.id)))
    run(executor, [action("start:a"), action("start:b", "start:a")])
    assert seen == [("start", "start:a"), ("failed", "start:a"), ("skipped", "start:b")]


def test_a_requirement_outside_the_plan_does_not_block():
    outcomes = run(Executor(Script()), [action("start:b", "start:elsewhere")])
    assert outcomes["start:b"].status == "done"
