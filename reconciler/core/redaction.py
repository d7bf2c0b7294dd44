"""Secrets stay secret: what a ``${VAR}`` expanded to is never printed (invariant 8).

A profile's ``managed`` strings may read the environment when they are
loaded (``env: {API_KEY: "${API_KEY}"}``, ``args_template: "--token
${HF_TOKEN}"``). The values are needed to launch and to compare launch specs,
but they must never appear in any output: events, logs, status, plans,
errors. The loader records every expansion (value → the reference that made
it, e.g. ``"sk-4f…" → "${API_KEY}"``) with the profile, and a
:class:`Redactor` built from those replaces each value, wherever it appears
in a text, by its reference — so an operator still reads *which* variable is
involved, never its value.

Two rules keep it safe:

* in free text (messages, reasons, argv tokens) a value is replaced wherever
  it appears, longest first; values shorter than :data:`MIN_SECRET_CHARS`
  are left in free text (a 2-character value would mangle every message and
  is no secret), but never in the structural places below;
* an environment value is never printed at all where the code can help it:
  launch-spec changes name the variable (``env API_KEY changed``), and
  :meth:`Redactor.launch` masks every env value that came from an expansion.

A redactor remembers every profile it has seen (:meth:`Redactor.learn`), so a
value from an older version of the profile — in the launch spec an instance
still runs with — is hidden too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from reconciler.core.plan import Plan
from reconciler.core.snapshot import Launch, Snapshot

MIN_SECRET_CHARS = 4
MASK = "***"


class Redactor:
    """Replaces expanded values by their ``${VAR}`` references."""

    def __init__(self, expansions: Mapping[str, str] | None = None):
        self._refs: dict[str, str] = {}
        self._ordered: list[tuple[str, str]] = []
        if expansions:
            self.learn(expansions)

    def learn(self, expansions: Mapping[str, str]) -> Redactor:
        """Also hide these values (value → reference); returns self."""
        changed = False
        for value, reference in expansions.items():
            if value and self._refs.get(value) != reference:
                self._refs[value] = reference
                changed = True
        if changed:
            self._ordered = sorted(((v, r) for v, r in self._refs.items() if len(v) >= MIN_SECRET_CHARS),
                                   key=lambda item: (-len(item[0]), item[0]))
        return self

    def __bool__(self) -> bool:
        return bool(self._refs)

    def text(self, text: str) -> str:
        """``text`` with every known value (of at least :data:`MIN_SECRET_CHARS`) replaced by its reference."""
        for value, reference in self._ordered:
            if value in text:
                text = text.replace(value, reference)
        return text

    def value(self, value: str) -> str:
        """A structural value (an env value, an argv token): its reference when it is one, else redacted text."""
        if value in self._refs:
            return self._refs[value]
        return self.text(value)

    def data(self, data: Any) -> Any:
        """Strings in nested lists, tuples and dicts (keys kept), redacted."""
        if isinstance(data, str):
            return self.text(data)
        if isinstance(data, dict):
            return {k: self.data(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return [self.data(v) for v in data]
        return data

    def argv(self, argv: Iterable[str]) -> list[str]:
        return [self.value(token) for token in argv]

    def launch(self, launch: Launch) -> Launch:
        """A launch spec fit to print: argv tokens redacted, env values that came from an expansion masked."""
        env = {k: (self._refs.get(v, MASK) if self._contains(v) else v) for k, v in launch.env.items()}
        return launch.model_copy(update={"argv": self.argv(launch.argv), "env": env, "cwd": self.text(launch.cwd),
                                         "image": self.text(launch.image) if launch.image else launch.image})

    def _contains(self, value: str) -> bool:
        return value in self._refs or any(v in value for v, _ in self._ordered)


NO_SECRETS = Redactor()


def redact_plan(plan: Plan, redactor: Redactor) -> Plan:
    """The plan with every reason redacted (what the plan *does* never depends on a reason's words)."""
    if not redactor:
        return plan
    actions = [a.model_copy(update={"reason": redactor.text(a.reason)}) for a in plan.actions]
    pending = [p.model_copy(update={"reason": redactor.text(p.reason)}) for p in plan.pending]
    return plan.model_copy(update={"actions": actions, "pending": pending})


def redact_snapshot(snapshot: Snapshot, redactor: Redactor) -> Snapshot:
    """The snapshot with its instances' launch specs and its processes' command lines fit to print."""
    if not redactor:
        return snapshot
    instances = [i.model_copy(update={"launch": redactor.launch(i.launch)}) if i.launch else i
                 for i in snapshot.instances]
    processes = [p.model_copy(update={"cmdline": redactor.argv(p.cmdline)}) for p in snapshot.processes]
    return snapshot.model_copy(update={"instances": instances, "processes": processes})
