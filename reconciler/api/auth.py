"""Where the API listens, and who may change things (invariant 7).

The API listens on ``127.0.0.1:7700`` unless told otherwise. Listening on an
address outside loopback (``127.0.0.0/8``, ``::1``) needs a token file
(``--token-file``): without one the server refuses to start. Whenever a token
is configured — on loopback too — every call must carry
``Authorization: Bearer <token>``, else it gets 401 (with
``WWW-Authenticate: Bearer``) and changes and shows nothing; the exceptions
are the reads in :data:`PUBLIC`, which show nothing of the host.

Why reads too: the event log replays what the reconciler did, and events may
carry a service's environment values (a start's launch spec, an error's
output); the status document, the plan, the leases and the metrics show the
host's layout, who holds what and where each service answers. Someone who
may not change things has no business reading them either, and one rule
("with a token, everything needs it but the page") is easier to get right
than a list of which reads are harmless. So the public reads are: the
dashboard's page and its static files (code, no data: the page asks for the
token and sends it with every call), ``/api/health`` (cf-orch's liveness
check, ``{"status": "ok"}``) and the API's own description
(``/openapi.json``, ``/docs``). Prometheus sends the token with
``authorization: {credentials_file: …}`` in its scrape config.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from reconciler.errors import GuardError

DEFAULT_LISTEN = "127.0.0.1:7700"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READING = frozenset({"GET", "HEAD"})
PUBLIC = frozenset({"/", "/api/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
PUBLIC_PREFIXES = ("/static/",)  # the dashboard's files
MUTATING_DETAIL = ("this call changes things and needs 'Authorization: Bearer <token>' "
                   "(the token in the server's --token-file)")
READING_DETAIL = ("this server has a token: reading it needs 'Authorization: Bearer <token>' (the token in the "
                  "server's --token-file); only the dashboard page, /api/health and /openapi.json are open")


def is_public(method: str, path: str) -> bool:
    """A read anyone may make when a token is set: the page, its files, health, the API's description."""
    return method in READING and (path in PUBLIC or path.startswith(PUBLIC_PREFIXES))


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(text: str) -> Listen:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (loopback) or ``PORT``; raises GuardError when malformed."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise GuardError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}") from None
    if not 0 <= port <= 65535:
        raise GuardError(f"--listen {text!r}: port {port} is out of range 0-65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise GuardError(f"--listen {text!r}: {host!r} is not an IP address (or localhost)") from None
    return Listen(host, port)


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (surrounding whitespace dropped); GuardError when unreadable or empty."""
    file = Path(path)
    try:
        token = file.read_text().strip()
        mode = file.stat().st_mode
    except OSError as exc:
        raise GuardError(f"--token-file {file}: cannot read it: {exc.strerror or exc}") from None
    if not token:
        raise GuardError(f"--token-file {file} is empty; put a secret token in it")
    if any(c.isspace() for c in token):
        raise GuardError(f"--token-file {file}: the token must be one word (no spaces or newlines inside)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"reconciler: warning: {file} is readable by other users; chmod 600 it", file=sys.stderr)
    return token


def check_exposure(listen: Listen, token: str | None) -> None:
    """Refuse to listen off loopback without a token (invariant 7)."""
    if not listen.loopback and token is None:
        raise GuardError(
            f"refusing to listen on {listen.host}:{listen.port} without a token: off loopback, anyone who can "
            "reach it could start and stop services. Give --token-file FILE (every call but the dashboard's "
            "page then needs 'Authorization: Bearer <token>'), or listen on 127.0.0.1"
        )


class BearerAuth:
    """ASGI middleware: when a token is set, every call but the :func:`is_public` reads needs
    ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.token is not None and not is_public(scope["method"], scope["path"])
                and not self._authorized(scope, self.token)):
            detail = MUTATING_DETAIL if scope["method"] in MUTATING else READING_DETAIL
            body = json.dumps({"detail": detail}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="reconciler"')]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _authorized(scope: Scope, token: bytes) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)
        return False
