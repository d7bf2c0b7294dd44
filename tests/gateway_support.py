"""Driving ``reconciler watch --api … --gateway …`` (= ``serve --gateway``) with real clients on loopback.

:class:`GatewayRun` is one server process of a :class:`tests.e2e_support.Host`
(its own tmp directory, state directory, simulation scope, free ports) with
both listeners on free ports (``127.0.0.1:0``), announced by ``api.started``
and ``gateway.started``. Tests talk to the gateway with the real OpenAI SDK
(:meth:`GatewayRun.openai`), an Ollama client's requests (httpx), and read
the API's status. The services are :mod:`reconciler.testing.fake_openai`
(an OpenAI-only model server, one model per process, as ``llama-server -m
{model}``) and :mod:`reconciler.testing.fake_ollama`; teardown (the Host's)
kills the server and everything it started.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai

from tests.api_support import ApiRun
from tests.e2e_support import Host

WAIT_S = 20.0

FAKE = """\
  {name}:
    max_mb: {mb}
    priority: {priority}
    shared: {shared}
    max_concurrent: {max_concurrent}
    always_on: {always_on}
    idle_stop_after_s: {idle_stop_after_s}
    start_timeout_s: 10
    probe_interval_s: 0.3
    probe_timeout_s: 0.5
{extra}    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.fake_openai --port {{port}} --model {model} {args}"
      port: {port}
"""

FAKE_OLLAMA = """\
  {name}:
    max_mb: {mb}
    priority: {priority}
    always_on: {always_on}
    probe_interval_s: 0.3
    idle_stop_after_s: {idle_stop_after_s}
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.fake_ollama --port {{port}} --models {models} --vram-mb {mb} {args}"
      port: {port}
      health_path: /api/tags
"""


def fake(name: str, port: int, *, models: dict[str, int | None] | list[str] | None = None, mb: int = 1024,
         priority: int = 2, max_concurrent: int = 1, always_on: bool = False, idle_stop_after_s: float = 0,
         args: str = "", extra: str = "", model: str | None = None) -> str:
    """A fake OpenAI model server: ``models`` (name → its own max_mb, or a list) behind ``--model {model}``,
    else one ``model`` (a fixed name: the service serves that one)."""
    lines = extra
    if isinstance(models, dict):
        lines += "    models:\n" + "".join(
            f"      {n}: {{max_mb: {m}}}\n" if m is not None else f"      {n}:\n" for n, m in models.items())
    elif isinstance(models, list):
        lines += f"    models: [{', '.join(models)}]\n"
    if model is not None:
        lines += f"    model: {model}\n"
    served = "{model}" if models else (model or name)
    return FAKE.format(name=name, port=port, mb=mb, priority=priority, shared=str(max_concurrent > 1).lower(),
                       max_concurrent=max_concurrent, always_on=str(always_on).lower(),
                       idle_stop_after_s=idle_stop_after_s, args=args, extra=lines, model=served)


def fake_ollama(name: str, port: int, models: list[str], *, mb: int = 2048, priority: int = 1,
                always_on: bool = True, idle_stop_after_s: float = 0, args: str = "") -> str:
    """A fake Ollama the reconciler starts (``always_on``: what it lists is known once it answered a probe)."""
    return FAKE_OLLAMA.format(name=name, port=port, models=",".join(models), mb=mb, priority=priority,
                              always_on=str(always_on).lower(), idle_stop_after_s=idle_stop_after_s, args=args)


def profile(*blocks: str, name: str = "gateway") -> str:
    return (f"schema_version: 1\nname: {name}\nvram_total_mb: 8192\neviction_timeout_s: 2\n"
            "services:\n" + "".join(blocks))


class GatewayRun(ApiRun):
    """One ``watch --api --gateway`` process: the API's client (:class:`ApiRun`) and the gateway's URL."""

    def __init__(self, host: Host, *extra: str, gateway: str = "127.0.0.1:0"):
        super().__init__(host, "--gateway", gateway, *extra)
        started = self.run.wait_kind("gateway.started", timeout_s=WAIT_S)
        self.gateway: str = started["url"]
        self.ollama = httpx.Client(base_url=self.gateway, timeout=60.0)
        self._sdks: list[openai.OpenAI] = []

    def openai(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        """The real OpenAI SDK, pointed at the gateway (no retries: a test sees the first answer); closed
        with this run."""
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60.0)
        sdk = openai.OpenAI(base_url=f"{self.gateway}/v1", api_key=api_key, **kwargs)
        self._sdks.append(sdk)
        return sdk

    def async_openai(self, api_key: str = "unused", **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60.0)
        return openai.AsyncOpenAI(base_url=f"{self.gateway}/v1", api_key=api_key, **kwargs)

    def close(self) -> None:
        for sdk in self._sdks:
            sdk.close()
        self.ollama.close()
        super().close()

    def model(self, name: str) -> dict[str, Any]:
        """The status document's traffic entry for model ``name``."""
        found = [m for m in self.status()["models"] if m["model"] == name]
        assert len(found) == 1, self.status()["models"]
        return found[0]

    def instance(self, service: str) -> dict[str, Any] | None:
        found = [i for i in self.status()["instances"] if i["service"] == service]
        return found[0] if found else None

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not true within {timeout_s} s; status: {self.status()}")
            time.sleep(0.05)


def upstream_stats(port: int) -> dict[str, Any]:
    """What a fake model server saw (``GET /stats``)."""
    response = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats
