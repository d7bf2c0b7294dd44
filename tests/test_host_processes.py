"""Processes of interest with real processes: listeners, pids, lineage, vanished and denied."""

from __future__ import annotations

import os
import subprocess

import psutil
import pytest

from reconciler.host import processes
from reconciler.host.processes import collect_processes, describe, listeners
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)


def test_listener_on_a_port_of_interest(spawner):
    svc = spawner.service(name="listener")
    other = spawner.service(name="not-of-interest")
    found = {p.pid: p for p in collect_processes([svc.port], [])}
    assert list(found) == [svc.pid]
    process = found[svc.pid]
    assert process.listening == [svc.port]
    assert process.create_time == psutil.Process(svc.pid).create_time()
    assert process.ppid == os.getpid()
    assert "reconciler.testing.service" in process.cmdline
    assert other.pid not in found


def test_pids_are_included_and_vanished_ones_skipped(spawner):
    alive = spawner.service()
    gone = spawner.service()
    gone.process.kill()
    gone.process.wait()
    found = collect_processes([], [alive.pid, gone.pid])
    assert [p.pid for p in found] == [alive.pid]
    assert found[0].listening == [alive.port]
    assert describe(gone.pid) is None


def test_lineage_up_to_an_instance():
    # this test process (the "instance") → sh → sleep (the "GPU user")
    shell = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        leaf = None
        for _ in range(500):
            children = psutil.Process(shell.pid).children()
            if children:
                leaf = children[0].pid
                break
            psutil.wait_procs([], timeout=0.01)
        assert leaf is not None
        found = {p.pid: p for p in collect_processes([], [], lineage_of=[leaf], roots=[os.getpid()])}
        assert {leaf, shell.pid, os.getpid()} <= set(found)
        assert found[leaf].ppid == shell.pid and found[shell.pid].ppid == os.getpid()
        unrelated = collect_processes([], [], lineage_of=[leaf], roots=[999_999_999])
        assert unrelated == []
    finally:
        for child in psutil.Process(shell.pid).children():
            child.kill()
        shell.kill()
        shell.wait()


def test_hidden_cmdline_keeps_the_listener(spawner, monkeypatch):
    svc = spawner.service()

    def denied(self):
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "cmdline", denied)
    [process] = collect_processes([svc.port], [])
    assert (process.pid, process.cmdline, process.listening) == (svc.pid, [], [svc.port])


def test_listeners_without_permission_for_the_system_table(spawner, monkeypatch):
    svc = spawner.service()

    def denied(kind="inet"):
        raise psutil.AccessDenied()

    monkeypatch.setattr(processes, "_listening_sockets", lambda: None)  # no netlink: the psutil path
    monkeypatch.setattr(processes.psutil, "net_connections", denied)
    assert listeners()[svc.pid] == {svc.port}


@pytest.mark.skipif(processes._listening_sockets() is None, reason="netlink sock_diag is Linux-only")
def test_netlink_listeners_match_psutil(spawner):
    import socket

    svc = spawner.service()
    with socket.socket(socket.AF_INET6) as v6, socket.socket() as v4, socket.socket() as idle:
        v6.bind(("::1", 0))
        v6.listen()
        v4.bind(("0.0.0.0", 0))
        v4.listen()
        idle.bind(("127.0.0.1", 0))  # bound, not listening: not a listener
        expected: dict[int, set[int]] = {}
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.pid is not None and conn.laddr:
                expected.setdefault(conn.pid, set()).add(conn.laddr.port)
        found = listeners()
        ours = {v6.getsockname()[1], v4.getsockname()[1]}
    assert found[svc.pid] == expected[svc.pid] == {svc.port}
    assert found[os.getpid()] == expected[os.getpid()] == ours  # IPv4 and IPv6; the bound socket is not listed


@pytest.mark.parametrize("pid", [999_999_999])
def test_unknown_pid(pid):
    assert describe(pid) is None
