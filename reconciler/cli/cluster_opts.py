"""The cluster options of ``watch``/``serve`` and the cluster companion made from them.

    --etcd URL[,URL…]   join a cluster whose shared state is in etcd (also $RECONCILER_ETCD);
                        without it nothing changes: one machine, no etcd
    --cluster NAME      the cluster (one key prefix per cluster; default "default")
    --advertise HOST    how other machines reach this node's API and services (default 127.0.0.1)
    --etcd-cacert/--etcd-cert/--etcd-key FILE   TLS to etcd, with a client certificate
    --etcd-ttl S        the node's etcd lease TTL (default 10): a dead node leaves placement within it
    --etcd-user USER    etcd authentication; the password comes from $RECONCILER_ETCD_PASSWORD
                        or --etcd-password-file (never from the command line, where `ps` shows it)

``--node NAME`` (already an option of ``watch``) names the node; in a cluster it must be
unique and other than the default ``local``. See :mod:`reconciler.cluster.node`.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.errors import GuardError

if TYPE_CHECKING:
    from reconciler.api.server import ApiServer
    from reconciler.cluster.node import ClusterNode
    from reconciler.gateway.server import GatewayServer

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (etcd)")
    group.add_argument("--etcd", metavar="URL[,URL…]", default=None,
                       help="join a cluster through these etcd members (also $RECONCILER_ETCD); off unless given")
    group.add_argument("--cluster", default="default", metavar="NAME", help="cluster name (default: default)")
    group.add_argument("--advertise", default="127.0.0.1", metavar="HOST",
                       help="host other nodes and clients use to reach this node (default: 127.0.0.1)")
    group.add_argument("--etcd-cacert", metavar="FILE", help="CA bundle that signed the etcd members' certificates")
    group.add_argument("--etcd-cert", metavar="FILE", help="client certificate for etcd (with --etcd-key)")
    group.add_argument("--etcd-key", metavar="FILE", help="client certificate's private key")
    group.add_argument("--etcd-user", metavar="USER",
                       help="etcd user; the password from $RECONCILER_ETCD_PASSWORD or --etcd-password-file")
    group.add_argument("--etcd-password-file", metavar="FILE", help="a file holding the etcd user's password")
    group.add_argument("--etcd-ttl", type=int, default=10, metavar="S",
                       help="TTL of this node's etcd lease: a dead node leaves placement within it (default: 10)")


def cluster_node(args: argparse.Namespace, api: ApiServer | None,
                 gateway: GatewayServer | None = None) -> ClusterNode | None:
    """The cluster companion when ``--etcd`` (or ``$RECONCILER_ETCD``) asks for one; GuardError on bad options.
    With a gateway, its URL goes into the node's record and the gateway places requests across nodes."""
    urls = getattr(args, "etcd", None) or os.environ.get("RECONCILER_ETCD")
    if not urls:
        return None
    from reconciler.cluster.etcd import Etcd, EtcdError, Tls
    from reconciler.cluster.node import ClusterNode

    for flag, value in (("--node", args.node), ("--cluster", args.cluster)):
        if not NAME.match(value):
            raise GuardError(f"{flag} {value!r}: use 1-63 letters, digits, '.', '_' or '-'")
    if api is None:
        raise GuardError("a cluster node serves the API (other nodes forward requests to it): use `reconciler "
                         "serve`, or `watch --api`")
    if args.node == "local":
        raise GuardError("a cluster node needs a name of its own: add --node NAME (unique in the cluster)")
    if not 2 <= args.etcd_ttl <= 300:
        raise GuardError(f"--etcd-ttl {args.etcd_ttl}: choose 2 to 300 seconds")
    if bool(args.etcd_cert) != bool(args.etcd_key):
        raise GuardError("--etcd-cert and --etcd-key go together: give both or neither")
    for flag in ("etcd_cacert", "etcd_cert", "etcd_key", "etcd_password_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise GuardError(f"--{flag.replace('_', '-')} {path}: no such file")
    password = os.environ.get("RECONCILER_ETCD_PASSWORD")
    if args.etcd_password_file:
        password = Path(args.etcd_password_file).read_text().strip()
    if args.etcd_user and password is None:
        raise GuardError("--etcd-user needs a password: set $RECONCILER_ETCD_PASSWORD or --etcd-password-file")
    tls = Tls(args.etcd_cacert, args.etcd_cert, args.etcd_key) if (args.etcd_cacert or args.etcd_cert) else None
    try:
        etcd = Etcd([u.strip() for u in urls.split(",") if u.strip()], tls=tls, user=args.etcd_user,
                    password=password)
    except EtcdError as exc:
        raise GuardError(str(exc)) from None
    node = ClusterNode(etcd, cluster=args.cluster, node=args.node, advertise=args.advertise,
                       api_url=lambda: api.url if api.socket is not None else None, token=api.token,
                       ttl_s=args.etcd_ttl,
                       gateway_url=(lambda: gateway.url if gateway.socket is not None else None) if gateway else None)
    api.cluster = node
    if gateway is not None:
        gateway.cluster = node
    return node
