"""A small async client for Ollama's HTTP API (the parts the reconciler needs).

``ps()`` lists loaded models with ``size_vram`` (bytes in VRAM): the observer
sums it to attribute an adopted Ollama's GPU memory where NVML cannot see its
processes (simulated GPUs, containers). ``unload(model)`` is
``POST /api/generate {"model": m, "keep_alive": 0}``, Ollama's documented way
to free a model's memory without stopping the server; ``unload_all()`` is how
a driver evicts an adopted Ollama that must never be killed. ``pull(model,
progress)`` is ``POST /api/pull`` with a streamed answer: each NDJSON line
(``{"status", "digest", "total", "completed"}``) goes to ``progress``; a line
with ``error`` or a non-2xx answer fails the pull. A pull can take minutes: it
has no overall time limit, only :data:`PULL_READ_TIMEOUT_S` between two lines.
Failures raise :class:`DriverError` with the URL and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from reconciler.errors import DriverError
from reconciler.host.nvml import mb_ceil

DEFAULT_PORT = 11434
PULL_READ_TIMEOUT_S = 300.0  # Ollama sends a progress line at least this often while it downloads


@dataclass(frozen=True)
class LoadedModel:
    name: str
    size: int = 0
    size_vram: int = 0

    @property
    def vram_mb(self) -> int:
        return mb_ceil(self.size_vram)


class OllamaApi:
    """Ollama at ``http://{host}:{port}``. Pass a shared client to reuse its connections."""

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        *,
        host: str = "127.0.0.1",
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 5.0,
    ):
        self.base_url = f"http://{host}:{port}"
        self.timeout_s = timeout_s
        self._client = client
        self._owns_client = client is None

    async def ps(self) -> list[LoadedModel]:
        """Models loaded now."""
        data = await self._request("GET", "/api/ps")
        try:
            return [
                LoadedModel(
                    name=str(m.get("name") or m.get("model") or ""),
                    size=int(m.get("size") or 0),
                    size_vram=int(m.get("size_vram") or 0),
                )
                for m in _models(data)
            ]
        except (TypeError, ValueError):
            raise DriverError(f"Ollama GET {self.base_url}/api/ps: unexpected sizes in {data!r:.200}") from None

    async def vram_mb(self) -> int:
        """MB of VRAM its loaded models hold (Σ size_vram)."""
        return sum(m.vram_mb for m in await self.ps())

    async def tags(self) -> list[str]:
        """Names of the models installed."""
        data = await self._request("GET", "/api/tags")
        return [str(m.get("name") or m.get("model") or "") for m in _models(data)]

    async def unload(self, model: str) -> None:
        """Free one model's memory now (the server keeps running)."""
        await self._request("POST", "/api/generate", {"model": model, "keep_alive": 0})

    async def unload_all(self) -> list[str]:
        """Unload every loaded model; returns their names."""
        names = [m.name for m in await self.ps()]
        for name in names:
            await self.unload(name)
        return names

    async def pull(self, model: str, progress: Callable[[dict[str, Any]], None]) -> None:
        """Pull ``model``, handing each progress line to ``progress``; returns once Ollama says success."""
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, timeout=self.timeout_s)
        url = self.base_url + "/api/pull"
        timeout = httpx.Timeout(self.timeout_s, read=PULL_READ_TIMEOUT_S)
        last: dict[str, Any] = {}
        try:
            async with self._client.stream("POST", url, json={"model": model, "stream": True},
                                           timeout=timeout) as response:
                if not response.is_success:
                    body = (await response.aread()).decode(errors="replace")
                    status = response.status_code
                    raise DriverError(f"Ollama POST {url} ({model}): HTTP {status} {_error(body)}".rstrip())
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        last = json.loads(line)
                    except ValueError:
                        raise DriverError(f"Ollama POST {url} ({model}): a progress line is not JSON") from None
                    if not isinstance(last, dict):
                        continue
                    if last.get("error"):
                        raise DriverError(f"Ollama could not pull {model}: {last['error']}")
                    progress(last)
        except httpx.HTTPError as exc:
            raise DriverError(f"Ollama POST {url} ({model}): {type(exc).__name__} {exc}".rstrip()) from None
        if last.get("status") != "success":
            raise DriverError(f"Ollama POST {url} ({model}): the answer ended before it said success")

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> OllamaApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, timeout=self.timeout_s)
        url = self.base_url + path
        try:
            response = await self._client.request(method, url, json=body, timeout=self.timeout_s)
            response.raise_for_status()
            return response.json() if response.content else {}
        except httpx.HTTPStatusError as exc:
            raise DriverError(f"Ollama {method} {url}: HTTP {exc.response.status_code}") from None
        except httpx.HTTPError as exc:
            raise DriverError(f"Ollama {method} {url}: {type(exc).__name__} {exc}".rstrip()) from None
        except ValueError:
            raise DriverError(f"Ollama {method} {url}: the answer is not JSON") from None


def _models(data: Any) -> list[dict[str, Any]]:
    models = data.get("models") if isinstance(data, dict) else None
    return [m for m in models or [] if isinstance(m, dict)]


def _error(body: str) -> str:
    """The ``error`` of an Ollama error body, else the body's start."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200]
    return str(data.get("error", "")) if isinstance(data, dict) else body[:200]
