"""The HTTP API: leases, status, plan, events and metrics, plus cf-orch compatible routes.

``reconciler serve`` (or ``watch --api``) runs the watch loop and this API in
one asyncio process. HTTP only lives here: routes, auth, bodies, status
codes. What a lease request *does* is the runtime's leasing service
(:mod:`reconciler.runtime.leasing`); the loop is :mod:`reconciler.runtime.loop`.
Modules, one concept each:

- :mod:`.models`     request and response bodies of the native ``/v1`` API (pydantic)
- :mod:`.status`     the ``GET /v1/status`` document the dashboard and ``reconciler status`` read
- :mod:`.refusals`   a refused lease request → its status code
- :mod:`.native`     the ``/v1`` routes
- :mod:`.compat`     the cf-orch compatible ``/api/...`` routes and their bodies
- :mod:`.events`     ``GET /v1/events``: the event bus as server-sent events
- :mod:`.metrics`    ``GET /metrics``: Prometheus
- :mod:`.auth`       listen addresses, the bearer token (invariant 7): with one, every call but the page needs it
- :mod:`.limits`     request body size limit
- :mod:`.bodies`     JSON bodies are text: a lone surrogate is a 422; answers that always encode
- :mod:`.app`        the application factory
- :mod:`.connections` request timeouts and a connection cap sized from RLIMIT_NOFILE (the loop keeps its fds)
- :mod:`.server`     uvicorn in the watch loop's event loop (the loop's companion)
- :mod:`.context`    what every route needs (the runtime, the profile in force, leasing, metrics)
- :mod:`.client`     a small client for the CLI commands (status, lease, why)

Why FastAPI: it is Starlette (small, asyncio, streaming responses for SSE)
plus request validation and an OpenAPI document generated from the same
pydantic models that validate the bodies, so ``/openapi.json`` cannot drift
from the code. cf-orch's coordinator is FastAPI too, so error bodies have the
shape its clients already handle (``{"detail": ...}``; validation errors are
422 with a list of located messages).
"""
