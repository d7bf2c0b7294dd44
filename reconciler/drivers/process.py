"""The process driver: start a service as a local process, stop only what we started.

``start`` executes the launch spec (:func:`reconciler.core.launch.launch_spec`)
as an argv list — one value, one token, never a shell — in its own session and
process group, with stdout and stderr appended to ``<state_dir>/logs/<service>.log``.
The environment is the reconciler's own, plus the profile's ``env``, plus
``CUDA_VISIBLE_DEVICES=<gpu>`` (the variable is configurable, e.g. for ROCm)
when placed on a GPU — ``CUDA_VISIBLE_DEVICES=0,1`` for a service spanning
GPUs 0 and 1 (``gpu_count: 2``) — plus ``RECONCILER_SIM_GPU_MB=<ceiling>`` (its
model's ``max_mb``, else the service's) when the GPU is simulated (the sim
backend attributes memory to processes carrying it, on each listed GPU), plus
two markers that make the process findable without the store:

* ``RECONCILER_INTENT=<state_dir>#<intent id>`` when started under an intent:
  a reconciler that died between the launch and recording the pid finds its
  process again by it (:meth:`ProcessDriver.find_started`);
* ``RECONCILER_INSTANCE=<JSON>``, always: the (real) state directory, the
  service, the GPU and model it was started with, and of its launch spec
  what ``/proc`` cannot tell — the ``cwd`` as written in the profile, the
  *names* (never the values) of the profile's ``env`` keys, and the port
  (and ``gpus``, every GPU of a service spanning several).
  A reconciler whose inventory lost the process (``state.db`` deleted, moved
  aside, restored from an old copy) finds it again by it
  (:meth:`ProcessDriver.find_ours`) and rebuilds what it runs: ``argv`` from
  its command line, ``cwd`` (the profile's words when they name the
  directory it runs in, else the directory itself), ``env`` from its
  environment for the marked keys. Anything that differs from the profile
  then restarts it, like any launch spec that changed. Only a process of
  this user (real uid), alive, whose marker names *this* state directory is
  ever taken as ours; of a launch's processes (children inherit the
  markers) the group leader, else the oldest.

``stop`` enforces invariant 1. It signals nothing unless the instance's origin
is ``started`` and a live process with its pid has its ``create_time`` (±1 s);
a pid now used by someone else means our process is gone. Otherwise: SIGTERM
to the process group, wait up to ``timeout_s``, re-check the leader's identity
(its pid taken by another process since: nothing more is sent), SIGKILL the
group, confirm that nothing of the group is left (zombies aside), then wait
for ``memory_freed``.

The launched process is not tied to the reconciler: it keeps running when the
reconciler exits (a restarted reconciler finds it again by pid and create_time).
While we are its parent, a daemon thread reaps it so it never lingers as a zombie.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from pydantic import ValidationError

from reconciler.core.clock import Clock, iso_utc
from reconciler.core.identity import same_start
from reconciler.core.profile import ProcessSpec
from reconciler.core.snapshot import Instance, Launch
from reconciler.drivers.base import Driver, LaunchRequest, StartedProcess, StopResult, Waiter
from reconciler.errors import DriverError
from reconciler.host.clock import SYSTEM_CLOCK

SIM_GPU_MB_ENV = "RECONCILER_SIM_GPU_MB"
INTENT_ENV = "RECONCILER_INTENT"
INSTANCE_ENV = "RECONCILER_INSTANCE"
KILL_CONFIRM_S = 5.0


def is_alive(pid: int, create_time: float) -> bool:
    """True when ``pid`` is a live (non-zombie) process that started at ``create_time`` (the identity rule)."""
    try:
        proc = psutil.Process(pid)
        if not same_start(create_time, proc.create_time()):
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _reused(pid: int, create_time: float) -> bool:
    """Whether ``pid`` now belongs to a process other than the one started at ``create_time``.

    No process with that pid at all is not reuse: the members of a group whose
    leader exited still hold its id (Linux does not reuse it meanwhile), so
    the group can still be signalled.
    """
    try:
        return not same_start(create_time, psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell: never signal on a doubt


def _whereabouts(pid: int, create_time: float) -> str:
    try:
        other = psutil.Process(pid).create_time()
    except psutil.Error:
        return "is not running any more"
    return f"is not running any more: pid {pid} now belongs to a process started at {other:.2f}, not {create_time:.2f}"


@dataclass(frozen=True)
class FoundProcess:
    """A live process that this state directory's reconciler started, as its marker and ``/proc`` tell it."""

    service: str
    pid: int
    create_time: float
    gpu: int | None
    model: str | None
    launch: Launch  # what it runs: argv from its command line, cwd, the marked env keys, the port
    launched: str  # which launch it belongs to (its RECONCILER_INTENT marker, or service@process group)
    gpus: tuple[int, ...] = ()  # every GPU of a service spanning several; () for one


def _marker(raw: str) -> dict[str, Any] | None:
    """A ``RECONCILER_INSTANCE`` value as a dict with a service name, or None when it is not one."""
    try:
        marker = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("service"), str) or not marker["service"]:
        return None
    return marker


