"""The profile: what the operator wants on this host (DESIGN §1).

A strict superset of the cf-orch GPU profile format v1: every cf-orch field is
accepted with its cf-orch default, and every one of them has an effect here.
Unknown keys are errors (``extra="forbid"``); the loader turns pydantic's errors
into located ``file:line:col`` messages with a "did you mean" hint. Checks that
span services (``depends_on`` targets, cycles) live in :mod:`.checks`.

These models are pure data: reading files and the environment (``${VAR}``
references) is the loader's job, in :mod:`reconciler.loading`.

Like :mod:`.snapshot` and :mod:`.plan`, this module has no ``from __future__ import annotations``: with it,
pydantic reads every field's annotation from its text, compiling each one, at every start (11 M
instructions of a tiny ``reconciler plan`` for the three modules, issue 10); without it the annotations are
objects already, and the models, their fields and JSON schemas are the same (so a forward reference here is
written in quotes).
"""


import ipaddress
from pathlib import PurePath
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
)

from reconciler.core.empty import new_dict, new_list
from reconciler.core.templates import PLACEHOLDERS, find_placeholders, split_template

Port = Annotated[int, Field(ge=1, le=65535)]
ServiceName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=63)]


def _model_name(value: str) -> str:
    if value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"model name {value!r} starts or ends with a space or holds a control character; "
                         "write it as clients send it")
    return value


# a model's name as a client sends it and as {model} receives it: a tag (llama3.2:3b), a repository
# (Qwen/Qwen2.5-3B) or a file path
ModelName = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_model_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_template(value: str, field: str) -> str:
    unknown = sorted(set(find_placeholders(value)) - set(PLACEHOLDERS))
    if unknown:
        import difflib  # for a message's "did you mean" only
        close = difflib.get_close_matches(unknown[0], PLACEHOLDERS, n=1)
        hint = f"did you mean {{{close[0]}}}? " if close else ""
        known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
        raise ValueError(f"unknown placeholder {{{unknown[0]}}} in {field}; {hint}known placeholders: {known}")
    return value


def _check_argv_template(value: str, field: str) -> str:
    try:
        split_template(value)
    except ValueError as exc:
        raise ValueError(f"{field} cannot be split into arguments: {exc}") from None
    return _check_template(value, field)


