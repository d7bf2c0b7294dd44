"""``./dev`` from another directory: the user's paths mean what they typed."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dev_reconciler_resolves_paths_from_where_it_was_called(tmp_path: Path) -> None:
    (tmp_path / "my.yaml").write_text("schema_version: 1\nname: mine\nservices: {}\n")
    done = subprocess.run([str(ROOT / "dev"), "reconciler", "validate", "my.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ok: my.yaml" in done.stdout


def test_dev_down_stops_what_the_demo_started(tmp_path: Path) -> None:
    from tests.e2e_support import Host, alive, profile_text, service_block

    with Host(tmp_path) as host:
        host.write(profile_text(service_block("alpha", host.port())))
        run = host.watch()
        run.wait_converged()
        pid = host.pids()["alpha"]
        run.kill()
        down = subprocess.run([str(ROOT / "dev"), "down", "--state-dir", str(host.state_dir)], env=host.env(),
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopped alpha" in down.stdout and not alive(pid)