class ProcessDriver(Driver):
    """Starts and stops local processes; logs and the default cwd live under ``state_dir``."""

    kind = "process"

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        gpu_env: str = "CUDA_VISIBLE_DEVICES",
        *,
        waiter: Waiter | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.state_dir = Path(state_dir)
        self.gpu_env = gpu_env
        self.waiter = waiter or Waiter()
        self.clock = clock
        self._exit_codes: dict[int, int] = {}

    def log_path(self, service_name: str) -> Path:
        return self.state_dir / "logs" / f"{service_name}.log"

    def exit_code(self, pid: int) -> int | None:
        """The exit status of a process this driver started and saw end (negative = killed by a signal)."""
        return self._exit_codes.get(pid)

    def intent_marker(self, intent_id: int) -> str:
        """The ``RECONCILER_INTENT`` value of a process started under ``intent_id`` (the state dir
        tells two reconcilers apart)."""
        return f"{os.path.realpath(self.state_dir)}#{intent_id}"

    def instance_marker(self, request: LaunchRequest) -> str:
        """The ``RECONCILER_INSTANCE`` value of a process started for ``request`` (see the module docstring)."""
        launch = request.launch
        marker: dict[str, Any] = {
            "state_dir": os.path.realpath(self.state_dir), "service": request.service, "gpu": request.gpu,
            "model": request.model, "cwd": launch.cwd, "env": sorted(launch.env), "port": launch.port,
        }
        if len(request.devices) > 1:
            marker["gpus"] = list(request.devices)
        return json.dumps(marker, sort_keys=True)

    def environment(self, request: LaunchRequest) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(SIM_GPU_MB_ENV, None)  # only what we launch under sim declares simulated memory
        for marker in (INTENT_ENV, INSTANCE_ENV):  # nor does it inherit a marker of ours
            env.pop(marker, None)
        env.update(request.launch.env)
        if request.devices:
            env[self.gpu_env] = request.device_list
            if request.sim:
                env[SIM_GPU_MB_ENV] = str(request.spec.ceiling_mb(request.model))  # the model's own, if any
        if request.intent is not None:
            env[INTENT_ENV] = self.intent_marker(request.intent)
        env[INSTANCE_ENV] = self.instance_marker(request)
        return env

    def find_started(self, intent_id: int) -> tuple[int, float] | None:
        """``(pid, create_time)`` of a live process of this user started under ``intent_id``, if any.

        For a start whose pid was never recorded (the reconciler died right after
        the launch). Its children inherit the marker: the group leader (our
        launch is one) or else the oldest is the one we started.
        """
        marker, uid = self.intent_marker(intent_id), os.getuid()
        found: list[tuple[bool, float, int]] = []
        for proc in psutil.process_iter(["uids", "status"]):
            try:
                if proc.info["uids"] is None or proc.info["uids"].real != uid:
                    continue
                if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.environ().get(INTENT_ENV) != marker:
                    continue
                found.append((os.getpgid(proc.pid) != proc.pid, proc.create_time(), proc.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ProcessLookupError):
                continue
        if not found:
            return None
        _, create_time, pid = min(found)
        return pid, create_time

    def find_ours(self) -> list[FoundProcess]:
        """Every launch of this state directory's reconciler still running, one process each, by service.

        Of a launch's processes (its children inherit the markers) the group
        leader — our launch is one — or else the oldest stands for it.
        """
        state_dir, uid = os.path.realpath(self.state_dir), os.getuid()
        launches: dict[str, list[tuple[bool, float, int, dict[str, Any], dict[str, str], psutil.Process]]] = {}
        for proc in psutil.process_iter(["uids", "status"]):
            try:
                if proc.info["uids"] is None or proc.info["uids"].real != uid:
                    continue
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                environ = proc.environ()
                marker = _marker(environ.get(INSTANCE_ENV, ""))
                if marker is None or marker.get("state_dir") != state_dir:
                    continue  # not ours, or another state directory's: never taken
                group = os.getpgid(proc.pid)
                launch_key = environ.get(INTENT_ENV) or f"{marker['service']}@{group}"
                member = (group != proc.pid, proc.create_time(), proc.pid, marker, environ, proc)
                launches.setdefault(launch_key, []).append(member)
            except (psutil.Error, OSError):
                continue
        found = []
        for launch_key, members in launches.items():
            _, create_time, pid, marker, environ, proc = min(members, key=lambda m: m[:3])
            try:
                launch = self._launch_of(marker, proc.cmdline(), proc.cwd(), environ)
                gpu, model, gpus = marker.get("gpu"), marker.get("model"), marker.get("gpus") or []
                if not (gpu is None or (isinstance(gpu, int) and gpu >= 0)) or not isinstance(model, str | None):
                    continue
                if not isinstance(gpus, list) or not all(isinstance(g, int) and g >= 0 for g in gpus):
                    continue
                span = tuple(sorted(set(gpus))) if gpu is not None and len(set(gpus)) > 1 else ()
                if span and span[0] != gpu:
                    continue
            except (psutil.Error, ValidationError, TypeError):
                continue
            found.append(FoundProcess(marker["service"], pid, create_time, gpu, model, launch, launch_key, span))
        return sorted(found, key=lambda f: (f.service, f.create_time, f.pid))

    def _launch_of(self, marker: dict[str, Any], argv: list[str], cwd: str, environ: dict[str, str]) -> Launch:
        """The launch spec a found process runs (its marker says what ``/proc`` cannot)."""
        written = marker.get("cwd") or ""
        expected = Path(written) if written else self.state_dir
        if os.path.realpath(expected) != os.path.realpath(cwd):
            written = cwd  # it runs elsewhere: a difference, which restarts it
        keys = marker.get("env") or []
        env = {k: environ[k] for k in keys if isinstance(k, str) and k in environ}
        return Launch(argv=argv, cwd=written, env=env, port=marker.get("port"))

    async def start(self, request: LaunchRequest) -> StartedProcess:
        service_name, service, launch = request.service, request.spec, request.launch
        if not isinstance(service.managed, ProcessSpec):
            raise DriverError(f"service {service_name} is not a managed process; the process driver cannot start it")
        cwd = Path(launch.cwd) if launch.cwd else self.state_dir
        env = self.environment(request)
        log_path = self.log_path(service_name)
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DriverError(f"cannot create log directory {log_path.parent}: {exc.strerror or exc}") from None
        executable = self._resolve(service_name, launch.argv[0], cwd, env)
        if not cwd.is_dir():
            raise DriverError(f"service {service_name}: working directory {cwd} does not exist")
        try:
            with open(log_path, "ab") as log:
                shown = request.shown_argv if request.shown_argv is not None else launch.argv  # no secrets
                header = f"--- {iso_utc(self.clock.now())} reconciler: starting {service_name}: {json.dumps(shown)}\n"
                log.write(header.encode())
                log.flush()
                proc = subprocess.Popen(
                    launch.argv,
                    executable=executable,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument or a variable
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise DriverError(f"service {service_name}: cannot run {launch.argv[0]}: {reason}") from None
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error as exc:  # pragma: no cover - the child is ours and unreaped
            raise DriverError(f"service {service_name}: started pid {proc.pid} but cannot read it: {exc}") from None
        threading.Thread(target=self._reap, args=(proc,), name=f"reap-{proc.pid}", daemon=True).start()
        return StartedProcess(pid=proc.pid, create_time=create_time, launch=launch, log_path=log_path)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        self._exit_codes[proc.pid] = proc.wait()

    @staticmethod
    def _resolve(service_name: str, exec_path: str, cwd: Path, env: dict[str, str]) -> str:
        if "/" in exec_path:
            path = Path(exec_path) if os.path.isabs(exec_path) else cwd / exec_path
            if not path.is_file():
                raise DriverError(f"service {service_name}: executable {exec_path} not found")
            if not os.access(path, os.X_OK):
                raise DriverError(f"service {service_name}: {exec_path} is not executable")
            return str(path)
        found = shutil.which(exec_path, path=env.get("PATH", os.defpath))
        if found is None:
            raise DriverError(f"service {service_name}: executable {exec_path} not found on PATH")
        return found

    def is_alive(self, pid: int, create_time: float) -> bool:
        return is_alive(pid, create_time)

    async def _stop(self, instance: Instance, timeout_s: float) -> StopResult:
        name = instance.service
        if instance.origin != "started":
            return StopResult("refused", f"{name} is {instance.origin}, not started by us: it is never signalled")
        pid, create_time = instance.pid, instance.create_time
        if pid is None or create_time is None:
            return StopResult("refused", f"{name} has no (pid, create_time) to identify its process")
        if not is_alive(pid, create_time):
            return StopResult("gone", f"{name} (pid {pid}) {_whereabouts(pid, create_time)}; nothing signalled")
        try:
            group = os.getpgid(pid) == pid
        except ProcessLookupError:
            return StopResult("gone", f"{name} (pid {pid}) exited; nothing signalled")

        def send(sig: signal.Signals) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig) if group else os.kill(pid, sig)

        async def ended() -> bool:
            return not is_alive(pid, create_time) and not (group and _group_alive(pid))

        send(signal.SIGTERM)
        if await self.waiter.until(ended, timeout_s):
            return StopResult("stopped", f"{name} (pid {pid}) exited after SIGTERM", ["SIGTERM"])
        if not is_alive(pid, create_time) and (not group or _reused(pid, create_time)):
            # it ended since the last look, and its pid may already be someone else's: not signalled again
            return StopResult("stopped", f"{name} (pid {pid}) exited after SIGTERM; SIGKILL not sent", ["SIGTERM"])
        send(signal.SIGKILL)
        if await self.waiter.until(ended, KILL_CONFIRM_S):
            return StopResult(
                "killed", f"{name} (pid {pid}) ignored SIGTERM for {timeout_s:g} s; killed", ["SIGTERM", "SIGKILL"]
            )
        raise DriverError(f"{name} (pid {pid}) is still running after SIGKILL")
