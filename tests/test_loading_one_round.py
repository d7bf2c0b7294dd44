"""The errors of a profile come in one round: dependency errors together with field errors.

``depends_on`` naming a missing service and dependency cycles need the whole
profile, yet they are reported alongside the field errors of a profile the
models reject, read from what the document plainly says; where it does not say
(no ``services`` mapping, a ``depends_on`` that is not a list of names), only
the field errors come out.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from reconciler.cli import main
from reconciler.errors import ProfileError
from reconciler.loading import parse_profile

HEAD = "schema_version: 1\nname: test\n"


def problems(body: str) -> list[str]:
    with pytest.raises(ProfileError) as caught:
        parse_profile(HEAD + textwrap.dedent(body), "p.yaml", environ={})
    return [str(d) for d in caught.value.diagnostics]


def test_a_field_error_and_a_missing_dependency_in_another_service():
    assert problems(
        """\
        services:
          ollama: {max_mb: 1, priority: 1, sharde: true}
          webui: {max_mb: 1, priority: 2, depends_on: [olama]}
        """
    ) == [
        "p.yaml:4:36: unknown key 'sharde' in services.ollama; did you mean 'shared'?",
        (
            "p.yaml:5:48: service 'webui' depends on 'olama', which is not a service of this profile; "
            "did you mean 'ollama'?"
        ),
    ]


def test_a_missing_dependency_of_the_service_with_the_field_error():
    assert problems(
        """\
        services:
          a:
            max_mb: -1
            priority: 1
            depends_on: [b, nowhere]
          b: {max_mb: 1, priority: 1}
        """
    ) == [
        "p.yaml:5:13: services.a.max_mb: must be ≥ 0, got -1",
        "p.yaml:7:21: service 'a' depends on 'nowhere', which is not a service of this profile",
    ]


def test_a_field_error_and_a_cycle():
    assert problems(
        """\
        services:
          a: {max_mb: 1, priority: 1, depends_on: [b]}
          b: {max_mb: 1, priority: x, depends_on: [c]}
          c: {max_mb: 1, priority: 1, depends_on: [a]}
        """
    ) == [
        "p.yaml:4:31: dependency cycle: a → b → c → a; remove one of these depends_on entries",
        "p.yaml:5:28: services.b.priority: expected an integer, got a string ('x')",
    ]


def test_a_self_dependency_next_to_a_field_error():
    assert problems("services:\n  a: {max_mb: 1, priority: -1, depends_on: [a]}\n") == [
        "p.yaml:4:28: services.a.priority: must be ≥ 0, got -1",
        "p.yaml:4:45: service 'a' depends on itself",
    ]


def test_a_service_that_is_not_a_mapping_still_exists_for_the_others():
    assert problems(
        """\
        services:
          db: [1]
          app: {max_mb: 1, priority: 1, depends_on: [db, cache]}
        """
    ) == [
        "p.yaml:4:3: services.db: expected a mapping (key: value), got a list",
        "p.yaml:5:50: service 'app' depends on 'cache', which is not a service of this profile",
    ]


def test_a_top_level_error_does_not_hide_a_missing_dependency():
    assert problems("colour: blue\nservices:\n  a: {max_mb: 1, priority: 1, depends_on: [b]}\n")[1:] == [
        "p.yaml:5:44: service 'a' depends on 'b', which is not a service of this profile",
    ]


@pytest.mark.parametrize(
    "services",
    [
        "services: [a, b]",  # not a mapping: no names to check against
        "services: nothing",
        "servces:\n  a: {max_mb: 1, priority: 1, depends_on: [b]}",  # the key itself is misspelt
    ],
)
def test_no_dependency_errors_without_a_services_mapping(services):
    found = problems(services + "\n")
    assert len(found) == 1 and "depends on" not in found[0]


@pytest.mark.parametrize(
    "depends_on",
    ["depends_on: b", "depends_on: [b, 1]", "depends_on: [b, 'not a name']", "depends_on: {b: 1}"],
)
def test_a_depends_on_that_is_not_a_list_of_names_is_not_guessed_at(depends_on):
    found = problems(f"services:\n  a: {{max_mb: 1, priority: 1, {depends_on}}}\n")
    assert found and all("depends on" not in line and "cycle" not in line for line in found)


def test_a_cycle_through_an_unreadable_depends_on_is_not_reported():
    found = problems(
        """\
        services:
          a: {max_mb: 1, priority: 1, depends_on: [b]}
          b: {max_mb: 1, priority: 1, depends_on: [a, 7]}
        """
    )
    assert found == ["p.yaml:5:47: services.b.depends_on[1]: expected a string, got an integer (7); quote it: \"7\""]


def test_each_dependency_error_is_reported_once():
    found = problems(
        """\
        services:
          a: {max_mb: x, priority: 1, depends_on: [b, gone]}
          b: {max_mb: 1, priority: 1, depends_on: [a]}
        """
    )
    assert len(found) == len(set(found)) == 3
    assert [line for line in found if "depends on 'gone'" in line or "cycle" in line] == [
        "p.yaml:4:31: dependency cycle: a → b → a; remove one of these depends_on entries",
        "p.yaml:4:47: service 'a' depends on 'gone', which is not a service of this profile",
    ]


def test_validate_prints_field_and_dependency_errors_and_exits_1(capsys, tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "schema_version: 1\nname: bad\nservices:\n"
        "  a: {max_mb: -1, priority: 1}\n"
        "  b: {max_mb: 1, priority: 1, depends_on: [c]}\n"
    )
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    assert (code, captured.err) == (1, "")
    assert captured.out.splitlines() == [
        f"{path}:4:15: services.a.max_mb: must be ≥ 0, got -1",
        f"{path}:5:44: service 'b' depends on 'c', which is not a service of this profile",
    ]
