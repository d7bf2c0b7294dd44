"""The framework floor for :mod:`benchmarks.bench_hotpath`: the lease routes doing nothing.

cf-orch (circuitforge-core) cannot be installed here, so the lease endpoint
is compared with the cheapest thing our stack can answer: the same HTTP
server (uvicorn, with the loop and HTTP parser ``reconciler serve`` uses)
and FastAPI, the same paths and a body of the same shape, no work behind
them. A ratio to this floor says how much of a request's cost is ours.
"""

from __future__ import annotations

import itertools
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()
_ids = itertools.count()


class Body(BaseModel):
    node_id: str = ""
    gpu_id: int = 0
    mb: int = 0
    service: str = ""
    priority: int = 2
    ttl_s: float = 0.0


@app.post("/api/leases")
async def lease(body: Body) -> dict[str, Any]:
    return {"lease": {"lease_id": str(next(_ids)), "node_id": body.node_id, "gpu_id": body.gpu_id,
                      "mb_granted": body.mb, "holder_service": body.service, "priority": body.priority,
                      "expires_at": 0.0}}


@app.delete("/api/leases/{lease_id}")
async def release(lease_id: str) -> dict[str, Any]:
    return {"released": True, "lease_id": lease_id}
