"""Reading and parsing: every failure before the models is a located diagnostic."""

from __future__ import annotations

import pathlib

import pytest
from ruamel.yaml import YAML

from reconciler.errors import InputError, ProfileError
from reconciler.loading import load_profile, parse_profile, yamltree
from reconciler.loading.yamltree import MAX_ALIAS_VALUES, parse_yaml


def problems(text: str | bytes) -> list[str]:
    with pytest.raises(ProfileError) as caught:
        parse_profile(text, "p.yaml")
    return [str(d) for d in caught.value.diagnostics]


def test_syntax_error_uses_the_problem_mark():
    assert problems("schema_version: 1\nname: x\n services: {}\n") == [
        "p.yaml:3:10: YAML syntax error: mapping values are not allowed here; "
        "quote a value that contains ': ', or fix the indentation"
    ]


def test_unclosed_flow_sequence_names_where_it_started():
    [message] = problems("schema_version: 1\nname: [a, b\n")
    assert message.startswith("p.yaml:3:1: YAML syntax error: expected ',' or ']'")
    assert "at 2:7" in message


def test_tab_indentation_gets_a_hint():
    [message] = problems("services:\n\tvllm: {}\n")
    assert message.startswith("p.yaml:2:1: ") and "not allow tabs" in message


def test_every_duplicate_key_is_reported():
    text = "schema_version: 1\nname: x\nname: y\nservices:\n  a: {max_mb: 1, priority: 1, max_mb: 2}\n"
    assert problems(text) == [
        "p.yaml:3:1: duplicate key 'name' (first at line 2, column 1); each key may appear once in a mapping",
        "p.yaml:5:31: duplicate key 'max_mb' (first at line 5, column 7); each key may appear once in a mapping",
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", b""])
def test_empty_file(text):
    assert problems(text) == ["p.yaml:1:1: file is empty (no YAML document in it)"]


@pytest.mark.parametrize(
    ("text", "got"), [("- a\n- b\n", "a list"), ("just text\n", "a string ('just text')"), ("42\n", "an integer (42)")]
)
def test_top_level_must_be_a_mapping(text, got):
    assert problems(text) == [f"p.yaml:1:1: the top level of a profile must be a mapping (key: value), got {got}"]


def test_two_documents_in_one_file():
    assert problems("schema_version: 1\n---\nname: x\n") == [
        "p.yaml:2:1: a file holds one YAML document; remove this '---' and what follows"
    ]


def test_undecodable_bytes_are_located():
    assert problems("schema_version: 1\nname: caf\xe9\n".encode("latin-1")) == [
        "p.yaml:2:10: not valid UTF-8 text (byte 0xe9 at offset 27); save the file as UTF-8"
    ]


def test_binary_garbage():
    assert problems(b"\x7fELF\x02\x01\x01\x00\x00\x00") == [
        "p.yaml:1:1: control character U+007F is not allowed in YAML; is this a binary file?"
    ]


def test_nul_byte_in_the_middle_is_located():
    assert problems(b"schema_version: 1\nname: a\x00b\n") == [
        "p.yaml:2:8: control character U+0000 is not allowed in YAML; is this a binary file?"
    ]


def test_utf16_with_byte_order_mark_is_read():
    text = "schema_version: 1\nname: x\n".encode("utf-16")
    assert parse_profile(text, "p.yaml").name == "x"


def test_file_over_the_size_limit_is_refused_without_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"a: " + b"x" * (3 << 20))
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert [str(d) for d in caught.value.diagnostics] == [
        f"{path}:1:1: file too large ({(3 << 20) + 3} bytes, limit 1048576 bytes)"
    ]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert [str(d) for d in caught.value.diagnostics] == [f"{path}:1:1: cannot read file: no such file"]


def test_a_directory_is_not_a_profile(tmp_path):
    with pytest.raises(ProfileError) as caught:
        load_profile(tmp_path)
    assert "it is a directory" in str(caught.value)


def test_billion_laughs_is_refused_quickly():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    [message] = problems("\n".join(lines) + "\n")
    assert f"aliases expand to more than {MAX_ALIAS_VALUES} values" in message
    assert message.startswith("p.yaml:")


def test_recursive_alias():
    # The composer gives an alias the node of its anchor, so this points at the anchor.
    assert problems("a: &a [1, *a]\n") == ["p.yaml:1:4: recursive alias: this value contains itself"]