class ProcessSpec(_Strict):
    """Run the service as a local process we start (or adopt, when it already runs)."""

    type: Literal["process"] = Field(description="Run as a local process.")
    exec_path: str = Field(
        description="Executable to run (absolute, or relative to the profile's directory). "
        "`${VAR}` / `${VAR:-default}` read the environment when the profile is loaded."
    )
    args_template: str = Field(
        "",
        description="Arguments, split like a shell would (no shell is ever used); placeholders "
        "such as {port}, {gpu_id}, {gpu_ids}, {model} are filled inside each token.",
    )
    cwd: str | None = Field(None, description="Working directory; none = the reconciler's state directory.")
    env: dict[str, str] = Field(default_factory=new_dict, description="Extra environment variables.")
    port: Port | None = Field(None, description="Port the service listens on; fills {port}.")
    host_port: Port | None = Field(
        None, description="Port probed on 127.0.0.1 for health and adoption; defaults to `port`."
    )
    adopt: bool = Field(
        False,
        description="Adopt a healthy listener already on `host_port` instead of starting a second "
        "one. Adopted processes are never signalled.",
    )
    health_path: str = Field("/health", description="HTTP path probed for health (GET, 2xx = healthy).")

    @field_validator("args_template")
    @classmethod
    def _args_placeholders(cls, v: str) -> str:
        return _check_argv_template(v, "args_template")

    @field_validator("env")
    @classmethod
    def _env_placeholders(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            _check_template(value, f"env.{key}")
        return v

    @property
    def probe_port(self) -> int | None:
        return self.host_port or self.port

    @property
    def url_host(self) -> str:
        """The host part of the service's URL on this machine: a process is reached on loopback."""
        return LOOPBACK


LOOPBACK = "127.0.0.1"


class DockerSpec(_Strict):
    """Run the service as a Docker container (labelled as ours)."""

    type: Literal["docker"] = Field(description="Run as a Docker container.")
    image: str = Field(description="Image reference, e.g. `ghcr.io/org/app:1.2`.")
    port: Port | None = Field(None, description="Container port; fills {port}.")
    host_port: Port | None = Field(None, description="Host port published for `port`; defaults to `port`.")
    host_ip: str = Field(
        LOOPBACK,
        description="Host address `host_port` is published on (`docker run -p host_ip:host_port:port`): "
        "127.0.0.1 by default, so the container is reachable from this machine only, like the API. "
        "`0.0.0.0` (or `::`) publishes on every interface; a node's own address publishes there only "
        "(the reconciler then probes it there).",
    )
    command_template: str = Field("", description="Command arguments; placeholders filled inside each token.")
    volumes: list[str] = Field(default_factory=new_list, description="Volume mounts, `host:container[:mode]`.")
    env: dict[str, str] = Field(default_factory=new_dict, description="Environment variables in the container.")
    runtime: str | None = Field(None, description="Docker runtime, e.g. `nvidia`.")
    ipc: str | None = Field(None, description="IPC mode, e.g. `host`.")
    health_path: str = Field("/health", description="HTTP path probed for health on `host_port`.")

    @field_validator("command_template")
    @classmethod
    def _command_placeholders(cls, v: str) -> str:
        return _check_argv_template(v, "command_template")

    @field_validator("host_ip")
    @classmethod
    def _host_ip(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v.strip("[]")))
        except ValueError:
            raise ValueError(f"host_ip must be an IP address such as 127.0.0.1, 0.0.0.0 or ::1, not {v!r}") from None

    @property
    def probe_port(self) -> int | None:
        return self.host_port or self.port

    @property
    def url_host(self) -> str:
        """Where the published port answers from this machine, as a URL's host: ``host_ip``, or loopback
        when it is published on every interface (``0.0.0.0``, ``::``); an IPv6 address in brackets."""
        address = ipaddress.ip_address(self.host_ip)
        if address.is_unspecified:
            return LOOPBACK if address.version == 4 else "[::1]"
        return f"[{address}]" if address.version == 6 else str(address)

    @property
    def publish(self) -> str | None:
        """``docker run -p``'s value, ``host_ip:host_port:port`` (None without a port)."""
        if not self.port:
            return None
        address = ipaddress.ip_address(self.host_ip)
        ip = f"[{address}]" if address.version == 6 else str(address)
        return f"{ip}:{self.host_port or self.port}:{self.port}"

    @property
    def adopt(self) -> bool:
        return False


Managed = Annotated[ProcessSpec | DockerSpec, Field(discriminator="type")]


class ModelSpec(_Strict):
    """One model a service serves, under its name (what fills {model}) and its aliases."""

    max_mb: int | None = Field(
        None, ge=0, description="VRAM ceiling while this model is loaded; overrides the service's max_mb "
        "(a 7B and a 1B behind one `llama-server -m {model}` need different memory). None = the service's."
    )
    aliases: list[ModelName] = Field(
        default_factory=new_list, description="Other names clients may ask for it by; the gateway forwards its name."
    )


NO_MODEL_SPEC = ModelSpec()


def _models_shape(value: object) -> str:
    return "list" if isinstance(value, list) else "mapping"


# `models:` is a list of names or a mapping name → ModelSpec; the shape picks one (so an error in a list
# is not also reported as "expected a mapping")
Models = Annotated[
    Annotated[list[ModelName], Tag("list")] | Annotated[dict[ModelName, ModelSpec | None], Tag("mapping")],
    Discriminator(_models_shape),
]


