"""The state snapshot: everything the planner knows besides the profile (DESIGN §2).

``reconciler observe`` writes one from the live host; tests, golden scenarios
and CI plans read one. Only ``format_version``, ``node``, ``now`` and ``gpus``
are required. Times are timezone-aware datetimes (UTC when written by us).

No ``from __future__ import annotations`` here: see :mod:`.profile` (issue 10).
"""


from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from reconciler.core.empty import new_dict, new_list

NonNegInt = Annotated[int, Field(ge=0)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


GPUS_DESCRIPTION = (
    "Every GPU it spans, ascending, when more than one (a service with gpu_count > 1); `gpu` is the first. "
    "Omitted for one GPU."
)


class Spanning(BaseModel):
    """A record on one GPU (``gpu``) or several (``gpus``, ascending, ``gpu`` their first).

    ``gpus`` is kept and written only when there are several, so a
    single-GPU record reads and writes exactly as before (``gpu: 0, gpus:
    [0]`` reads as ``gpu: 0``); :attr:`gpu_set` is the one way to ask "which GPUs",
    whatever the record's shape. Instances, leases and plan actions are such
    records.
    """

    if TYPE_CHECKING:  # declared by each subclass, where its fields' order is the format's
        gpu: int | None
        gpus: list[int] | None

    @field_validator("gpus", check_fields=False)
    @classmethod
    def _ascending_from_gpu(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("gpus lists no GPU; leave it out for a record on one GPU (or none)")
        unique = sorted(set(v))
        if "gpu" in info.data and info.data["gpu"] != unique[0]:
            raise ValueError(f"gpu is {info.data['gpu']} but gpus starts with {unique[0]}: "
                             "gpu must be given, and be the first of gpus")
        return unique if len(unique) > 1 else None

    @model_serializer(mode="wrap")
    def _omit_single(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("gpus") is None:
            data.pop("gpus", None)
        return data

    @property
    def gpu_set(self) -> tuple[int, ...]:
        """The GPUs it is on, ascending: ``gpus``, else ``(gpu,)``, else none."""
        if self.gpus:
            return tuple(self.gpus)
        return (self.gpu,) if self.gpu is not None else ()


class GpuProcess(_Strict):
    """A process using GPU memory, as NVML reports it."""

    pid: int = Field(ge=0, description="OS process id using this GPU.")
    used_mb: NonNegInt = Field(description="GPU memory it uses, MB (0 when NVML cannot tell).")


class Gpu(_Strict):
    """One GPU as NVML sees it."""

    index: NonNegInt = Field(description="NVML device index.")
    uuid: str = Field("", description="NVML device UUID.")
    name: str = Field("", description="Device name.")
    total_mb: NonNegInt = Field(description="Total memory, MB.")
    used_mb: NonNegInt = Field(0, description="Used memory, MB, as NVML reports it.")
    free_mb: NonNegInt | None = Field(None, description="Free memory, MB; defaults to total − used.")
    processes: list[GpuProcess] = Field(default_factory=new_list, description="Per-process usage.")

    @property
    def nvml_free_mb(self) -> int:
        return self.free_mb if self.free_mb is not None else max(0, self.total_mb - self.used_mb)


class Process(_Strict):
    """An OS process of interest: a service's, or one holding a service's port."""

    pid: int = Field(ge=0, description="OS process id.")
    create_time: float = Field(description="Process start, seconds since the epoch (psutil).")
    ppid: int | None = Field(
        None, ge=0, description="Parent pid; GPU memory of a child (e.g. a vLLM worker) counts for its instance."
    )
    cmdline: list[str] = Field(default_factory=new_list, description="argv.")
    listening: list[Port] = Field(default_factory=new_list, description="TCP ports it listens on.")


class Probe(_Strict):
    """The last health probe of a service."""

    healthy: bool = Field(description="GET http://127.0.0.1:{host_port}{health_path} answered 2xx.")
    status: int | None = Field(None, description="HTTP status, none when nothing answered.")
    error: str | None = Field(None, description="Why it failed, when it did.")
    models: list[str] | None = Field(
        None, description="An Ollama's installed models (what its GET /api/tags listed); none for other services."
    )


class Launch(_Strict):
    """What an instance was started with; a difference from the profile's launch spec means a restart."""

    argv: list[str] = Field(description="What was executed (exec_path + filled args).")
    cwd: str = Field("", description="Working directory as written in the profile ('' = default).")
    env: dict[str, str] = Field(default_factory=new_dict, description="Environment as written in the profile.")
    port: Port | None = Field(None, description="The spec's port.")
    image: str | None = Field(None, description="Docker image, for containers.")


InstanceState = Literal["starting", "running", "stopping", "failed"]


class Instance(_Strict, Spanning):
    """A service instance in the reconciler's own inventory."""

    service: str = Field(description="Service name in the profile.")
    gpu: NonNegInt | None = Field(
        None, description="GPU index it is placed on (the first, when it spans several); none for CPU services.")
    gpus: list[NonNegInt] | None = Field(None, description=GPUS_DESCRIPTION)
    origin: Literal["started", "adopted"] = Field(description="Started by us, or adopted (never signalled).")
    pid: int | None = Field(None, ge=0, description="Main process id, when known.")
    create_time: float | None = Field(None, description="Its create_time, identifying it with the pid.")
    model: str | None = Field(None, description="Model it serves.")
    launch: Launch | None = Field(None, description="Launch spec it was started with (started instances).")
    state: InstanceState = Field("running", description="Lifecycle state.")
    since: AwareDatetime | None = Field(None, description="When it entered that state.")
    idle_since: AwareDatetime | None = Field(None, description="When its last lease ended, if idle.")
    container: str | None = Field(None, description="Docker container name, for containers.")
    restart: Literal["when_idle", "now"] | None = Field(
        None, description="An operator asked for a restart: once it is idle, or now even if busy."
    )
    keep_alive_s: float | None = Field(
        None,
        description="How long it stays once idle, as the last gateway request's Ollama `keep_alive` said; "
        "overrides the service's idle_stop_after_s: 0 = stopped as soon as it is idle, negative = never "
        "idle-stopped. None = the service's idle_stop_after_s.",
    )


class Lease(_Strict, Spanning):
    """A granted lease: a holder is using a service (or VRAM) until it ends."""

    id: str = Field(min_length=1, description="Lease id.")
    kind: Literal["service", "vram"] = Field(
        "service",
        description="`service`: holds a profile service (a slot of max_concurrent). `vram`: a bare VRAM "
        "reservation of `mb` on `gpu` for an application that runs its own process (cf-orch /api/leases).",
    )
    service: str = Field(description="Service it holds (for a `vram` lease: the holder's service name).")
    holder: str = Field("", description="Who holds it.")
    gpu: NonNegInt | None = Field(None, description="GPU index (the first, when its service spans several).")
    gpus: list[NonNegInt] | None = Field(None, description=GPUS_DESCRIPTION)
    mb: NonNegInt = Field(0, description="MB it accounts for (a VRAM lease without a service instance; per GPU).")
    model: str | None = Field(None, description="Model it was granted for.")
    expires_at: AwareDatetime | None = Field(None, description="When it ends; none = until released.")


class Demand(_Strict):
    """A lease request waiting for its service to be ready."""

    id: str = Field(min_length=1, description="Demand (future lease) id.")
    service: str = Field(description="Service it waits for.")
    holder: str = Field("", description="Who asks.")
    model: str | None = Field(None, description="Model it needs; none = any.")
    gpu: NonNegInt | None = Field(None, description="GPU it asks for; none = any.")
    requested_at: AwareDatetime | None = Field(None, description="When it was asked for.")
    ttl_s: float | None = Field(300, gt=0, description="Lifetime of the lease once granted; none = until released.")


class Snapshot(_Strict):
    """Everything the planner knows about the host besides the profile."""

    format_version: int = Field(description="Snapshot format version; only 1 is supported.")
    node: str = Field(min_length=1, description="Node name.")
    now: AwareDatetime = Field(description="The planner's clock.")
    gpus: list[Gpu] = Field(description="GPUs as NVML sees them; empty on a CPU-only host.")
    processes: list[Process] = Field(default_factory=new_list, description="OS processes of interest.")
    probes: dict[str, Probe] = Field(default_factory=new_dict, description="Health probe results by service.")
    instances: list[Instance] = Field(default_factory=new_list, description="The reconciler's own inventory.")
    leases: list[Lease] = Field(default_factory=new_list, description="Granted leases.")
    demands: list[Demand] = Field(default_factory=new_list, description="Lease requests waiting for their service.")
    held: list[str] = Field(
        default_factory=new_list,
        description="Services an operator holds stopped (`reconciler stop`, `reconciler down`): not wanted, "
        "whatever asks for them (their leases are released, their demands refused), until `reconciler start`; "
        "what depends on them is not wanted either. An adopted instance is never stopped.",
    )

    @field_validator("format_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"unsupported format_version {v}; this reconciler reads format_version 1")
        return v

    def gpu(self, index: int) -> Gpu | None:
        return next((g for g in self.gpus if g.index == index), None)

    def process(self, pid: int) -> Process | None:
        return next((p for p in self.processes if p.pid == pid), None)

