"""Cluster test support: the etcd of :mod:`reconciler.testing.etcd`, skipping with a clear message without one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.testing import etcd as _etcd
from reconciler.testing.etcd import EtcdCluster
from tests.e2e_support import Host, WatchRun

__all__ = ["EtcdCluster", "etcd_binary", "make_tls"]


def etcd_binary() -> str:
    """The etcd server binary, or skip the test saying how to get one."""
    found = _etcd.find_etcd()
    if found is None:
        pytest.skip(_etcd.MISSING)
    return found


def make_tls(root: Path) -> dict[str, str]:
    try:
        return _etcd.make_tls(root)
    except _etcd.EtcdMissing as exc:
        pytest.skip(str(exc))


def node_profile(node: str, total_mb: int, blocks: Iterable[str]) -> str:
    """A node's own profile (``name: node-<node>``): its GPU's size and its services' blocks."""
    return (f"schema_version: 1\nname: node-{node}\nvram_total_mb: {total_mb}\neviction_timeout_s: 2\n"
            "services:\n" + "".join(blocks))


@dataclass
class NodeProcess:
    """One node of a test cluster: its host (tmp dir, state, sim scope), its services' ports, its server."""

    name: str
    host: Host
    ports: dict[str, int]
    run: WatchRun | None = None
