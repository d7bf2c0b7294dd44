"""Snapshots: JSON or YAML, strict types, located errors, and a stable JSON dump."""

from __future__ import annotations

import json

import pytest

from reconciler.errors import SnapshotError
from reconciler.loading import dump_snapshot, load_snapshot, parse_snapshot

YAML_SNAPSHOT = """\
format_version: 1
node: local
now: 2026-11-22T16:00:00Z
gpus:
  - {index: 0, uuid: GPU-0, name: "RTX 4000", total_mb: 8192, used_mb: 5900,
     processes: [{pid: 4242, used_mb: 5800}]}
processes:
  - {pid: 4242, create_time: 1763800000.0, cmdline: [/usr/local/bin/ollama, serve], listening: [11434]}
probes:
  ollama: {healthy: true, status: 200}
instances:
  - service: vllm
    gpu: 0
    origin: started
    pid: 5151
    create_time: 1763800100
    model: qwen2.5-3b
    launch: {argv: [python3, -m, x], cwd: "", env: {}, port: 8000}
    state: running
    since: "2026-11-22T15:00:00Z"
    idle_since: null
leases:
  - {id: L1, service: vllm, holder: kiwi, gpu: 0, mb: 6500, model: qwen2.5-3b, expires_at: "2026-11-22T16:05:00Z"}
demands:
  - {id: D1, service: comfyui, holder: batch, model: null, requested_at: "2026-11-22T15:59:00Z"}
"""


def problems(text: str, filename: str = "s.json") -> list[str]:
    with pytest.raises(SnapshotError) as caught:
        parse_snapshot(text, filename)
    return [str(d) for d in caught.value.diagnostics]


def test_the_design_example_loads_and_round_trips_through_json(tmp_path):
    snapshot = parse_snapshot(YAML_SNAPSHOT, "s.yaml")
    assert snapshot.instances[0].create_time == 1763800100.0
    assert snapshot.now.tzinfo is not None
    text = dump_snapshot(snapshot)
    assert json.loads(text)["now"] == "2026-11-22T16:00:00Z"
    path = tmp_path / "s.json"
    path.write_text(text)
    assert load_snapshot(path) == snapshot
    assert dump_snapshot(load_snapshot(path)) == text


def test_json_errors_are_located():
    text = ('{\n  "format_version": 1,\n  "node": "local",\n  "now": "2026-11-22T16:00:00",\n'
            '  "gpus": [{"index": 0, "total_mb": "8192"}]\n}\n')
    assert problems(text) == [
        "s.json:4:10: now: needs a timezone, e.g. 2026-11-22T16:00:00Z",
        "s.json:5:37: gpus[0].total_mb: expected an integer, got a string ('8192')",
    ]


def test_json_syntax_error_is_located():
    [message] = problems('{\n  "format_version": 1,\n  "node": "local"\n  "now": "x"\n}\n')
    assert message.startswith("s.json:4:3: YAML syntax error:")


def test_unknown_key_and_unsupported_version():
    text = "format_version: 2\nnode: n\nnow: 2026-11-22T16:00:00Z\ngpus: []\nleeses: []\n"
    assert problems(text, "s.yaml") == [
        "s.yaml:1:17: format_version: unsupported format_version 2; this reconciler reads format_version 1",
        "s.yaml:5:1: unknown key 'leeses' at the top level; did you mean 'leases'?",
    ]


def test_bad_instance_origin_lists_the_choices():
    text = ("format_version: 1\nnode: n\nnow: 2026-11-22T16:00:00Z\ngpus: []\n"
            "instances: [{service: a, origin: stolen}]\n")
    assert problems(text, "s.yaml") == [
        "s.yaml:5:34: instances[0].origin: expected one of 'started' or 'adopted', got a string ('stolen')"
    ]


def test_missing_snapshot_file(tmp_path):
    with pytest.raises(SnapshotError, match="cannot read file: no such file"):
        load_snapshot(tmp_path / "missing.json")


def test_json_duplicate_keys_are_not_lost_on_the_fast_path():
    text = '{"format_version": 1, "node": "a", "node": "b", "now": "2026-11-22T16:00:00Z", "gpus": []}'
    assert problems(text) == [
        "s.json:1:36: duplicate key 'node' (first at line 1, column 23); each key may appear once in a mapping"
    ]


def test_large_valid_json_snapshot_loads(tmp_path):
    processes = [{"pid": i, "create_time": 1.0, "cmdline": ["x"] * 5} for i in range(20_000)]
    document = {"format_version": 1, "node": "n", "now": "2026-11-22T16:00:00Z", "gpus": [], "processes": processes}
    path = tmp_path / "big.json"
    path.write_text(json.dumps(document))
    assert len(load_snapshot(path).processes) == 20_000
