"""``reconciler install-service`` writes a unit systemd accepts; ``serve`` speaks sd_notify under it.

The unit is checked by ``systemd-analyze verify`` (skipped where systemd's
tools are absent): no error and no warning. The readiness protocol is checked
against a real ``reconciler serve`` given a ``NOTIFY_SOCKET`` the test listens
on, as systemd would: ``READY=1`` once it serves, ``STATUS=`` lines, and
``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.api_support import profile, service
from tests.e2e_support import Host, host  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True, timeout=60)


def test_the_unit_runs_serve_with_notify_restart_and_killmode_process(tmp_path: Path) -> None:
    done = _cli("install-service", "--profile", str(ROOT / "demo" / "profile.yaml"), "--gpu", "sim:8192", "--print")
    assert done.returncode == 0, done.stderr
    unit = done.stdout
    assert "Type=notify" in unit and "Restart=on-failure" in unit and "KillMode=process" in unit
    assert f"--profile {ROOT / 'demo' / 'profile.yaml'}" in unit and "--state-dir /var/lib/reconciler" in unit
    assert "StateDirectory=reconciler" in unit and "WantedBy=multi-user.target" in unit
    gateway = _cli("install-service", "--profile", str(ROOT / "demo" / "profile.yaml"), "--gateway", "127.0.0.1:7701",
                   "--print")
    assert gateway.returncode == 0 and "--gateway 127.0.0.1:7701" in gateway.stdout, gateway.stderr
    written = _cli("install-service", "--profile", str(ROOT / "demo" / "profile.yaml"), "--user",
                   "--unit-dir", str(tmp_path), "--name", "gpu-services")
    assert written.returncode == 0, written.stderr
    path = tmp_path / "gpu-services.service"
    text = path.read_text()
    assert "WantedBy=default.target" in text and "StateDirectory" not in text
    assert "systemctl --user daemon-reload && systemctl --user enable --now gpu-services.service" in written.stdout
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the unit's syntax is not verified here")
    for unit_file in (path, tmp_path / "system.service"):
        if unit_file.name == "system.service":
            unit_file.write_text(unit)
        verify = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True,
                                timeout=60)
        assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


def test_a_missing_profile_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    done = _cli("install-service", "--profile", str(tmp_path / "nope.yaml"), "--unit-dir", str(tmp_path))
    assert done.returncode == 1 and "no such file" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_serve_speaks_sd_notify(host: Host, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(0.2)
    host.write(profile(service("svc", host.port(), mb=512, always_on=True)))
    run = host.watch("--api", "127.0.0.1:0", extra_env={"NOTIFY_SOCKET": address})
    messages: list[str] = []

    def receive_until(word: str, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(word in m for m in messages):
            assert time.monotonic() < deadline, f"no {word} within {timeout_s} s; got {messages}"
            with contextlib.suppress(TimeoutError):
                messages.append(listener.recv(4096).decode())

    try:
        receive_until("READY=1")
        assert any(m.startswith("READY=1") for m in messages)
        run.wait_kind("api.started")  # ready means the API serves
        receive_until("STATUS=profile api: converged")
        run.process.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert run.process.wait(15) == 0
    finally:
        listener.close()
