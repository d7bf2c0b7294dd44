"""HTTP health probes: ``GET http://127.0.0.1:{host_port}{health_path}``, 2xx = healthy.

One :class:`Prober` holds one ``httpx.AsyncClient`` for its whole life (made on
first use inside the running event loop, closed by ``aclose()``), so probing
a hundred services reuses connections instead of building a client each
time. ``trust_env=False``: a proxy from the environment must never see, or
break, loopback probes. Each probe has its own timeout (the service's
``probe_timeout_s``), and all probes of one round run concurrently. A probe
never raises: what went wrong is in :class:`Probe.error`.

An Ollama's probe (``kind="ollama"``, its ``GET /api/tags``) is healthy only
when the answer *is* an Ollama's — a JSON object with a ``models`` list — so a
web server that happens to answer 200 on that path is not taken for one (and
adopted); the installed models' names go into :attr:`Probe.models`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import httpx

from reconciler.core.profile import Service, is_ollama
from reconciler.core.snapshot import Probe

DEFAULT_TIMEOUT_S = 2.0


def _stop_sniffio_lookups() -> None:
    """Make httpcore's per-request ``import sniffio`` fail at once when sniffio is not installed.

    httpcore 1.0.x imports ``sniffio`` inside ``current_async_library()``, which
    runs several times per request, and falls back to asyncio on ImportError.
    anyio >= 4.11 no longer installs sniffio, and Python does not cache a failed
    import, so every request searched ``sys.path`` again (about 5 ``stat`` calls
    each): most of a probe's CPU time (encode/httpcore#1103). ``None`` in
    ``sys.modules`` is Python's documented "not importable" marker: the import
    raises ImportError without a search, and httpcore picks asyncio as before.
    When sniffio is installed, nothing changes.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        # typeshed types sys.modules' values as modules only, without this documented None marker
        sys.modules["sniffio"] = None  # type: ignore[assignment]


_stop_sniffio_lookups()


@dataclass(frozen=True)
class Target:
    """Where and how to probe one service."""

    port: int
    path: str = "/health"
    timeout_s: float = DEFAULT_TIMEOUT_S
    host: str = "127.0.0.1"
    kind: Literal["http", "ollama"] = "http"  # ollama: the answer must be {"models": [...]}

    @property
    def url(self) -> str:
        path = self.path if self.path.startswith("/") else "/" + self.path
        return f"http://{self.host}:{self.port}{path}"


def service_target(service: Service) -> Target | None:
    """How to probe a managed service of the profile (None: it has no port, or is unmanaged)."""
    managed = service.managed
    if managed is None or service.probe_port is None:
        return None
    ollama = is_ollama(service) and managed.health_path.rstrip("/") == "/api/tags"
    return Target(port=service.probe_port, path=managed.health_path, timeout_s=service.probe_timeout_s,
                  kind="ollama" if ollama else "http", host=service.url_host)


def ollama_models(response: httpx.Response) -> list[str] | None:
    """The model names of an Ollama's ``/api/tags`` answer; None when the answer is not one."""
    try:
        data = response.json()
    except ValueError:
        return None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return None
    return [str(m.get("name") or m.get("model")) for m in models if isinstance(m, dict) and (m.get("name") or
                                                                                             m.get("model"))]


class Prober:
    """Concurrent health probes over one shared HTTP client."""

    def __init__(self, client: httpx.AsyncClient | None = None):
        self._client = client

    @property
    def client(self) -> httpx.AsyncClient:
        """The shared client; loopback HTTP for other host modules (e.g. the Ollama API) too."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                trust_env=False,
                timeout=DEFAULT_TIMEOUT_S,
                # Probes go to many different ports at once; don't queue them behind a pool limit.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        return self._client

    async def probe(self, target: Target) -> Probe:
        try:
            response = await self.client.get(target.url, timeout=target.timeout_s)
        except httpx.TimeoutException:
            return Probe(healthy=False, error=f"no answer within {target.timeout_s:g}s")
        except httpx.ConnectError:
            return Probe(healthy=False, error=f"connection refused on port {target.port}")
        except httpx.HTTPError as exc:
            return Probe(healthy=False, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
        healthy = response.is_success
        error = None if healthy else f"HTTP {response.status_code}"
        if healthy and target.kind == "ollama":
            models = ollama_models(response)
            if models is None:
                return Probe(healthy=False, status=response.status_code,
                             error=f"answers {target.path} but not as an Ollama does (no \"models\" list)")
            return Probe(healthy=True, status=response.status_code, models=models)
        return Probe(healthy=healthy, status=response.status_code, error=error)

    async def probe_all(self, targets: Mapping[str, Target]) -> dict[str, Probe]:
        """Probe every target at once; results by the same keys."""
        names = list(targets)
        results = await asyncio.gather(*(self.probe(targets[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
