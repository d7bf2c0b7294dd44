"""Services an operator holds stopped (the snapshot's ``held``), as the planner sees them; and the backoff's
"stalled" tag, which a healthy spell clears at once while the count stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reconciler.core.backoff import DEFAULT_POLICY, Backoff, after_failure, after_healthy
from reconciler.core.planner import plan
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot

NOW = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)


def _service(port: int, **extra: object) -> dict[str, object]:
    return {"max_mb": 1000, "priority": 2, "always_on": True,
            "managed": {"type": "process", "exec_path": "/bin/true", "args_template": "--port {port}", "port": port},
            **extra}


PROFILE = Profile.model_validate({"schema_version": 1, "name": "t", "services": {
    "db": _service(9001, priority=1), "app": _service(9002, depends_on=["db"]), "web": _service(9003),
    "tts": _service(9004, always_on=False)}})


def _snapshot(held: list[str], **extra: object) -> Snapshot:
    instances, processes = [], []
    for n, name in enumerate(("db", "app", "web")):
        pid = 100 + n
        instances.append({"service": name, "gpu": 0, "origin": "started", "pid": pid, "create_time": 1.0,
                          "state": "running", "since": "2026-11-22T15:00:00Z",
                          "launch": {"argv": ["/bin/true", "--port", str(9001 + n)], "port": 9001 + n}})
        processes.append({"pid": pid, "create_time": 1.0, "cmdline": ["/bin/true"], "listening": [9001 + n]})
    return Snapshot.model_validate({
        "format_version": 1, "node": "local", "now": NOW.isoformat(), "held": held,
        "gpus": [{"index": 0, "uuid": "GPU-0", "name": "sim", "total_mb": 8192, "used_mb": 3000,
                  "processes": [{"pid": p["pid"], "used_mb": 1000} for p in processes]}],
        "processes": processes, "instances": instances,
        "probes": {name: {"healthy": True, "status": 200} for name in ("db", "app", "web")}, **extra})


def test_nothing_held_plans_nothing() -> None:
    assert plan(PROFILE, _snapshot([])).actions == []


def test_a_held_service_stops_after_its_dependents_whatever_is_always_on() -> None:
    result = plan(PROFILE, _snapshot(["db"]))
    actions = {a.id: a for a in result.actions}
    assert set(actions) == {"stop:db", "stop:app"}
    assert actions["stop:db"].requires == ["stop:app"]
    assert actions["stop:db"].reason.startswith("stopped by an operator (`reconciler start db`")
    assert actions["stop:app"].reason.startswith("needs db, which is stopped by an operator")
    assert result.pending == []


def test_a_held_service_releases_its_leases_and_refuses_demands_at_once() -> None:
    snapshot = _snapshot(["tts"], leases=[], demands=[
        {"id": "D1", "service": "tts", "holder": "kiwi", "requested_at": "2026-11-22T15:59:00Z"}])
    result = plan(PROFILE, snapshot)
    assert result.actions == []
    [pending] = result.pending
    assert pending.demand == "D1" and pending.final and "stopped by an operator" in pending.reason
    leased = _snapshot(["web"], leases=[{"id": "L1", "service": "web", "holder": "kiwi", "gpu": 0, "mb": 1000,
                                         "expires_at": "2026-11-22T16:05:00Z"}])
    ids = {a.id: a.reason for a in plan(PROFILE, leased).actions}
    assert set(ids) == {"release:L1", "stop:web"}
    assert "stopped by an operator" in ids["release:L1"]


def test_stalled_only_after_the_policy_count_and_cleared_once_healthy() -> None:
    record = Backoff("svc")
    for n in range(1, DEFAULT_POLICY.stall_after + 1):
        record = after_failure(record, f"boom {n}", "d", NOW, DEFAULT_POLICY)
        assert record.stalled == (n >= DEFAULT_POLICY.stall_after)
    healthy = after_healthy(record, "d", NOW + timedelta(seconds=1), DEFAULT_POLICY)
    assert not healthy.stalled and healthy.failures == DEFAULT_POLICY.stall_after  # the count stays a while
    again = after_failure(healthy, "boom again", "d", NOW + timedelta(seconds=2), DEFAULT_POLICY)
    assert again.stalled and again.failures == DEFAULT_POLICY.stall_after + 1
    later = after_healthy(healthy, "d", NOW + timedelta(seconds=1 + DEFAULT_POLICY.reset_after_s), DEFAULT_POLICY)
    assert later.failures == 0 and not later.stalled


def test_a_pending_reason_says_where_this_plans_starts_took_the_memory() -> None:
    profile = Profile.model_validate({"schema_version": 1, "name": "t", "services": {
        "a": _service(9001, priority=1, max_mb=6000), "b": _service(9002, priority=1, max_mb=4000)}})
    snapshot = Snapshot.model_validate({"format_version": 1, "node": "local", "now": NOW.isoformat(),
                                        "gpus": [{"index": 0, "uuid": "GPU-0", "name": "sim", "total_mb": 8192,
                                                  "used_mb": 0}]})
    result = plan(profile, snapshot)
    assert [a.id for a in result.actions] == ["start:a"]
    [pending] = result.pending
    assert pending.service == "b" and pending.reason.startswith("needs 4000 MB on GPU 0, 2192 free")
    assert pending.reason.endswith("; 6000 MB held for start:a"), pending.reason
