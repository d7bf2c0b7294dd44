"""Bodies of the native ``/v1`` API: lease requests and answers, and the status document.

Every request body forbids unknown keys (a misspelt ``ttl`` is a 422 naming it,
not a silently ignored field) and bounds its numbers, so that no input can
overflow a date or a timer into a 500. A ``model`` must be a model name
(:mod:`reconciler.core.model_names`: what real names look like, never a path
out of a directory, an option or a control character), since it reaches a
started process's argv through the profile's templates: a 422 states the rule. The status document
(:class:`Status`) is what the dashboard and ``reconciler status`` read; its
shape is documented field by field here and in ``reconciler/api/README.md``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from reconciler.core.model_names import check_model_name
from reconciler.runtime import leasing

MAX_TTL_S = 30 * 24 * 3600.0  # a month: longer is a mistake (and would overflow nothing, but still)
MAX_WAIT_S = 600.0
DEFAULT_TTL_S = 300.0
DEFAULT_WAIT_S = 120.0

Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Holder = Annotated[str, StringConstraints(max_length=200)]


def _model_name(value: str) -> str:
    reason = check_model_name(value)
    if reason is not None:
        raise ValueError(reason)
    return value


ModelName = Annotated[str, AfterValidator(_model_name)]
"""A model name (:mod:`reconciler.core.model_names`); a 422 says which part of the rule it breaks."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- leases ---------------------------------------------------------------------------


class LeaseRequest(_Request):
    """``POST /v1/leases``: hold a service (an instance of it, healthy) for ``ttl_s`` seconds."""

    service: Name = Field(description="A service of the profile in force.")
    holder: Holder = Field("", description="Who asks (shown in the status and the events); none or blank: named "
                           "after the client's address, `client 127.0.0.1:53422`.")
    model: ModelName | None = Field(
        None, description="Model it must serve; none = whatever it serves. 1-200 ASCII letters, digits and "
        "`._:/+-`, starting with a letter or digit, no empty, `.` or `..` segment (e.g. `llama3.2:3b`).")
    ttl_s: float = Field(DEFAULT_TTL_S, gt=0, le=MAX_TTL_S, description="Lifetime once granted; renew to extend.")
    gpu: int | None = Field(None, ge=0, le=1024, description="GPU index it must be on; none = any.")
    wait_s: float = Field(
        DEFAULT_WAIT_S, ge=0, le=MAX_WAIT_S,
        description="How long to wait for a start (or a free slot) before answering 503 with the reason.",
    )
    node: Annotated[str, StringConstraints(min_length=1, max_length=63)] | None = Field(
        None, description="Cluster mode: the node that must serve it; none = wherever placement chooses.")

    def to_request(self) -> leasing.LeaseRequest:
        """The leasing service's request."""
        return leasing.LeaseRequest(service=self.service, holder=self.holder, model=self.model, ttl_s=self.ttl_s,
                                    gpu=self.gpu, wait_s=self.wait_s)


class RenewRequest(_Request):
    """``POST /v1/leases/{id}/renew``: the lease ends ``ttl_s`` from now."""

    ttl_s: float = Field(DEFAULT_TTL_S, gt=0, le=MAX_TTL_S, description="New lifetime from now.")


class LeaseOut(_Response):
    """A granted lease: where to reach the service and until when."""

    id: str
    service: str
    holder: str = ""
    url: str | None = Field(None, description="http://127.0.0.1:{host_port} of the instance; none for slots.")
    gpu: int | None = None
    mb: int = Field(
        0, description="VRAM that backs the lease: the service's reservation (max_mb), or a VRAM lease's mb."
    )
    model: str | None = None
    expires_at: str | None = Field(None, description="ISO 8601 UTC; none = until released.")
    kind: Literal["service", "vram"] = "service"
    node: str | None = Field(None, description="Cluster mode: the node that holds it (its url is that node's).")


class Released(_Response):
    released: bool = True
    id: str


class Problem(_Response):
    """Every error answer: ``detail`` says what is wrong in words (422: a list of located messages)."""

    detail: Any


# --- status -----------------------------------------------------------------------------


