"""What every route needs: the runtime, the profile in force, the leasing service, metrics, where we listen."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from reconciler.api.metrics import Metrics
from reconciler.cluster.node import ClusterNode
from reconciler.core.profile import Profile
from reconciler.runtime import Runtime
from reconciler.runtime.leasing import Leasing


@dataclass
class ApiContext:
    runtime: Runtime
    profile: Callable[[], Profile]  # the profile in force now (a saved edit replaces it)
    leasing: Leasing
    metrics: Metrics
    base_url: str  # http://host:port of this server (cf-orch's agent_url)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    cluster: ClusterNode | None = None  # cluster mode (--etcd): placement across nodes (reconciler.cluster)

    @property
    def node(self) -> str:
        return self.runtime.node


async def context(request: Request) -> ApiContext:
    """The routes' dependency. Async on purpose: FastAPI runs a plain ``def`` dependency in a worker
    thread, a thread hop per request that cost about a third of a lease request's CPU (issue 10)."""
    ctx: ApiContext = request.app.state.context  # set by create_app
    return ctx


async def disconnected(request: Request) -> None:
    """Finishes when the client goes away (its body was read already: what comes next is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
