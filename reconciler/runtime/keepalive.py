"""Ollama's ``keep_alive``, per instance: how long it stays once idle, as its last gateway request said.

An Ollama client says on each request how long the model should stay loaded
after it: ``keep_alive: 0`` unloads it as soon as it is idle, ``-1`` keeps
it, ``"10m"`` ten minutes. The gateway honours it for the services it
starts itself (an Ollama upstream is told directly): it records the value
here, with the pid of the instance that served the request
(:meth:`KeepAlive.set`), and each pass plans with it — :meth:`KeepAlive.apply`
copies it onto that instance in the snapshot as ``keep_alive_s``, which
overrides the service's ``idle_stop_after_s`` for that instance
(:mod:`reconciler.core.wanted`). A request without ``keep_alive`` clears it.

It is kept in memory, not in the store: a value belongs to one running
instance (a restart or a model switch starts a new one, and the value is
dropped once the pid differs), and a restart of the reconciler forgets it —
the service's own ``idle_stop_after_s`` applies again until the next request
says otherwise. ``always_on`` services are never idle-stopped, whatever a
request says, and adopted ones are not ours to stop.
"""

from __future__ import annotations

from reconciler.core.snapshot import Snapshot


class KeepAlive:
    """Service → (seconds, the pid of the instance they were said for)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[float, int | None]] = {}

    def set(self, service: str, seconds: float | None, pid: int | None) -> None:
        """``seconds`` from now on for the instance ``pid`` of ``service`` (None: the service's own idle stop)."""
        if seconds is None:
            self._values.pop(service, None)
        else:
            self._values[service] = (seconds, pid)

    def get(self, service: str) -> float | None:
        value = self._values.get(service)
        return value[0] if value is not None else None

    def apply(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with each instance's ``keep_alive_s`` as its last request said (values for an
        instance that is gone, or was replaced by another process, are dropped)."""
        if not self._values:
            return snapshot
        instances = []
        for instance in snapshot.instances:
            value = self._values.get(instance.service)
            if value is not None and value[1] is not None and instance.pid is not None and value[1] != instance.pid:
                del self._values[instance.service]  # said for a process that was replaced
                value = None
            seconds = value[0] if value is not None else None
            instances.append(instance if instance.keep_alive_s == seconds or value is None
                             else instance.model_copy(update={"keep_alive_s": seconds}))
        for service in set(self._values) - {i.service for i in snapshot.instances}:
            del self._values[service]  # its instance is gone
        return snapshot.model_copy(update={"instances": instances})


__all__ = ["KeepAlive"]