class GpuStatus(_Response):
    """One GPU. ``reserved_started_mb + adopted_mb + leased_mb + foreign_mb + free_mb ≤ total_mb``
    (``free_mb`` is also capped by what NVML reports free)."""

    index: int
    name: str = ""
    total_mb: int
    reserved_started_mb: int = Field(description="Reserved by instances the reconciler started (max(max_mb, used)).")
    adopted_mb: int = Field(description="Held by adopted instances (their observed usage, else max_mb).")
    leased_mb: int = Field(description="Held by VRAM leases (cf-orch /api/leases) and leased unmanaged slots.")
    foreign_mb: int = Field(description="Used by processes no instance accounts for.")
    free_mb: int = Field(description="What a start or a VRAM lease could still take now (DESIGN §3 free, less "
                         "what the last plan holds for its starts: the one figure every view uses, "
                         "reconciler.core.accounting.free_now).")
    used_mb: int = Field(description="What NVML reports used.")
    held_for: list[str] = Field(default_factory=list, description="Memory the last plan holds for an action not "
                                "yet observed (counted in reserved_started_mb, where what it waited to see freed is "
                                "left out), in words: `1024 MB held for start:tts`.")
    services_mb: dict[str, int] = Field(default_factory=dict, description="Service → MB it reserves on this GPU "
                                        "(started and adopted instances): the bar's split.")
    over_committed_mb: int = Field(
        0, description="Booked (reservations + foreign) beyond total_mb as last observed; 0 when it fits. Above 0 "
                       "is never converged: the plan evicts, or says why it cannot (an over_committed condition).")


class InstanceStatus(_Response):
    service: str
    state: str = Field(description="starting | running | stopping | failed (the inventory's state).")
    healthy: bool = Field(description="The last health probe answered 2xx.")
    url: str | None = Field(None, description="http://127.0.0.1:{host_port}, when the service has a port.")
    gpu: int | None = Field(None, description="Its GPU (the first, when it spans several).")
    gpus: list[int] | None = Field(None, description="Every GPU it spans, when more than one (gpu_count > 1).")
    origin: Literal["started", "adopted"]
    pid: int | None = None
    model: str | None = None
    leases: int = Field(description="Leases held on it now.")
    max_concurrent: int = Field(description="Most leases it may hold at once.")
    uptime_s: float | None = Field(None, description="Seconds since it entered its state.")
    priority: int | None = Field(None, description="Its service's priority (lower = more important).")
    mb: int | None = Field(None, description="MB it reserves (on each of its GPUs), as the accounting counts it.")
    last_error: str | None = Field(None, description="The last failure (start, health), when there was one.")
    stalled: bool = Field(False, description="Backing off after repeated failures (invariant 6).")


class BackoffStatus(_Response):
    """A service that failed: how often, the last error, when it is tried next. `reconciler reset` clears it."""

    failures: int = Field(description="Failures in a row (reset after a healthy spell, a launch change, or "
                          "`reconciler reset`).")
    last_error: str | None = None
    next_try_at: str | None = Field(None, description="When the next start may happen (UTC); none = now.")
    next_try_in_s: float | None = Field(None, description="Seconds until then; none = it may be tried now.")
    stalled: bool = Field(description="It failed the documented number of times in a row (5) and is retried "
                          "only at the capped interval.")
    recovered: bool = Field(False, description="It has run healthily since its last failure (the count clears "
                            "after 10 minutes of health).")


class ServiceStatus(_Response):
    """A service of the profile, running or not."""

    service: str
    priority: int
    max_mb: int
    managed: Literal["process", "docker", "unmanaged"]
    always_on: bool
    max_concurrent: int
    url: str | None = None
    running: bool = Field(description="It has a live instance.")
    description: str | None = Field(None, description="The profile's `description` of it.")
    held: str | None = Field(None, description="Why it is held stopped (`reconciler stop`, `down`, or a dependency "
                             "held so); none when it is not. `reconciler start SERVICE` lifts it.")
    backoff: BackoffStatus | None = Field(None, description="Its failures, while they count (invariant 6).")