def test_deep_nesting():
    [message] = problems("a: " + "[" * 100 + "]" * 100 + "\n")
    assert message == "p.yaml:1:68: nested too deeply (more than 64 levels)"


def test_custom_tags_are_refused():
    assert problems("schema_version: !!binary aGVsbG8=\nname: !secret x\n") == [
        "p.yaml:1:17: unsupported YAML tag !!binary; write a plain value, list or mapping",
        "p.yaml:2:7: unsupported YAML tag !secret; write a plain value, list or mapping",
    ]


def test_yaml_1_2_keeps_yes_a_string_and_timestamps_as_text():
    document = parse_yaml("a: yes\nb: 2026-11-22T16:00:00Z\nc: 0x10\nd: 1.5\ne: ~\n", "x.yaml")
    assert document.data == {"a": "yes", "b": "2026-11-22T16:00:00Z", "c": 16, "d": 1.5, "e": None}
    assert type(document.data["c"]) is int


def test_positions_of_keys_and_values():
    document = parse_yaml("top:\n  inner: [10, {k: v}]\n", "x.yaml")
    positions = document.positions
    assert (positions.key(("top", "inner")).line, positions.key(("top", "inner")).col) == (2, 3)
    assert (positions.value(("top", "inner", 1)).line, positions.value(("top", "inner", 1)).col) == (2, 15)
    assert (positions.value(("top", "inner", 1, "k")).line, positions.value(("top", "inner", 1, "k")).col) == (2, 19)


def test_merge_keys_share_settings_and_explicit_keys_win():
    text = (
        "schema_version: 1\nname: m\nservices:\n"
        "  a: &base\n    max_mb: 100\n    priority: 2\n"
        "  b:\n    <<: *base\n    priority: 1\n"
    )
    profile = parse_profile(text, "p.yaml")
    assert (profile.services["b"].max_mb, profile.services["b"].priority) == (100, 1)


def test_an_anchor_defined_twice_is_a_located_error_not_a_warning(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("a: &x 1\nb: &x 2\n")
    with pytest.raises(InputError) as caught:
        parse_yaml(path.read_text(), str(path))
    [diagnostic] = caught.value.diagnostics
    assert (diagnostic.line, diagnostic.col) == (2, 4)
    assert "anchor &x is defined twice" in diagnostic.message


def _every_yaml_file() -> list[pathlib.Path]:
    root = pathlib.Path(__file__).resolve().parent.parent
    found = [*root.glob("profiles/*.yaml"), *root.glob("demo/*.yaml"), *root.glob("golden/*/*.yaml"),
             *(root.parent / "shared" / "cf-orch-profiles").rglob("*.yaml")]
    return sorted(found)


def test_the_c_parser_and_the_pure_parser_give_the_same_data_and_positions(monkeypatch):
    """Issue 10: libyaml composes (15× faster); every file shipped or loaded by the tests reads the same."""
    files = _every_yaml_file()
    assert len(files) > 50
    fast_used = 0
    for path in files:
        text = path.read_text()
        fast = yamltree.parse_yaml(text, str(path))
        fast_used += yamltree._compose_fast(text, YAML(typ="rt")) is not None
        with monkeypatch.context() as patch:
            patch.setattr(yamltree, "_compose_fast", lambda text, yaml: None)
            pure = yamltree.parse_yaml(text, str(path))
        assert fast.data == pure.data, path
        assert fast.positions.__dict__ == pure.positions.__dict__, path
    assert fast_used > len(files) // 2  # the fast path is really taken


@pytest.mark.parametrize("text", [
    "# a comment\u2028\na: 1\nb: 2\n",
    'a: "x\u2029y"\nb: 1\n',
    "a: 1 # \x85\nb: 2\n",
])
def test_a_line_break_of_yaml_1_1_alone_is_read_by_the_pure_parser(text, monkeypatch):
    """libyaml (YAML 1.1) counts a line at NEL, LS and PS; YAML 1.2 does not: the positions would differ."""
    assert yamltree._compose_fast(text, YAML(typ="rt")) is None
    fast = yamltree.parse_yaml(text, "p.yaml")
    monkeypatch.setattr(yamltree, "_compose_fast", lambda text, yaml: None)
    pure = yamltree.parse_yaml(text, "p.yaml")
    assert (fast.data, fast.positions.__dict__) == (pure.data, pure.positions.__dict__)
