"""A request's model → the service that serves it, and where that service answers.

The table is :func:`reconciler.core.served.routing_table` of the profile in
force, plus what each Ollama lists: its last health probe's ``/api/tags``
(the last pass's snapshot), remembered per service, so that the models of a
managed Ollama that is stopped now stay routable — a request for one starts
it. The table is rebuilt only when the profile in force or the last pass
changes (both are new objects then), so a request pays for one dictionary
lookup.

An unknown model is answered 404 with the closest names
(:meth:`Routes.suggest`); ``GET /v1/models`` and ``/api/tags`` list every
name the table has (:meth:`Routes.names`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from reconciler.core.compatibility import capacity, model_bound
from reconciler.core.profile import Profile, Service
from reconciler.core.served import Api, Route, lookup, routing_table
from reconciler.runtime import Runtime


@dataclass(frozen=True)
class Target:
    """Where one request goes."""

    asked: str  # the name the client used
    model: str  # the name the upstream knows (an alias resolved)
    service: str
    spec: Service
    api: Api
    url: str  # http://127.0.0.1:{host_port}

    @property
    def slots(self) -> int:
        """Requests one instance serves at once (``max_concurrent`` when shared, else 1)."""
        return capacity(self.spec)

    @property
    def switches(self) -> bool:
        """Whether another model needs another instance (``{model}`` in its launch)."""
        return model_bound(self.spec)


class Routes:
    """The routing table of the profile in force, with the Ollamas' live lists."""

    def __init__(self, runtime: Runtime, profile: Callable[[], Profile]):
        self.runtime = runtime
        self._profile = profile
        self._seen: tuple[object, object] | None = None
        self._table: dict[str, Route] = {}
        self._live: dict[str, list[str]] = {}  # Ollama service → the models its last probe listed

    def table(self) -> dict[str, Route]:
        profile, last = self._profile(), self.runtime.last_pass()
        if self._seen is None or self._seen[0] is not profile or self._seen[1] is not last:
            if last is not None:
                for service, probe in last.snapshot.probes.items():
                    if probe.healthy and probe.models is not None:
                        self._live[service] = list(probe.models)
            self._live = {s: m for s, m in self._live.items() if s in profile.services}
            self._table = routing_table(profile, self._live)
            self._seen = (profile, last)
        return self._table

    def resolve(self, model: str) -> Target | None:
        route = lookup(self.table(), model)
        if route is None:
            return None
        spec = self._profile().services.get(route.service)
        if spec is None or spec.probe_port is None:
            return None
        return Target(model, route.model, route.service, spec, route.api, spec.base_url or "")

    def names(self) -> list[tuple[str, Route]]:
        """Every routable name with its route, by service priority then name."""
        profile = self._profile()
        order = {name: (spec.priority, name) for name, spec in profile.services.items()}
        return sorted(self.table().items(), key=lambda item: (order.get(item[1].service, (0, "")), item[0]))

    def suggest(self, model: str) -> list[str]:
        """Up to three served names close to ``model``."""
        names = list(self.table())
        close = difflib.get_close_matches(model, names, n=3, cutoff=0.5)
        if not close:
            stem = model.split(":", 1)[0].lower()
            close = [n for n in names if stem and stem in n.lower()][:3]
        return close

    def unknown(self, model: str) -> str:
        """Why ``model`` cannot be routed, in words, with close names."""
        close = self.suggest(model)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        served = len(self.table())
        return (f"model {model!r} is not served here{hint} ({served} model{'s' if served != 1 else ''} are: "
                "GET /v1/models or /api/tags lists them; a profile's `models:` adds more)")


__all__ = ["Routes", "Target"]
