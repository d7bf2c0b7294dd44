"""Starting and stopping instances, with the intent discipline of invariant 5.

Start: the intent is written *before* anything is launched; the driver
launches; the intent gets the new process's ``(pid, create_time)`` (or the
container) at once; the instance goes into the store as ``starting``; then
the health wait. Healthy → ``running`` (and a healthy mark for the backoff).
Exited or timed out → whatever was started is stopped (through the driver,
which signals only what we started), the instance leaves the store, and the
service's backoff counts a failure. A caller's deadline that comes first
leaves the instance ``starting`` for a later pass to finish. A reconciler
that dies at any step finds the intent on restart (:mod:`.recovery`). A
process that was launched but cannot be recorded (the store fails at that
moment) is stopped again at once: nothing of ours runs unaccounted for.

Stop and evict: intent, state ``stopping``, driver stop (SIGTERM to the
group, ``eviction_timeout_s``, SIGKILL, confirm gone), then the wait for the
GPU memory to come back (:mod:`.memory`; on each GPU of an instance spanning
several), and out of the store. A start on several GPUs launches once, with
every GPU in the request (``CUDA_VISIBLE_DEVICES=0,1``), and records them in
the intent and the instance (``gpus``). Evicting an
adopted Ollama unloads its models instead — never a signal — and it stays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.core.backoff import DEFAULT_POLICY, BackoffPolicy, after_failure, after_healthy
from reconciler.core.clock import Clock, iso_utc
from reconciler.core.events import EventKind
from reconciler.core.launch import gpu_tuple, launch_digest, launch_spec
from reconciler.core.profile import Service
from reconciler.core.redaction import Redactor
from reconciler.core.snapshot import Instance
from reconciler.drivers.base import LaunchRequest, StartedContainer, StopResult
from reconciler.errors import DriverError, StoreError
from reconciler.host.gpu import GpuBackend
from reconciler.host.probes import Target, service_target
from reconciler.runtime.driverset import DriverSet
from reconciler.runtime.events import EventBus
from reconciler.runtime.executor import Deferred
from reconciler.runtime.health import HealthWaiter
from reconciler.runtime.memory import memory_watch
from reconciler.store.base import Store

DEFAULT_MEMORY_TIMEOUT_S = 30.0


def who(instance: Instance) -> str:
    if instance.container:
        return f"{instance.service} (container {instance.container})"
    return f"{instance.service} (pid {instance.pid})" if instance.pid is not None else instance.service


def health_target(spec: Service) -> Target | None:
    return service_target(spec)


@dataclass
class Lifecycle:
    store: Store
    drivers: DriverSet
    gpu_backend: GpuBackend
    events: EventBus
    health: HealthWaiter
    clock: Clock
    sim: bool = False
    policy: BackoffPolicy = DEFAULT_POLICY
    memory_timeout_s: float = DEFAULT_MEMORY_TIMEOUT_S
    eviction_timeout_s: float = 10.0  # the profile's, set by the runtime for each pass
    redactor: Redactor = field(default_factory=Redactor)  # what an error or a log line may never show

    # --- start ------------------------------------------------------------------

    async def start(
        self, name: str, spec: Service, gpus: int | Sequence[int] | None, model: str | None, action_id: str,
        deadline: float | None = None,
    ) -> str:
        """Start ``name`` on ``gpus`` (one GPU, or every GPU of a service spanning several)."""
        devices = gpu_tuple(gpus)
        gpu, span = (devices[0] if devices else None), (list(devices) if len(devices) > 1 else None)
        launch = launch_spec(name, spec, devices, model)
        digest = launch_digest(launch)
        driver = self.drivers.starter(name, spec)
        data: dict[str, Any] = {"gpu": gpu, "model": model,
                                "launch": launch.model_dump(mode="json") if launch else None}
        if span is not None:
            data["gpus"] = span
        intent = self.store.begin_intent(action_id, "start", name, data)
        try:
            if launch is None:
                raise DriverError(f"{name} has no `managed:` block: an unmanaged slot is never started")
            # the intent goes with the launch: recovery finds a process by it even without its pid
            request = LaunchRequest(name, spec, gpu, model, launch, sim=self.sim, intent=intent,
                                    shown_argv=self.redactor.argv(launch.argv), gpus=tuple(span or ()))
            started = await driver.start(request)
        except Exception as exc:  # any launch error is a failure that backs off, never a retry every pass
            error = str(exc) if isinstance(exc, DriverError) else f"{name}: cannot launch: {type(exc).__name__}: {exc}"
            self.store.finish_intent(intent, "failed", {"error": self.redactor.text(error)})
            self.failure(name, error, digest)
            if isinstance(exc, DriverError):
                raise
            raise DriverError(self.redactor.text(error)) from None
        identity: dict[str, Any]
        if isinstance(started, StartedContainer):
            identity = await self.drivers.container_identity(started.container)
        else:
            identity = {"pid": started.pid, "create_time": started.create_time}
        instance = Instance(
            service=name, gpu=gpu, gpus=span, origin="started", model=model, launch=started.launch,
            state="starting", since=self.clock.now(), **identity,
        )
        try:
            self.store.update_intent(intent, identity)
            self.store.put_instance(instance)
        except StoreError as exc:
            await self._unrecorded(instance, exc)
            raise
        self.events.publish(EventKind.INSTANCE_LAUNCHED, service=name, message=f"launched {who(instance)}", **identity)
        try:
            result = await self.health.wait(
                health_target(spec), lambda: self.drivers.alive(instance), spec.start_timeout_s, deadline
            )
        except asyncio.CancelledError:
            try:
                await self.discard(instance, "the start was cancelled", None)
            finally:
                self.store.finish_intent(intent, "cancelled")
            raise
        if result.healthy:
            self.promote(instance, digest)
            self.store.finish_intent(intent, "done")
            return f"{who(instance)} {result.detail}"
        if result.verdict == "deadline":
            self.store.finish_intent(intent, "launched", {"note": "left starting for a later pass"})
            raise Deferred(f"{who(instance)} {result.detail}; a later pass keeps waiting for its health "
                           f"(start_timeout_s {spec.start_timeout_s:g})")
        reason = result.detail + (self.drivers.exit_note(instance) if result.verdict == "exited" else "")
        try:
            await self.discard(instance, reason, digest)
        finally:
            self.store.finish_intent(intent, "failed", {"error": reason})
        raise DriverError(f"{who(instance)} {reason}")

    async def _unrecorded(self, instance: Instance, exc: StoreError) -> None:
        """A launched process the store cannot take: stopped again, or it would run unaccounted for."""
        try:
            result = await self.drivers.stopper(instance).stop(instance, self.eviction_timeout_s)
            what = f"it was stopped again ({result.reason})"
        except DriverError as stop_error:
            what = f"stopping it failed ({stop_error}); the next start-up finds it by its marker"
        exc.args = (f"{exc}; {who(instance)} was launched but cannot be recorded: {what}",)

    def promote(self, instance: Instance, digest: str) -> Instance:
        """A starting instance became healthy: ``running`` in the store, healthy for the backoff."""
        current = self.store.get_instance(instance.service) or instance
        running = current.model_copy(update={"state": "running", "since": self.clock.now()})
        self.store.put_instance(running)
        self.healthy(instance.service, digest)
        self.events.publish(EventKind.INSTANCE_HEALTHY, service=instance.service, message=f"{who(instance)} is healthy")
        return running

    async def discard(self, instance: Instance, reason: str, digest: str | None) -> None:
        """A failed start: stop whatever runs of it, forget it, count a failure (unless ``digest`` is None).

        If the stop itself fails, the instance stays recorded (``starting``), so
        that nothing of ours runs unaccounted for; a later pass tries again.
        """
        if digest is not None:
            self.failure(instance.service, reason, digest)
        self.events.publish(EventKind.INSTANCE_FAILED, service=instance.service, message=f"{who(instance)} {reason}")
        if await self.drivers.alive(instance):
            await self.drivers.stopper(instance).stop(instance, self.eviction_timeout_s)
        self.store.remove_instance(instance.service)

    def failure(self, service: str, reason: str, digest: str) -> None:
        """Count one more failure of ``service`` (its backoff: :mod:`reconciler.core.backoff`)."""
        now, reason = self.clock.now(), self.redactor.text(reason)
        backoff = self.store.update_backoff(service, lambda old: after_failure(old, reason, digest, now, self.policy))
        self.events.publish(
            EventKind.BACKOFF, service=service, failures=backoff.failures, stalled=backoff.stalled,
            next_attempt_at=iso_utc(backoff.next_attempt_at) if backoff.next_attempt_at else None,
            message=f"{service} failed ({reason}); failure {backoff.failures}"
            + ("; stalled" if backoff.stalled else ""),
        )

    def healthy(self, service: str, digest: str) -> None:
        """Note a healthy observation of ``service`` (enough of them clear its backoff)."""
        now = self.clock.now()
        self.store.update_backoff(service, lambda old: after_healthy(old, digest, now, self.policy))

    # --- stop and evict -----------------------------------------------------------

    async def stop(
        self, instance: Instance, spec: Service | None, kind: str, action_id: str, reservation_mb: int | None,
        timeout_s: float,
    ) -> str:
        """Stop (or evict) ``instance``; returns what happened, raises DriverError when refused."""
        if instance.origin == "adopted":
            return await self._unload(instance, spec, kind, reservation_mb, timeout_s)
        identity = {"pid": instance.pid, "create_time": instance.create_time, "container": instance.container}
        intent = self.store.begin_intent(action_id, kind, instance.service, identity)
        self.store.put_instance(instance.model_copy(update={"state": "stopping", "since": self.clock.now()}))
        try:
            freed, expect_mb = await memory_watch(self.gpu_backend, instance, reservation_mb)
            result = await self.drivers.stopper(instance).stop(instance, timeout_s, freed, self.memory_timeout_s)
        except BaseException as exc:
            self.store.put_instance(instance)  # still ours and (as far as we know) running
            self.store.finish_intent(intent, "failed", {"error": str(exc) or type(exc).__name__})
            raise
        self.store.remove_instance(instance.service)
        self.store.finish_intent(intent, result.outcome, {"reason": result.reason})
        if not result.ok:  # not identifiable as ours: forget it, never signal it
            self.events.publish(EventKind.INSTANCE_FORGOTTEN, service=instance.service, message=result.reason)
            raise DriverError(f"refused to stop {who(instance)}: {result.reason}; it is forgotten, not signalled")
        detail = result.reason + memory_note(result, expect_mb, instance.gpu_set, self.memory_timeout_s)
        self.events.publish(EventKind.INSTANCE_STOPPED, service=instance.service, message=detail,
                            outcome=result.outcome)
        return detail

    async def _unload(
        self, instance: Instance, spec: Service | None, kind: str, reservation_mb: int | None, timeout_s: float
    ) -> str:
        driver = self.drivers.evicter(instance, spec)
        if kind != "evict" or driver is None:
            raise DriverError(
                f"{who(instance)} is adopted: it is never signalled, and no driver frees its memory without killing it"
            )
        freed, expect_mb = await memory_watch(self.gpu_backend, instance, reservation_mb)
        result = await driver.stop(instance, timeout_s, freed, self.memory_timeout_s)
        detail = result.reason + memory_note(result, expect_mb, instance.gpu_set, self.memory_timeout_s)
        self.events.publish(EventKind.INSTANCE_UNLOADED, service=instance.service, message=detail)
        return detail


def memory_note(result: StopResult, expect_mb: int, gpus: tuple[int, ...], timeout_s: float) -> str:
    if result.memory_freed is None:
        return ""
    if result.memory_freed:
        where = f"GPU {gpus[0] if gpus else None}" if len(gpus) <= 1 else f"GPUs {','.join(map(str, gpus))} (in all)"
        return f"; {expect_mb} MB back on {where} after {result.memory_wait_s:.1f} s"
    return ""  # the driver's reason already says "memory not freed within … s"
