"""The gateway's listener inside the watch loop's process: uvicorn on the same asyncio event loop.

:class:`GatewayServer` is the loop's second companion (``serve --gateway
HOST:PORT``), beside the API: same process, same event loop, same runtime,
no threads. Made from the address and the token before anything starts — off
loopback without a token it refuses (invariant 7, the API's rule) — it binds
its socket early (a port in use is a clear start-up error), then serves
:class:`~.app.Gateway`.

It uses the runtime's leasing service: the API's, handed over by whoever
wires the two (``leasing``), so that one service grants every lease of the
process; only when no API runs (``watch --gateway``) does it start one of
its own. On stop it closes first (the companions stop in reverse order):
uvicorn stops taking requests and closes the connections, which cancels what
is in flight and releases its leases; then the pools close.

In a cluster (``cluster``, set by the wiring when ``--etcd`` is given) the
gateway places requests across nodes and lists every node's models
(:mod:`.across`); its routing table is handed to the cluster companion to
publish.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

import uvicorn

from reconciler.cluster.node import ClusterNode
from reconciler.core.events import EventKind
from reconciler.core.profile import Profile
from reconciler.errors import GuardError
from reconciler.gateway.app import Gateway
from reconciler.runtime import Runtime
from reconciler.runtime.leasing import Leasing
from reconciler.serving import QuietServer

STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 5.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewayServer:
    """The model gateway as a companion of the watch loop."""

    def __init__(self, host: str, port: int, token: str | None, *,
                 leasing: Callable[[], Leasing | None] | None = None):
        if not is_loopback(host) and token is None:
            raise GuardError(
                f"refusing to serve the gateway on {host}:{port} without a token: off loopback, anyone who can "
                "reach it could start and stop services. Give --token-file FILE (clients then send "
                "'Authorization: Bearer <token>', an OpenAI SDK's api_key), or listen on 127.0.0.1")
        self.host = host
        self.requested_port = port
        self.token = token
        self._shared = leasing or (lambda: None)
        self._own: Leasing | None = None
        self.socket: socket.socket | None = None
        self.gateway: Gateway | None = None
        self._server: QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.cluster: ClusterNode | None = None  # set by whoever wires a cluster node (``--etcd``)

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1] if self.socket is not None else self.requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def bind(self) -> None:
        """Take the address now; GuardError naming it when it cannot be had."""
        host = "127.0.0.1" if self.host == "localhost" else self.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only for sockets that say they are TCP
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.requested_port))
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise GuardError(f"cannot serve the gateway on {self.host}:{self.requested_port}: "
                             f"{exc.strerror or exc} (choose another with --gateway HOST:PORT)") from None
        self.socket = sock

    async def start(self, runtime: Runtime, profile: Callable[[], Profile]) -> None:
        if self.socket is None:
            self.bind()
        leasing = self._shared()
        if leasing is None:
            leasing = self._own = Leasing(runtime, profile)
            leasing.start()
        self.gateway = Gateway(runtime, profile, leasing, self.token, self.cluster)
        self.gateway.start()
        if self.gateway.across is not None and self.cluster is not None:  # published with the node's state
            self.cluster.serve_models(self.gateway.across.models)
        config = uvicorn.Config(
            self.gateway, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2,
            ws="none", server_header=False, date_header=False, timeout_keep_alive=30,
        )
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = QuietServer(config)
        assert self.socket is not None, "bound above"
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self.socket]))
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise GuardError(f"the gateway on {self.url} stopped at start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise GuardError(f"the gateway on {self.url} did not start within {STARTUP_TIMEOUT_S:g} s")
            await asyncio.sleep(0.01)
        runtime.events.publish(
            EventKind.GATEWAY_STARTED,
            message=f"model gateway on {self.url} (OpenAI: {self.url}/v1, Ollama: {self.url})",
            url=self.url, port=self.port, auth=self.token is not None)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_TIMEOUT_S)
            except TimeoutError:
                self._server.force_exit = True
                await asyncio.gather(self._task, return_exceptions=True)
        if self.gateway is not None:
            await self.gateway.close()
        if self._own is not None:
            await self._own.close()
        if self.socket is not None:
            self.socket.close()
            self.socket = None


__all__ = ["GatewayServer", "is_loopback"]