class OperatorDone(_Response):
    """What ``stop``, ``start``, ``restart``, ``reset`` or ``down`` did."""

    service: str | None = None
    verb: str
    message: str = Field(description="What happened, in words (what the CLI prints).")
    done: bool = Field(description="It finished within the wait (false: it goes on; the message says what waits).")
    stopped: list[str] = Field(default_factory=list, description="Services whose instances this stopped.")
    left: list[str] = Field(default_factory=list, description="Adopted services left running (`down`).")


class LogLines(_Response):
    """``GET /v1/services/{name}/logs``: the last lines of a service's log file."""

    service: str
    file: str
    lines: list[str]
    size: int = Field(description="The file's size in bytes (an offset to follow it from).")


class LeaseStatus(_Response):
    """A lease in the store. ``expired``: its time is up but the reconciler has not released it yet (it does
    on its next pass); it holds nothing any more (no slot, no VRAM), and renewing it is a 404."""

    id: str
    kind: Literal["service", "vram"]
    service: str
    holder: str
    gpu: int | None
    mb: int
    model: str | None
    expires_at: str | None
    state: Literal["active", "expired"] = Field(description="active, or expired and not yet released.")
    remaining_s: float | None = Field(description="Seconds left (0 once expired); none = until released.")


class DemandStatus(_Response):
    id: str
    service: str
    holder: str
    model: str | None
    requested_at: str | None
    waited_s: float | None
    reason: str = Field(description="Why it waits: the plan's pending reason, or what the plan does for it.")


class PendingStatus(_Response):
    service: str
    demand: str | None = None
    reason: str


class ModelTraffic(_Response):
    """One model's requests through the model gateway (``serve --gateway``), since the server started."""

    model: str = Field(description="The model, as its service knows it (an alias counts for its model).")
    service: str = Field(description="The service that serves it.")
    requests: int = Field(description="Requests answered (any status).")
    errors: int = Field(description="Answered with a status of 400 or more (the gateway's or the model server's).")
    disconnected: int = Field(description="Clients that went away before their answer ended.")
    in_flight: int = Field(description="Requests holding their implicit lease now: being proxied.")
    queued: int = Field(description="Requests waiting now: for a free max_concurrent slot, a start, a switch.")
    ttfb_p50_ms: float | None = Field(description="Time to first byte, median of the recent requests, ms.")
    ttfb_p99_ms: float | None = Field(description="Time to first byte, 99th percentile of the recent requests, ms.")
    total_p50_ms: float | None = Field(description="Total time, median of the recent requests, ms.")
    total_p99_ms: float | None = Field(description="Total time, 99th percentile of the recent requests, ms.")
    caused: dict[str, int] = Field(
        description="What its requests caused: starts (`start`), model switches (`switch`), evictions (`evict`).")
    proxied: dict[str, int] = Field(
        default_factory=dict,
        description="Cluster mode: requests this node's gateway was asked for and placed on another node's "
                    "gateway, by that node (counted in full there, and only here as proxied).")


class Condition(_Response):
    """A fact about the reconciler worth a glance: ``ok`` false is something to look at."""

    type: Literal["converged", "pending", "stalled", "observed", "profile", "over_committed"]
    ok: bool
    service: str | None = None
    gpu: int | None = Field(None, description="The GPU it is about (over_committed).")
    message: str


class Status(_Response):
    """``GET /v1/status``."""

    node: str
    profile: str
    observed_at: str | None = Field(description="When the host was last observed (the last pass's snapshot).")
    now: str = Field(description="The server's clock when this document was made.")
    gpus: list[GpuStatus]
    services: list[ServiceStatus]
    instances: list[InstanceStatus]
    leases: list[LeaseStatus]
    demands: list[DemandStatus]
    pending: list[PendingStatus] = Field(description="The plan's pending items (demands and services).")
    plan: dict[str, Any] | None = Field(description="The last pass's plan, as `reconciler plan --format json`.")
    conditions: list[Condition]
    models: list[ModelTraffic] = Field(
        default_factory=list, description="The model gateway's traffic per model (empty without --gateway).")
    cluster: str | None = Field(
        None, description="The cluster this node belongs to (`serve --etcd`; `GET /v1/cluster` shows it); null on "
        "one machine.")
