"""Profile validation: each kind of mistake comes out as one located, worded diagnostic."""

from __future__ import annotations

import textwrap

import pytest

from reconciler.errors import ProfileError
from reconciler.loading import parse_profile

HEAD = "schema_version: 1\nname: test\n"


def problems(body: str, **kwargs) -> list[str]:
    with pytest.raises(ProfileError) as caught:
        parse_profile(HEAD + textwrap.dedent(body), "p.yaml", **kwargs)
    return [str(d) for d in caught.value.diagnostics]


def test_unknown_key_suggests_the_field_and_hides_the_missing_one():
    assert problems(
        """\
        services:
          vllm:
            max_mbb: 6500
            priority: 1
        """
    ) == ["p.yaml:5:5: unknown key 'max_mbb' in services.vllm; did you mean 'max_mb'?"]


def test_unknown_key_inside_managed_uses_the_right_model():
    assert problems(
        """\
        services:
          ollama:
            max_mb: 0
            priority: 1
            managed: {type: process, exec_path: /bin/true, adpot: true}
        """
    ) == ["p.yaml:7:52: unknown key 'adpot' in services.ollama.managed; did you mean 'adopt'?"]


def test_unknown_key_without_a_close_match_lists_the_allowed_ones():
    [message] = problems("services: {}\ncolour: blue\n")
    assert message.startswith("p.yaml:4:1: unknown key 'colour' at the top level; allowed keys: schema_version, name")


def test_wrong_type_is_strict():
    assert problems("services:\n  a: {max_mb: 1, priority: '1', shared: yes}\n") == [
        "p.yaml:4:28: services.a.priority: expected an integer, got a string ('1')",
        "p.yaml:4:41: services.a.shared: expected a boolean (true or false), got a string ('yes')",
    ]


def test_a_list_where_a_mapping_belongs_points_at_the_key():
    assert problems("services:\n  a:\n    - max_mb: 1\n") == [
        "p.yaml:4:3: services.a: expected a mapping (key: value), got a list"
    ]


def test_missing_required_field_points_at_the_enclosing_mapping():
    assert problems("services:\n  a:\n    priority: 1\n") == ["p.yaml:4:3: services.a: missing required key 'max_mb'"]


def test_missing_top_level_field_points_at_the_start():
    with pytest.raises(ProfileError) as caught:
        parse_profile("schema_version: 1\n", "p.yaml")
    assert [str(d) for d in caught.value.diagnostics] == ["p.yaml:1:1: missing required key 'name'"]


def test_unsupported_schema_version():
    with pytest.raises(ProfileError) as caught:
        parse_profile("schema_version: 2\nname: x\n", "p.yaml")
    assert [str(d) for d in caught.value.diagnostics] == [
        "p.yaml:1:17: schema_version: unsupported schema_version 2; this reconciler reads schema_version 1"
    ]


def test_negative_max_mb():
    assert problems("services:\n  a: {max_mb: -5, priority: 1}\n") == [
        "p.yaml:4:15: services.a.max_mb: must be ≥ 0, got -5"
    ]


@pytest.mark.parametrize("port", [0, 65536, 70000])
def test_port_out_of_range(port):
    text = ("services:\n  a:\n    max_mb: 1\n    priority: 1\n    managed:\n"
            f"      type: docker\n      image: x\n      port: {port}\n")
    assert problems(text) == [
        f"p.yaml:10:13: services.a.managed.port: {port} is not a port number; use 1 to 65535"
    ]


def test_bad_managed_type_points_at_the_type():
    assert problems("services:\n  a: {max_mb: 1, priority: 1, managed: {type: podman, image: x}}\n") == [
        "p.yaml:4:47: services.a.managed.type: unknown type 'podman'; use one of 'process', 'docker'"
    ]


def test_managed_without_type():
    assert problems("services:\n  a:\n    max_mb: 1\n    priority: 1\n    managed: {image: x}\n") == [
        "p.yaml:7:5: services.a.managed: missing required key 'type'"
    ]


def test_invalid_service_name():
    assert problems("services:\n  bad name: {max_mb: 1, priority: 1}\n") == [
        "p.yaml:4:3: services: invalid name 'bad name': use letters, digits, '.', '_' and '-', "
        "starting with a letter or digit"
    ]


def test_union_values_get_one_message():
    assert problems("services: {}\nmodel_size_hints:\n  llm: [7b]\n") == [
        "p.yaml:5:3: model_size_hints.llm: expected a string, an integer or a number, got a list"
    ]


def test_unknown_placeholder():
    assert problems(
        """\
        services:
          a:
            max_mb: 1
            priority: 1
            managed:
              type: process
              exec_path: /bin/server
              args_template: "--model {modle} --port {port}"
        """
    ) == [
        "p.yaml:10:22: services.a.managed.args_template: unknown placeholder {modle} in args_template; "
        "did you mean {model}? known placeholders: {port}, {host_port}, {gpu_id}, {gpu_ids}, {model}, {service}"
    ]


def test_bad_quoting_in_args_template():
    assert problems(
        """\
        services:
          a:
            max_mb: 1
            priority: 1
            managed: {type: process, exec_path: /bin/server, args_template: "--name 'unclosed"}
        """
    ) == [
        "p.yaml:7:69: services.a.managed.args_template: args_template cannot be split into arguments: "
        "No closing quotation"
    ]


def test_depends_on_a_missing_service_suggests_a_name():
    assert problems(
        """\
        services:
          ollama: {max_mb: 1, priority: 1}
          webui: {max_mb: 1, priority: 2, depends_on: [olama]}
        """
    ) == [
        "p.yaml:5:48: service 'webui' depends on 'olama', which is not a service of this profile; "
        "did you mean 'ollama'?"
    ]


