"""The Ollama driver: evict an Ollama by unloading its models; the server keeps running.

An adopted Ollama is never signalled (invariant 1), yet it is often what holds
the GPU. DESIGN §3 allows evicting it where a driver can free its memory
without killing it: ``GET /api/ps`` lists the loaded models and ``POST
/api/generate {"model": m, "keep_alive": 0}`` unloads each one (through
:class:`reconciler.host.ollama_api.OllamaApi`, which ignores proxy variables —
``trust_env=False`` — since it only ever talks to loopback). ``stop`` here is
that eviction, whatever the instance's origin: it never signals anything.
"""

from __future__ import annotations

import httpx

from reconciler.core.profile import Service
from reconciler.core.snapshot import Instance
from reconciler.drivers.base import Driver, StopResult, Waiter
from reconciler.errors import DriverError
from reconciler.host.ollama_api import DEFAULT_PORT, OllamaApi


class OllamaDriver(Driver):
    """Unloads the models of the Ollama listening on ``host:port``; it never starts anything."""

    kind = "ollama"

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        *,
        host: str = "127.0.0.1",
        client: httpx.AsyncClient | None = None,
        waiter: Waiter | None = None,
    ):
        self.port = port
        self.host = host
        self._client = client
        self.waiter = waiter or Waiter()

    @classmethod
    def for_service(
        cls,
        service: Service,
        *,
        host: str = "127.0.0.1",
        client: httpx.AsyncClient | None = None,
        waiter: Waiter | None = None,
    ) -> OllamaDriver:
        """The driver for a profile service (its ``host_port``, else ``port``, else 11434)."""
        return cls(service.probe_port or DEFAULT_PORT, host=host, client=client, waiter=waiter)

    def api(self, timeout_s: float = 5.0) -> OllamaApi:
        return OllamaApi(self.port, host=self.host, client=self._client, timeout_s=timeout_s)

    async def _stop(self, instance: Instance, timeout_s: float) -> StopResult:
        """Unload every loaded model and wait until Ollama says they are gone.

        Ollama answers ``keep_alive: 0`` before the model is gone, and waits
        for a request in flight to end first; so ``/api/ps`` is polled until
        none of the unloaded models is listed, up to ``timeout_s`` (the
        profile's eviction timeout). Still listed then: a :class:`DriverError`
        — the eviction failed, and nothing that counted on its memory starts.
        """
        where = f"{instance.service} (Ollama on {self.host}:{self.port})"
        async with self.api(timeout_s=max(timeout_s, 5.0)) as api:
            unloaded = await api.unload_all()

            async def gone() -> bool:
                return not set(unloaded) & {m.name for m in await api.ps()}

            began = self.waiter.clock()
            if unloaded and not await self.waiter.until(gone, timeout_s):
                still = sorted(set(unloaded) & {m.name for m in await api.ps()})
                raise DriverError(f"{where} still holds {', '.join(still)} {timeout_s:g} s after it was asked to "
                                  "unload (a request in flight keeps a model loaded); not evicted")
            waited = self.waiter.clock() - began
        if unloaded:
            reason = f"unloaded {', '.join(unloaded)} from {where} in {waited:.1f} s; the server keeps running"
        else:
            reason = f"{where} had no model loaded; the server keeps running"
        return StopResult("unloaded", reason, [])
