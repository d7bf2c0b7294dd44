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


SERVICE = """\
  {name}:
    max_mb: {mb}
    priority: {priority}
    shared: true
    max_concurrent: {slots}
    always_on: {always_on}
    start_timeout_s: 15
    probe_interval_s: 0.5
    probe_timeout_s: 0.5
    managed:
      type: process
      exec_path: "{python}"
      args_template: "-m reconciler.testing.service --port {{port}} --name {name}{args}"
      port: {port}
"""


def service_block(name: str, port: int, *, mb: int, priority: int = 3, slots: int = 2, always_on: bool = False,
                  python: str = "${RECONCILER_PYTHON}", args: str = "") -> str:
    """A shared fake service of a node's profile (``args``: more of the service's own arguments)."""
    return SERVICE.format(name=name, mb=mb, priority=priority, slots=slots, always_on=str(always_on).lower(),
                          port=port, python=python, args=f" {args}" if args else "")


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