def test_dependency_cycle_is_named():
    assert problems(
        """\
        services:
          a: {max_mb: 1, priority: 1, depends_on: [b]}
          b: {max_mb: 1, priority: 1, depends_on: [c]}
          c: {max_mb: 1, priority: 1, depends_on: [a]}
        """
    ) == ["p.yaml:4:31: dependency cycle: a → b → c → a; remove one of these depends_on entries"]


def test_all_errors_of_a_file_are_reported_in_order():
    found = problems(
        """\
        services:
          vllm:
            max_mb: -1
            priority: x
            managed:
              type: process
              exec_path: ${UNSET_FOR_TEST}
              port: 99999
          comfyui: [1]
        nodes: [{agent_url: x}]
        """,
        environ={},
    )
    assert found == [
        "p.yaml:5:13: services.vllm.max_mb: must be ≥ 0, got -1",
        "p.yaml:6:15: services.vllm.priority: expected an integer, got a string ('x')",
        "p.yaml:9:18: services.vllm.managed.exec_path: environment variable UNSET_FOR_TEST is not set; "
        "set it, or give a default: ${UNSET_FOR_TEST:-…}",
        "p.yaml:10:13: services.vllm.managed.port: 99999 is not a port number; use 1 to 65535",
        "p.yaml:11:3: services.comfyui: expected a mapping (key: value), got a list",
        "p.yaml:12:9: nodes[0]: missing required key 'node_id'",
    ]


SERVICE = """\
services:
  a:
    max_mb: 1
    priority: 1
    managed:
      type: process
      exec_path: {exec_path}
      args_template: {args}
      env: {{HOME_DIR: "${{HOME_FOR_TEST:-/home}}"}}
"""


def service(exec_path: str, args: str = '""', **kwargs):
    text = HEAD + SERVICE.format(exec_path=exec_path, args=args)
    return parse_profile(text, "p.yaml", **kwargs).services["a"].managed


def test_environment_references_are_expanded():
    managed = service('"${PY:-python3}"', '"--models ${MODELS}/{model}"', environ={"MODELS": "/srv/m"})
    assert (managed.exec_path, managed.args_template, managed.env) == (
        "python3", "--models /srv/m/{model}", {"HOME_DIR": "/home"}
    )


def test_set_variable_wins_over_default_and_empty_means_default():
    assert service('"${PY:-python3}"', environ={"PY": "/opt/py/bin/python"}).exec_path == "/opt/py/bin/python"
    assert service('"${PY:-python3}"', environ={"PY": ""}).exec_path == "python3"


def test_placeholder_check_sees_the_expanded_text():
    # ${X} contains {X}; only a placeholder the expansion leaves behind is checked.
    assert service("/bin/x", '"--a ${A} {port}"', environ={"A": "1"}).args_template == "--a 1 {port}"
    with pytest.raises(ProfileError, match=r"unknown placeholder \{oops\}"):
        service("/bin/x", '"--a ${A}"', environ={"A": "{oops}"})


def test_dollar_dollar_brace_is_a_literal():
    assert service('"/bin/$${x}"', environ={}).exec_path == "/bin/${x}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"${1BAD}"', "bad reference ${1BAD}; write ${NAME} or ${NAME:-default}"),
        ('"${OPEN"', "unterminated ${ reference; close it with }"),
    ],
)
def test_malformed_references(value, message):
    with pytest.raises(ProfileError) as caught:
        service(value, environ={})
    assert [str(d) for d in caught.value.diagnostics] == [f"p.yaml:9:18: services.a.managed.exec_path: {message}"]


def test_relative_exec_path_is_resolved_against_the_profile_directory(tmp_path):
    assert service("./bin/server", base_dir=tmp_path).exec_path == str(tmp_path / "bin" / "server")
    assert service("../demo/x", base_dir=tmp_path / "profiles").exec_path == str(tmp_path / "demo" / "x")
    assert service("python3", base_dir=tmp_path).exec_path == "python3"
    assert service("/usr/bin/env", base_dir=tmp_path).exec_path == "/usr/bin/env"


def test_load_profile_resolves_against_the_file(tmp_path):
    from reconciler.loading import load_profile

    (tmp_path / "p.yaml").write_text(HEAD + SERVICE.format(exec_path="./run.sh", args='""'))
    assert load_profile(tmp_path / "p.yaml", environ={}).services["a"].managed.exec_path == str(tmp_path / "run.sh")


def test_a_number_where_a_string_belongs_suggests_quotes():
    assert problems(
        "services:\n  a: {max_mb: 1, priority: 1, managed: {type: docker, image: x, env: {OMP_NUM_THREADS: 4}}}\n"
    ) == ["p.yaml:4:88: services.a.managed.env.OMP_NUM_THREADS: expected a string, got an integer (4); quote it: \"4\""]


def test_pull_on_a_service_that_is_not_an_ollama_is_located():
    assert problems(
        """\
        services:
          ollama: {max_mb: 1, priority: 1, backend: ollama, pull: true}
          vllm: {max_mb: 1, priority: 2, pull: true}
        """
    ) == [
        "p.yaml:5:34: pull: true applies to an Ollama (one with `backend: ollama`, an `ollama` executable or "
        "image, or health_path /api/tags); 'vllm' is not one: drop `pull`"
    ]


def test_a_docker_host_ip_that_is_not_an_address_is_located():
    found = problems(
        """\
        services:
          web:
            max_mb: 0
            priority: 1
            managed: {type: docker, image: "busybox:1", port: 80, host_ip: "localhost"}
        """
    )
    assert len(found) == 1 and found[0].startswith("p.yaml:7:")
    assert "host_ip must be an IP address such as 127.0.0.1, 0.0.0.0 or ::1, not 'localhost'" in found[0]
