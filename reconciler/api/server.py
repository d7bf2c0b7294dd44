"""The API server inside the watch loop's process: uvicorn on the same asyncio event loop.

:class:`ApiServer` is made from ``--listen``/``--token-file`` before anything
starts (off loopback without a token it refuses: invariant 7), binds its
socket early (a port in use is a clear start-up error, not a log line), and
then serves beside the watch loop: same event loop, same runtime, same
store, no threads. Because it shares the process's file descriptors with the
loop, binding also raises the soft descriptor limit and sizes a cap on
connections from it, and uvicorn runs with a protocol that times out
requests that never finish (:mod:`.connections`): no client can starve the
loop of descriptors. The watch loop owns SIGINT/SIGTERM; on stop, waiting
lease requests are answered (503) and withdrawn, event streams end, and
uvicorn closes the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

import uvicorn

from reconciler.api.app import create_app
from reconciler.api.auth import Listen, check_exposure
from reconciler.api.connections import (
    KEEP_ALIVE_S,
    MAX_HEAD_BYTES,
    ConnectionGuard,
    GuardedSocket,
    http_parser,
    raise_nofile,
    size,
)
from reconciler.api.context import ApiContext
from reconciler.api.metrics import Metrics
from reconciler.cluster.node import ClusterNode
from reconciler.core.events import EventKind
from reconciler.core.profile import Profile
from reconciler.errors import GuardError, ReconcilerError
from reconciler.runtime import Runtime
from reconciler.runtime.controls import API_URL_META
from reconciler.runtime.leasing import Leasing
from reconciler.serving import QuietServer

STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 5.0


def http_stack() -> tuple[str, str]:
    """The event loop and HTTP parser the API runs on, as uvicorn names them (``--loop``, ``--http``).

    asyncio's own loop: uvloop saved little here (see the README's "Performance") and accepts connections
    in C, past :class:`~.connections.GuardedSocket`'s cap. httptools where installed (:func:`http_parser`)."""
    return "asyncio", http_parser()


class ApiServer:
    def __init__(self, listen: Listen, token: str | None):
        check_exposure(listen, token)
        self.listen = listen
        self.token = token
        self.socket: socket.socket | None = None
        self.context: ApiContext | None = None
        self._server: QuietServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.guard: ConnectionGuard | None = None
        self.cluster: ClusterNode | None = None  # set in cluster mode (reconciler.cli.cluster_opts)

    @property
    def url(self) -> str:
        return Listen(self.listen.host, self.port).url

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1] if self.socket is not None else self.listen.port

    def bind(self) -> None:
        """Take the address now; GuardError naming it when it cannot be had. Raises the descriptor limit and
        sizes the connection cap from it (:mod:`.connections`)."""
        host = "127.0.0.1" if self.listen.host == "localhost" else self.listen.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.guard = ConnectionGuard(size(raise_nofile()))
        # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only for sockets that say they are
        # TCP, and accepted sockets inherit it; with proto 0 every answer waits ~40 ms for a delayed ACK
        sock = GuardedSocket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.guard = self.guard
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.listen.port))
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise GuardError(f"cannot listen on {self.listen.host}:{self.listen.port}: "
                             f"{exc.strerror or exc} (choose another with --listen HOST:PORT)") from None
        self.socket = sock

    async def start(self, runtime: Runtime, profile: Callable[[], Profile]) -> None:
        if self.socket is None:
            self.bind()
        assert self.socket is not None and self.guard is not None, "bound above"
        metrics = Metrics(runtime, profile, self.guard,
                          node=lambda: self.cluster.node if self.cluster is not None else None)
        leasing = Leasing(runtime, profile, observe=metrics.observe_lease)
        self.context = ApiContext(runtime=runtime, profile=profile, leasing=leasing, metrics=metrics,
                                  base_url=self.url, cluster=self.cluster)
        leasing.start()
        metrics.start()
        config = uvicorn.Config(
            create_app(self.context, self.token), log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=2, ws="none", server_header=False, http=self.guard.protocol_class(),
            timeout_keep_alive=KEEP_ALIVE_S, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = QuietServer(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self.socket]))
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise GuardError(f"the API server on {self.url} stopped at start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise GuardError(f"the API server on {self.url} did not start within {STARTUP_TIMEOUT_S:g} s")
            await asyncio.sleep(0.01)
        sizing = self.guard.sizing
        with contextlib.suppress(ReconcilerError):  # for `reconciler down` on this state dir: where we answer
            runtime.store.set_meta(API_URL_META, self.url)
        runtime.events.publish(EventKind.API_STARTED, message=f"API on {self.url} (dashboard at {self.url}/)",
                               url=self.url, port=self.port, auth=self.token is not None, nofile=sizing.nofile,
                               max_connections=sizing.max_connections)

    async def stop(self) -> None:
        if self.context is not None:
            self.context.closing.set()
            await self.context.leasing.close()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), SHUTDOWN_TIMEOUT_S)
            except TimeoutError:
                self._server.force_exit = True
                await asyncio.gather(self._task, return_exceptions=True)
        if self.context is not None:
            await self.context.metrics.close()
        if self.socket is not None:
            self.socket.close()
            self.socket = None
