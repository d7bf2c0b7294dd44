"""Cluster test support: the etcd of :mod:`reconciler.testing.etcd`, skipping with a clear message without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.testing import etcd as _etcd
from reconciler.testing.etcd import EtcdCluster

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
