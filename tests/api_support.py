"""Driving ``reconciler watch --api`` (= ``serve``) over real HTTP on loopback.

:class:`ApiRun` is one server process of a :class:`tests.e2e_support.Host`
(its own tmp directory, state directory, simulation scope, free ports):
``watch --api 127.0.0.1:0`` picks a free port, announced by the
``api.started`` event. Tests talk to it with httpx; teardown (the Host's)
kills the server and every service it started.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.e2e_support import Host, WatchRun

WAIT_S = 15.0

SERVICE = """\
  {name}:
    max_mb: {mb}
    priority: {priority}
    shared: {shared}
    max_concurrent: {max_concurrent}
    always_on: {always_on}
    idle_stop_after_s: {idle_stop_after_s}
    start_timeout_s: 10
    probe_interval_s: 0.5
    probe_timeout_s: 0.5
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.service --port {{port}} --name {name} {args}"
      port: {port}
"""


def service(name: str, port: int, *, mb: int = 1024, priority: int = 2, max_concurrent: int = 1,
            always_on: bool = False, idle_stop_after_s: float = 0, args: str = "") -> str:
    return SERVICE.format(name=name, port=port, mb=mb, priority=priority, shared=str(max_concurrent > 1).lower(),
                          max_concurrent=max_concurrent, always_on=str(always_on).lower(),
                          idle_stop_after_s=idle_stop_after_s, args=args)


def profile(*blocks: str, name: str = "api") -> str:
    return (f"schema_version: 1\nname: {name}\nvram_total_mb: 8192\neviction_timeout_s: 2\n"
            "services:\n" + "".join(blocks))


# runs the rest of its argv with RLIMIT_NOFILE (soft and hard) set to argv[1]: a host with few descriptors
LIMITED = ("import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def limited_watch(host: Host, nofile: int, *extra: str, resync_s: float = 30) -> WatchRun:
    """``host.watch(*extra)``, but in a process whose file descriptor limit is ``nofile`` (soft = hard)."""
    argv = [
        sys.executable, "-c", LIMITED, str(nofile),
        "-m", "reconciler", "watch", "--profile", str(host.profile), "--gpu", "sim:8192",
        "--state-dir", str(host.state_dir), "--events", "json", "--resync", str(resync_s), *extra,
    ]
    run = WatchRun(argv, host.env(), host.root / f"watch-{len(host.runs)}.stderr")
    host.runs.append(run)
    return run


class ApiRun:
    """One ``watch --api`` process and an HTTP client for it (``nofile``: its descriptor limit)."""

    def __init__(self, host: Host, *extra: str, listen: str = "127.0.0.1:0", nofile: int | None = None):
        self.host = host
        self.run = (host.watch("--api", listen, *extra) if nofile is None
                    else limited_watch(host, nofile, "--api", listen, *extra))
        started = self.run.wait_kind("api.started", timeout_s=WAIT_S)
        self.started = started
        self.url: str = started["url"]
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def close(self) -> None:
        self.http.close()

    def status(self) -> dict[str, Any]:
        response = self.http.get("/v1/status")
        response.raise_for_status()
        return response.json()

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = WAIT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not true within {timeout_s} s; status: {status}")
            time.sleep(0.05)

    def wait_converged(self, timeout_s: float = WAIT_S) -> dict:
        return self.wait_status(
            lambda s: s["plan"] is not None and not s["plan"]["actions"] and not s["pending"]
            and all(i["state"] == "running" for i in s["instances"]), "converged", timeout_s)

    def lease(self, service: str, **body: Any) -> httpx.Response:
        return self.http.post("/v1/leases", json={"service": service, **body})

    def release_all(self) -> None:
        for lease in self.status()["leases"]:
            self.http.delete(f"/v1/leases/{lease['id']}")

    def assert_clean(self) -> None:
        """Nothing left behind: no lease, no demand."""
        status = self.wait_status(lambda s: not s["leases"] and not s["demands"], "no leases and no demands", 5)
        assert status["leases"] == [] and status["demands"] == []
