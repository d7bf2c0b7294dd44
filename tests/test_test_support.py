"""The tests' own teardown: it kills only processes that are still the ones a test started.

PIDs are reused (``pid_max`` may be 32768, and a full run spawns thousands of
processes and threads): a pid left in a store must be checked against its
create_time before anything is signalled, like the reconciler itself does.
"""

from __future__ import annotations

import subprocess
import sys

import psutil

from reconciler.core.snapshot import Instance
from reconciler.host.clock import SYSTEM_CLOCK
from reconciler.store import open_store
from tests.e2e_support import Host
from tests.runtime_support import kill_started


def _record_stale(state_dir, pid: int) -> None:
    """A started instance whose pid now belongs to another process (create_time differs)."""
    with open_store(state_dir, SYSTEM_CLOCK) as store:
        stale = psutil.Process(pid).create_time() - 100
        store.put_instance(Instance(service="svc", origin="started", pid=pid, create_time=stale, state="running"))
        intent = store.begin_intent("start:svc", "start", "svc", {})
        store.update_intent(intent, {"pid": pid, "create_time": stale})


def test_teardown_leaves_a_process_that_reused_a_recorded_pid_alone(tmp_path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd="/",
                                 start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        _record_stale(tmp_path / "state", bystander.pid)
        kill_started(tmp_path / "state")
        host = Host(tmp_path / "host")
        _record_stale(host.state_dir, bystander.pid)
        host.close()
        assert bystander.poll() is None, "teardown killed a process that was not the one the store recorded"
    finally:
        bystander.kill()
        bystander.wait(10)