class Service(_Strict):
    """One service slot: its VRAM ceiling, priority, and how to run it."""

    description: str | None = Field(None, description="What it is, in words: shown on the dashboard and in status.")
    max_mb: int = Field(ge=0, description="VRAM ceiling in MB, reserved when the service starts. 0 = CPU only.")
    priority: int = Field(ge=0, description="Lower number = more important (1 beats 2 beats 4).")
    shared: bool = Field(False, description="One instance serves several leases at once (up to max_concurrent).")
    max_concurrent: int = Field(1, ge=1, description="Most leases held at once; more requests queue.")
    always_on: bool = Field(False, description="Keep running at all times; never idle-stopped, never evicted.")
    idle_stop_after_s: float = Field(0, ge=0, description="Stop after this long with no lease; 0 = never.")
    backend: str | None = Field(None, description="Informational (cf-orch), carried through.")
    consumers: list[str] = Field(default_factory=new_list, description="Informational (cf-orch), carried through.")
    managed: Managed | None = Field(
        None, description="How to run it; none = an unmanaged slot (accounted, never started)."
    )
    depends_on: list[ServiceName] = Field(
        default_factory=new_list, description="Start after these are healthy; stop before them."
    )
    gpus: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="GPU indexes it may be placed on; none = any. With `gpu_count`, list at least that many."
    )
    gpu_count: int = Field(
        1, ge=1, le=64,
        description="GPUs it needs at once (tensor parallel: vLLM --tensor-parallel-size, llama.cpp --split-mode, "
        "SGLang --tp): `max_mb` is reserved on each. {gpu_ids} fills in the chosen indexes, comma-separated and "
        "ascending (`0,1`); {gpu_id} is the first. The process driver sets CUDA_VISIBLE_DEVICES=0,1, the docker "
        "driver --gpus \"device=0,1\".",
    )
    model: str | None = Field(None, description="Default model, fills {model} when a lease names none.")
    models: Models | None = Field(
        None,
        description="The models it serves, for the gateway: a list of names, or a mapping name → {max_mb, aliases}. "
        "With {model} in its launch, a request for one of them starts (or switches) it with that model; without, "
        "one instance serves them all. None: it serves one model, its `model` (or, without {model} in its launch "
        "and without `model`, its name); an Ollama also serves what its /api/tags lists, live.",
    )
    api: Literal["openai", "ollama"] | None = Field(
        None,
        description="What the service speaks, for the gateway: `openai` (llama-server, vLLM…: /v1/chat/completions…) "
        "or `ollama` (/api/chat…). None: `ollama` for an Ollama, else `openai`. Ollama-protocol requests to an "
        "`openai` service are translated.",
    )
    request_wait_s: float | None = Field(
        None, gt=0,
        description="How long a gateway request waits for this service to serve its model (a start, a model "
        "switch, evictions, a free max_concurrent slot) before it is answered 503 with the plan's reason. None: "
        "start_timeout_s + 30.",
    )
    max_queued: int = Field(
        64, ge=0,
        description="Gateway requests that may wait for this service beyond the max_concurrent in flight; "
        "more are answered 429 with Retry-After.",
    )
    pull: bool = Field(
        False,
        description="For an Ollama: a lease or gateway request for a model it has not pulled pulls it (POST "
        "/api/pull, progress as `ollama.pull` events) and is granted once it is there, instead of being refused "
        "at once with the list of installed models.",
    )
    start_timeout_s: float = Field(300, gt=0, description="Give up a start that is not healthy after this long.")
    probe_interval_s: float = Field(5, gt=0, description="Health probe interval once running.")
    probe_timeout_s: float = Field(2, gt=0, description="Timeout of one health probe.")
    failure_threshold: int = Field(
        3, ge=1, description="Consecutive failed probes before a running instance is unhealthy."
    )
    restart_when_busy: bool = Field(
        False,
        description="An edit that changes the launch spec of a busy instance (one holding leases) restarts it at "
        "once, cutting off its lease holders; by default the restart waits until the instance is idle, and new "
        "lease requests wait for the restarted one.",
    )

    @field_validator("gpu_count")
    @classmethod
    def _enough_gpus(cls, v: int, info: ValidationInfo) -> int:
        if v == 1:
            return v
        if info.data.get("max_mb") == 0:
            raise ValueError(f"gpu_count is {v} but max_mb is 0: a service without GPU memory uses no GPU; "
                             "give max_mb (per GPU) or drop gpu_count")
        gpus = info.data.get("gpus")
        if gpus is not None and len(set(gpus)) < v:
            listed = ", ".join(map(str, sorted(set(gpus)))) or "none"
            raise ValueError(f"gpu_count is {v} but gpus lists only {len(set(gpus))} ({listed}); "
                             f"list at least {v} GPU indexes or lower gpu_count")
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _models_shape(cls, v: object) -> object:
        if v is not None and not isinstance(v, list | dict):
            raise ValueError("expected a list of model names, or a mapping name → {max_mb, aliases}")
        return v

    @property
    def probe_port(self) -> int | None:
        return self.managed.probe_port if self.managed else None

    @property
    def url_host(self) -> str:
        """The host of the service's URL on this machine (loopback, or a container's ``host_ip``)."""
        return self.managed.url_host if self.managed else LOOPBACK

    @property
    def base_url(self) -> str | None:
        """``http://{url_host}:{probe_port}``: where it answers on this machine (None without a port)."""
        port = self.probe_port
        return f"http://{self.url_host}:{port}" if port else None

    @property
    def adoptable(self) -> bool:
        return isinstance(self.managed, ProcessSpec) and self.managed.adopt

    @property
    def model_specs(self) -> dict[str, ModelSpec]:
        """``models:`` as a mapping (a list's names get no ceiling or aliases of their own); {} when not given."""
        if self.models is None:
            return {}
        if isinstance(self.models, list):
            return dict.fromkeys(self.models, NO_MODEL_SPEC)
        return {name: spec or NO_MODEL_SPEC for name, spec in self.models.items()}

    def ceiling_mb(self, model: str | None) -> int:
        """The VRAM ceiling while ``model`` is loaded: its own ``max_mb`` when it has one, else the service's."""
        if model is not None and self.models is not None:
            specs = self.model_specs
            spec = specs.get(model) or next((s for s in specs.values() if model in s.aliases), None)
            if spec is not None and spec.max_mb is not None:
                return spec.max_mb
        return self.max_mb

    @property
    def wait_s(self) -> float:
        """How long a gateway request waits for it (``request_wait_s``, else ``start_timeout_s`` + 30)."""
        return self.request_wait_s if self.request_wait_s is not None else self.start_timeout_s + 30


