"""Simulated GPUs: spec parsing, accounting, and real processes declaring usage."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from reconciler.errors import GpuBackendError
from reconciler.host.gpu import open_gpu_backend
from reconciler.host.sim import EnvScanner, SimBackend, SimGpu, _declaration, parse_sim_spec
from reconciler.testing.fixtures import spawner  # noqa: F401  (pytest fixture)


class FixedScanner:
    def __init__(self, found):
        self.found = found

    def scan(self):
        return dict(self.found)


def test_size_specs():
    assert parse_sim_spec("8192") == [SimGpu(total_mb=8192)]
    assert [g.total_mb for g in parse_sim_spec("2x24576")] == [24576, 24576]


def test_yaml_spec(tmp_path):
    path = tmp_path / "gpus.yaml"
    path.write_text("gpus:\n  - {total_mb: 8192, name: RTX 4000, foreign_mb: 300}\n  - {total_mb: 16384}\n")
    backend = open_gpu_backend(f"sim:{path}")
    backend._scanner = FixedScanner({})
    gpus = backend.read()
    assert [(g.index, g.name, g.total_mb, g.used_mb, g.free_mb, g.uuid) for g in gpus] == [
        (0, "RTX 4000", 8192, 300, 7892, "SIM-GPU-0"),
        (1, "Simulated GPU", 16384, 0, 16384, "SIM-GPU-1"),
    ]
    assert gpus[0].processes == []  # foreign memory belongs to nobody


@pytest.mark.parametrize(
    "text, message",
    [
        ("gpus: [{total_mb: 8192, foreing_mb: 3}]", "foreing_mb"),
        ("gpus: []", "gpus"),
        ("gpus: [{total_mb: 0}]", "total_mb"),
        ("gpus: [", "not valid YAML"),
    ],
)
def test_bad_yaml_spec(tmp_path, text, message):
    path = tmp_path / "gpus.yaml"
    path.write_text(text)
    with pytest.raises(GpuBackendError, match=message):
        parse_sim_spec(str(path))


@pytest.mark.parametrize("arg", ["0", "0x8192", "lots", "missing.yaml"])
def test_bad_size_specs(arg):
    with pytest.raises(GpuBackendError, match="sim:"):
        parse_sim_spec(arg)


def test_bare_sim_takes_the_profile_size():
    with pytest.raises(GpuBackendError, match="needs a size"):
        open_gpu_backend("sim")
    assert [g.total_mb for g in open_gpu_backend("sim", default_sim_mb=6144).gpus] == [6144]


def test_accounting_per_device():
    backend = SimBackend(
        [SimGpu(total_mb=8192, foreign_mb=300), SimGpu(total_mb=4096, uuid="GPU-sim-b")],
        scanner=FixedScanner({10: ("0", 5800), 11: ("GPU-sim-b", 1000), 12: ("1", 4000), 13: ("7", 99)}),
    )
    g0, g1 = backend.read()
    assert (g0.used_mb, g0.free_mb, [(p.pid, p.used_mb) for p in g0.processes]) == (6100, 2092, [(10, 5800)])
    # over-committed: used exceeds total, free is 0, every process still shows
    assert (g1.used_mb, g1.free_mb, [p.pid for p in g1.processes]) == (5000, 0, [11, 12])


class FakeProc:
    def __init__(self, env):
        self.env = env

    def environ(self):
        if isinstance(self.env, Exception):
            raise self.env
        return self.env


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RECONCILER_SIM_GPU_MB": "5800"}, ("0", 5800)),
        ({"RECONCILER_SIM_GPU_MB": "512", "CUDA_VISIBLE_DEVICES": "1,0"}, ("1", 512)),
        ({"RECONCILER_SIM_GPU_MB": "512", "CUDA_VISIBLE_DEVICES": ""}, None),  # no device at all
        ({"RECONCILER_SIM_GPU_MB": "0"}, None),
        ({"RECONCILER_SIM_GPU_MB": "many"}, None),
        ({"PATH": "/bin"}, None),
        (psutil.AccessDenied(1), None),
    ],
)
def test_declaration_from_environment(env, expected):
    assert _declaration(FakeProc(env)) == expected


def test_real_process_uses_memory_while_it_lives(spawner):
    backend = open_gpu_backend("sim:2x8192")
    svc = spawner.service(env={"RECONCILER_SIM_GPU_MB": "1500", "CUDA_VISIBLE_DEVICES": "1"})
    gpus = backend.read()
    assert (svc.pid, 1500) in [(p.pid, p.used_mb) for p in gpus[1].processes]
    assert svc.pid not in [p.pid for p in gpus[0].processes]
    assert gpus[1].used_mb >= 1500
    svc.process.terminate()
    assert svc.process.wait(5) == 0
    assert svc.pid not in [p.pid for g in backend.read() for p in g.processes]


def test_inherited_declaration_counts_once(tmp_path):
    # A parent carrying the variable starts a child that inherits it (like a server's runner).
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(30)\n"
    )
    env = {**os.environ, "RECONCILER_SIM_GPU_MB": "2000"}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        found = EnvScanner().scan()
        assert found.get(parent.pid) == ("0", 2000)
        assert child_pid not in found
    finally:
        for proc in psutil.Process(parent.pid).children():
            proc.kill()
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_cache_forgets_processes_that_ended(spawner):
    scanner = EnvScanner()
    svc = spawner.service(env={"RECONCILER_SIM_GPU_MB": "100"})
    assert scanner.scan()[svc.pid] == ("0", 100)
    assert any(pid == svc.pid for pid, _ in scanner._cache)
    svc.process.kill()
    svc.process.wait()
    assert svc.pid not in scanner.scan()
    assert not any(pid == svc.pid for pid, _ in scanner._cache)


def test_process_table_from_proc_matches_psutil(spawner):
    from reconciler.host import sim

    svc = spawner.service()
    table = sim._linux_process_table() if sim._PROC_STAT else None
    if table is None:
        pytest.skip("no /proc")
    rows = {pid: (ppid, created) for pid, ppid, created in table}
    proc = psutil.Process(svc.pid)
    assert rows[svc.pid][0] == os.getpid()
    assert rows[svc.pid][1] == pytest.approx(proc.create_time(), abs=0.02)


def test_a_process_known_to_declare_nothing_is_not_read_again(spawner, monkeypatch):
    from reconciler.host import sim

    if sim._process_entries() is None:
        pytest.skip("no /proc")
    read: list[int] = []
    real = sim.proc_stat

    def counting(pid, boot, ticks):
        read.append(int(pid))
        return real(pid, boot, ticks)

    monkeypatch.setattr(sim, "proc_stat", counting)
    scanner = EnvScanner()
    carrier = spawner.service(env={"RECONCILER_SIM_GPU_MB": "100"})
    assert scanner.scan()[carrier.pid] == ("0", 100)
    assert 1 in read  # the first scan reads every process (pid 1 is old and declares nothing here)
    read.clear()
    late = spawner.service(env={"RECONCILER_SIM_GPU_MB": "200"})
    found = scanner.scan()
    assert found[carrier.pid] == ("0", 100) and found[late.pid] == ("0", 200)  # a new carrier is found at once
    assert 1 not in read  # not read again: the same pid and /proc inode is the same process
    assert carrier.pid in read and late.pid in read  # carriers are read every scan (ppid, zombie)
    carrier.process.kill()
    carrier.process.wait()
    assert carrier.pid not in scanner.scan()


def test_a_process_whose_proc_entry_is_new_is_read_again(spawner, monkeypatch):
    # The same pid under another inode (the kernel made its /proc directory again, or the pid was reused):
    # read again, and its declaration looked up by (pid, create_time) as before.
    from reconciler.host import sim

    if sim._process_entries() is None:
        pytest.skip("no /proc")
    scanner = EnvScanner()
    scanner.scan()
    entries = sim._process_entries()
    assert entries is not None
    monkeypatch.setattr(sim, "_process_entries", lambda: [(pid, inode + 1) for pid, inode in entries])
    before = scanner.reads
    scanner.scan()
    assert scanner.reads - before >= len(entries) - 5  # every one read again (a few may have ended meanwhile)


def test_an_unchanged_listing_reads_the_carriers_only(spawner, monkeypatch):
    """The same processes listed as at the last scan (pids and /proc inodes): only the carriers are read again
    (alive, not zombies, same parent), and the answer stands; a carrier that ends is seen at the next scan."""
    from reconciler.host import sim

    if sim._process_entries() is None:
        pytest.skip("no /proc")
    carrier = spawner.service(env={"RECONCILER_SIM_GPU_MB": "100"})
    scanner = EnvScanner()
    time.sleep(sim._EXEC_GRACE_S + 0.5)  # the carrier old enough to be known
    first = scanner.scan()
    old = time.time() - sim._EXEC_GRACE_S - 0.1  # another user of the machine may have started one meanwhile

    def settled(pid: int) -> bool:
        try:
            return psutil.Process(pid).create_time() < old
        except psutil.Error:
            return False

    listing = [(pid, inode) for pid, inode in sim._process_entries() or [] if settled(pid)]
    monkeypatch.setattr(sim, "_process_entries", lambda: listing)
    scanner.scan()  # this listing, every process in it known
    before = scanner.reads
    assert scanner.scan() == first and first[carrier.pid] == ("0", 100)
    assert scanner.reads - before == len(scanner._carriers) >= 1
    carrier.process.kill()
    carrier.process.wait()
    assert carrier.pid not in scanner.scan()  # gone (or reaped): the listing's process is no carrier now


def test_a_read_with_the_same_carriers_gives_the_same_devices(spawner):
    backend = SimBackend([SimGpu(total_mb=8192)], scanner=EnvScanner(scope="reads-" + str(os.getpid())))
    first = backend.read()
    assert backend.read() == first and backend.read()[0] is first[0]
    spawner.service(env={"RECONCILER_SIM_GPU_MB": "100", "RECONCILER_SIM_SCOPE": "reads-" + str(os.getpid())})
    assert backend.read()[0].used_mb == 100


def test_an_environment_without_the_variable_is_answered_without_psutil(spawner, monkeypatch):
    from reconciler.host import sim

    if sim._process_entries() is None:
        pytest.skip("no /proc")
    plain = spawner.service(env={"RECONCILER_SIM_GPU_MB": ""})
    carrier = spawner.service(env={"RECONCILER_SIM_GPU_MB": "100"})
    monkeypatch.delenv("RECONCILER_SIM_GPU_MB", raising=False)
    made: list[int] = []
    real = psutil.Process

    def counting(pid):
        made.append(pid)
        return real(pid)

    monkeypatch.setattr(sim.psutil, "Process", counting)
    clean = spawner.start([sys.executable, "-c", "import time; time.sleep(30)"], wait=False)
    assert sim._declaration_of(clean.pid, None, None) is None and clean.pid not in made
    assert sim._declaration_of(carrier.pid, None, None) == ("0", 100) and carrier.pid in made
    assert sim._declaration_of(plain.pid, None, None) is None  # named, but no memory: read, and nothing
