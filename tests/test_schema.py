"""The committed JSON Schemas: in sync with the models, described, and agreeing with them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from reconciler.cli import main
from reconciler.core.profile import Profile
from reconciler.core.snapshot import Snapshot
from reconciler.loading.yamltree import parse_yaml
from reconciler.schema import DIALECT, json_schema, render

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "cf-orch-profiles"


@pytest.mark.parametrize("kind", ["profile", "snapshot"])
def test_committed_schema_matches_the_models(kind):
    committed = (ROOT / "schemas" / f"{kind}.schema.json").read_text()
    assert committed == render(kind), (
        f"schemas/{kind}.schema.json is out of date; regenerate it with "
        f"./dev reconciler schema {kind} > schemas/{kind}.schema.json"
    )


def test_schema_command_prints_the_schema(capsys):
    assert main(["schema", "snapshot"]) == 0
    assert capsys.readouterr().out == render("snapshot")


@pytest.mark.parametrize("kind", ["profile", "snapshot"])
def test_schema_is_valid_draft_2020_12_with_descriptions_and_defaults(kind):
    schema = json_schema(kind)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == DIALECT and schema["$id"] and schema["title"] and schema["description"]
    for name, definition in [("(root)", schema), *schema["$defs"].items()]:
        assert definition.get("description"), f"{name} has no description"
        for field, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
            if field not in definition.get("required", []):
                assert "default" in prop, f"{name}.{field} is optional but shows no default"


def _profile_validator() -> Draft202012Validator:
    return Draft202012Validator(json.loads((ROOT / "schemas" / "profile.schema.json").read_text()))


VALID_SERVICE = {
    "max_mb": 4096,
    "priority": 1,
    "managed": {
        "type": "process",
        "adopt": True,
        "exec_path": "/usr/local/bin/ollama",
        "args_template": "serve",
        "port": 11434,
        "host_port": 11434,
        "health_path": "/api/tags",
    },
}
BASE = {"schema_version": 1, "name": "t", "services": {"ollama": VALID_SERVICE}}


def _with(path: tuple, value) -> dict:
    document = copy.deepcopy(BASE)
    *parents, last = path
    target = document
    for part in parents:
        target = target[part]
    target[last] = value
    return document


def _without(path: tuple) -> dict:
    document = copy.deepcopy(BASE)
    *parents, last = path
    target = document
    for part in parents:
        target = target[part]
    del target[last]
    return document


# Cross-field rules (depends_on targets, dependency cycles, template placeholders and
# quoting, duplicate host ports) cannot be said in JSON Schema; the loader checks them,
# so they are left out of this agreement set on purpose.
VALID = {
    "minimal": {"schema_version": 1, "name": "t"},
    "base": BASE,
    "docker": _with(("services", "ollama", "managed"), {"type": "docker", "image": "ollama/ollama", "port": 11434}),
    "unmanaged": _with(("services", "ollama"), {"max_mb": 0, "priority": 2}),
    "hints": _with(("model_size_hints",), {"a": "7b", "b": 3, "c": 1.5, "d": None}),
    "float for float": _with(("eviction_timeout_s",), 2.5),
    "int for float": _with(("eviction_timeout_s",), 30),
    "extensions": _with(("services", "ollama", "gpus"), [0, 1]),
    "nodes": _with(("nodes",), [{"node_id": "a", "gpus": [0]}]),
}
INVALID = {
    "unknown key": _with(("services", "ollama", "max_mbb"), 1),
    "unknown top-level key": _with(("colour",), "blue"),
    "unknown managed key": _with(("services", "ollama", "managed", "adpot"), True),
    "wrong type": _with(("services", "ollama", "priority"), "1"),
    "string for bool": _with(("services", "ollama", "shared"), "yes"),
    "bool for int": _with(("services", "ollama", "max_mb"), True),
    "list for mapping": _with(("services", "ollama"), [1]),
    "negative max_mb": _with(("services", "ollama", "max_mb"), -1),
    "port zero": _with(("services", "ollama", "managed", "port"), 0),
    "port too big": _with(("services", "ollama", "managed", "host_port"), 65536),
    "bad managed type": _with(("services", "ollama", "managed", "type"), "podman"),
    "managed without type": _without(("services", "ollama", "managed", "type")),
    "docker key in process": _with(("services", "ollama", "managed", "image"), "x"),
    "missing max_mb": _without(("services", "ollama", "max_mb")),
    "missing name": _without(("name",)),
    "bad service name": _with(("services", "bad name"), {"max_mb": 0, "priority": 1}),
    "schema_version 2": _with(("schema_version",), 2),
    "hint list": _with(("model_size_hints",), {"a": [1]}),
    "zero max_concurrent": _with(("services", "ollama", "max_concurrent"), 0),
    "null services": _with(("services",), None),
}


def _pydantic_accepts(document: dict) -> bool:
    try:
        Profile.model_validate(document, strict=True)  # the loader's mode
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(VALID))
def test_schema_and_models_accept_the_same_valid_documents(name):
    assert _pydantic_accepts(VALID[name])
    assert list(_profile_validator().iter_errors(VALID[name])) == []


@pytest.mark.parametrize("name", sorted(INVALID))
def test_schema_and_models_reject_the_same_invalid_documents(name):
    assert not _pydantic_accepts(INVALID[name])
    assert list(_profile_validator().iter_errors(INVALID[name])) != []


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"cf-orch profiles not found at {SHARED}")
@pytest.mark.parametrize("path", sorted(SHARED.glob("*.yaml")) if SHARED.is_dir() else [], ids=lambda p: p.name)
def test_schema_accepts_every_cf_orch_profile(path):
    data = parse_yaml(path.read_text(), str(path)).data
    assert _pydantic_accepts(data)
    assert list(_profile_validator().iter_errors(data)) == []


def test_snapshot_schema_agrees_on_the_design_example():
    from tests.test_loading_snapshot import YAML_SNAPSHOT

    data = parse_yaml(YAML_SNAPSHOT, "s.yaml").data
    validator = Draft202012Validator(json.loads((ROOT / "schemas" / "snapshot.schema.json").read_text()))
    assert list(validator.iter_errors(data)) == []
    Snapshot.model_validate_json(json.dumps(data), strict=True)
    data["gpus"][0]["total_mb"] = -1
    assert list(validator.iter_errors(data)) != []
    with pytest.raises(ValidationError):
        Snapshot.model_validate_json(json.dumps(data), strict=True)