def is_ollama(service: Service) -> bool:
    """Ollama, by backend name, executable, image, or its characteristic health path.

    An adopted Ollama is the one adopted service whose memory can be freed
    without killing it (unload its models through its API), so it alone may be evicted.
    """
    managed = service.managed
    if (service.backend or "").lower() == "ollama":
        return True
    if isinstance(managed, ProcessSpec) and PurePath(managed.exec_path).name.startswith("ollama"):
        return True
    if isinstance(managed, DockerSpec) and "ollama" in managed.image.split(":")[0].lower():
        return True
    return managed is not None and managed.health_path.rstrip("/") == "/api/tags"


class Node(_Strict):
    """A node of a cluster profile (cf-orch); informational on a single host."""

    node_id: str = Field(description="Node name.")
    agent_url: str | None = Field(None, description="Agent URL (cf-orch).")
    gpus: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="GPU indexes on that node.")


class Profile(_Strict):
    """A GPU (or CPU) profile: which services may run on this host, and how."""

    schema_version: int = Field(description="Profile format version; only 1 is supported.")
    name: str = Field(min_length=1, description="Profile name, e.g. `single-gpu-8gb`.")
    description: str | None = Field(None, description="Free text.")
    vram_total_mb: int | None = Field(
        None, ge=0, description="VRAM this profile is written for; picks the profile and sizes simulated GPUs. "
        "Omitted for CPU profiles."
    )
    eviction_timeout_s: float = Field(10, ge=0, description="SIGTERM → SIGKILL grace period when stopping.")
    services: dict[ServiceName, Service] = Field(default_factory=new_dict, description="The service slots, by name.")
    model_size_hints: dict[str, str | int | float | None] = Field(
        default_factory=new_dict, description="Informational (cf-orch), carried through."
    )
    nodes: list[Node] = Field(default_factory=new_list, description="Cluster nodes (cf-orch); informational here.")

    @field_validator("schema_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"unsupported schema_version {v}; this reconciler reads schema_version 1")
        return v

    _expansions: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def expansions(self) -> dict[str, str]:
        """Value → ``${NAME}`` for every environment variable the loader expanded (never to be printed)."""
        return dict(self._expansions)

    def remember_expansions(self, expansions: dict[str, str]) -> None:
        """Recorded by the loader (:mod:`reconciler.loading.environment`); see :mod:`.redaction`."""
        self._expansions = dict(expansions)
