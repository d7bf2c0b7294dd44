"""What serves beside the watch loop, made from the arguments: the HTTP API and the model gateway.

``--api HOST:PORT`` (``serve``: ``--listen``) makes the API server
(:mod:`reconciler.api.server`), ``--gateway HOST:PORT`` the model gateway
(:mod:`reconciler.gateway.server`). Both read the one ``--token-file`` and
follow one rule (invariant 7): off loopback without a token they refuse to
start. The gateway takes its leases from the API's leasing service when
the API runs, so that one service grants every lease of the process.
Imported only when ``watch`` or ``serve`` runs: other commands stay light.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from reconciler.errors import GuardError

if TYPE_CHECKING:
    from reconciler.api.server import ApiServer
    from reconciler.gateway.server import GatewayServer


def api_server(args: argparse.Namespace) -> ApiServer | None:
    """The API server when ``--api``/``serve`` asks for one (refused off loopback without a token)."""
    listen = getattr(args, "api", None)
    token_file = getattr(args, "token_file", None)
    if not listen:
        if token_file and not getattr(args, "gateway", None):
            raise GuardError("--token-file is for the API and the gateway: add --api or --gateway "
                             "(or use `reconciler serve`)")
        return None
    from reconciler.api.auth import parse_listen, read_token  # the API's imports only when it is wanted
    from reconciler.api.server import ApiServer

    return ApiServer(parse_listen(listen), read_token(token_file) if token_file else None)


def gateway_server(args: argparse.Namespace, api: ApiServer | None) -> GatewayServer | None:
    """The model gateway when ``--gateway`` asks for one, leasing through ``api``'s leasing service."""
    address = getattr(args, "gateway", None)
    if not address:
        return None
    from reconciler.api.auth import check_exposure, parse_listen, read_token
    from reconciler.gateway.server import GatewayServer

    try:
        listen = parse_listen(address)
    except GuardError as exc:
        raise GuardError(str(exc).replace("--listen", "--gateway")) from None
    token_file = getattr(args, "token_file", None)
    token = read_token(token_file) if token_file else None
    check_exposure(listen, token)
    shared = (lambda: api.context.leasing if api.context is not None else None) if api is not None else None
    return GatewayServer(listen.host, listen.port, token, leasing=shared)
