"""The gateway's parts that need no server: profile fields, routing, the gate, translation, keep_alive, causes.

Everything here is pure or runs on one event loop; the end-to-end tests
(``test_gateway_*.py``) drive the same parts through ``reconciler serve
--gateway`` with real processes.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from reconciler.core.planner import plan
from reconciler.core.profile import Profile
from reconciler.core.served import lookup, routing_table, speaks
from reconciler.core.snapshot import Demand, Gpu, GpuProcess, Instance, Launch, Probe, Process, Snapshot
from reconciler.errors import CallerGone, ProfileError
from reconciler.gateway import translate
from reconciler.gateway.causes import caused_by
from reconciler.gateway.gate import Gate, GateTimeout, QueueFull
from reconciler.gateway.protocols import error, parse_duration
from reconciler.gateway.pull import provided, pull_target
from reconciler.gateway.routing import Routes, Target
from reconciler.loading import parse_profile
from reconciler.runtime.keepalive import KeepAlive
from reconciler.runtime.traffic import Traffic, percentile

HEAD = "schema_version: 1\nname: gw\nvram_total_mb: 8192\n"
NOW = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)


async def settle() -> None:
    """Let every task that can run, run (a woken waiter takes a few turns of the loop)."""
    for _ in range(10):
        await asyncio.sleep(0)


def profile(body: str) -> Profile:
    return parse_profile(HEAD + textwrap.dedent(body), "p.yaml", environ={})


def problems(body: str) -> list[str]:
    with pytest.raises(ProfileError) as caught:
        profile(body)
    return [str(d) for d in caught.value.diagnostics]


LLM = """\
services:
  llm:
    max_mb: 4096
    priority: 1
    models:
      tiny: {max_mb: 1024, aliases: [t, small]}
      big: {max_mb: 6144}
      mid:
    managed: {type: process, exec_path: /bin/llama-server, args_template: "-m {model} --port {port}", port: 8080}
  whisper:
    max_mb: 1024
    priority: 2
    managed: {type: process, exec_path: /bin/whisper, port: 8090}
  ollama:
    max_mb: 2048
    priority: 1
    managed: {type: process, exec_path: /usr/local/bin/ollama, args_template: serve, port: 11434,
              health_path: /api/tags, adopt: true}
  slot:
    max_mb: 512
    priority: 3
"""


# --- the profile ---------------------------------------------------------------------------------


def test_models_as_a_mapping_give_each_model_its_ceiling_and_aliases():
    p = profile(LLM)
    llm = p.services["llm"]
    assert llm.ceiling_mb("tiny") == 1024 and llm.ceiling_mb("t") == 1024 and llm.ceiling_mb("big") == 6144
    assert llm.ceiling_mb("mid") == 4096 and llm.ceiling_mb(None) == 4096  # no ceiling of its own: the service's
    assert llm.model_specs["tiny"].aliases == ["t", "small"]
    assert speaks(llm) == "openai" and speaks(p.services["ollama"]) == "ollama"


def test_models_as_a_list_and_every_cf_orch_field_unchanged():
    p = profile("""\
        services:
          vllm:
            max_mb: 6500
            priority: 1
            models: [qwen2.5-3b, llama3.2-3b]
            api: openai
            request_wait_s: 90
            max_queued: 8
            managed: {type: process, exec_path: /bin/vllm, args_template: "serve {model} --port {port}", port: 8000}
        """)
    vllm = p.services["vllm"]
    assert list(vllm.model_specs) == ["qwen2.5-3b", "llama3.2-3b"] and vllm.ceiling_mb("qwen2.5-3b") == 6500
    assert vllm.wait_s == 90 and vllm.max_queued == 8
    assert profile(LLM.replace("    models:\n      tiny", "    xmodels:\n      tiny").split("    xmodels")[0]
                   ).services["llm"].wait_s == 300 + 30  # start_timeout_s + 30 by default


def test_two_services_claiming_one_model_name_is_a_located_error():
    assert problems("""\
        services:
          a:
            max_mb: 1
            priority: 1
            models:
              m1: {aliases: [x]}
            managed: {type: process, exec_path: /bin/a, args_template: "-m {model}", port: 9000}
          b:
            max_mb: 1
            priority: 1
            models: [x, m2, m2]
            managed: {type: process, exec_path: /bin/b, port: 9001}
          c:
            max_mb: 1
            priority: 1
            model: m1
            managed: {type: process, exec_path: /bin/c, port: 9002}
        """) == [
        "p.yaml:14:14: model name 'x' is already served by service 'a'; the gateway routes a model to one service: "
        "rename it, or make it an alias of one of them",
        "p.yaml:14:21: model name 'm2' is listed twice for service 'b'; list each name (model or alias) once",
        "p.yaml:19:5: model name 'm1' is already served by service 'a'; the gateway routes a model to one service: "
        "rename it, or make it an alias of one of them",
    ]


def test_bad_models_api_and_names_are_worded_where_they_are():
    assert problems("""\
        services:
          a:
            max_mb: 1
            priority: 1
            models: {" bad": {maxmb: 1}}
            api: grpc
            max_queued: -1
        """) == [
        "p.yaml:8:14: services.a.models: invalid name ' bad': model name ' bad' starts or ends with a space or "
        "holds a control character; write it as clients send it",
        "p.yaml:8:23: unknown key 'maxmb' in services.a.models. bad; did you mean 'max_mb'?",
        "p.yaml:9:10: services.a.api: expected one of 'openai' or 'ollama', got a string ('grpc')",
        "p.yaml:10:17: services.a.max_queued: must be ≥ 0, got -1",
    ]
    assert problems("services:\n  a: {max_mb: 1, priority: 1, models: qwen}\n") == [
        "p.yaml:5:39: services.a.models: expected a list of model names, or a mapping name → {max_mb, aliases}"]


# --- routing -------------------------------------------------------------------------------------


def test_the_routing_table_names_models_aliases_single_model_services_and_live_ollama_tags():
    p = profile(LLM)
    table = routing_table(p, {"ollama": ["llama3.2:3b", "qwen3:latest", "tiny"]})
    assert {name: (r.service, r.model) for name, r in table.items()} == {
        "tiny": ("llm", "tiny"), "t": ("llm", "tiny"), "small": ("llm", "tiny"), "big": ("llm", "big"),
        "mid": ("llm", "mid"),
        "whisper": ("whisper", "whisper"),  # no {model} in its launch, no model: its own name
        "ollama": ("ollama", "ollama"),
        "llama3.2:3b": ("ollama", "llama3.2:3b"), "qwen3:latest": ("ollama", "qwen3:latest"),
        # "tiny" listed by the Ollama stays llm's: the profile's names come first; the slot has no port
    }
    assert not table["llama3.2:3b"].declared and table["tiny"].declared
    assert lookup(table, "qwen3").model == "qwen3:latest"  # Ollama's rule: no tag means :latest
    assert lookup(table, "tiny:latest").model == "tiny"
    assert lookup(table, "gpt-4") is None


# --- the gate ------------------------------------------------------------------------------------


def test_the_gate_admits_max_concurrent_then_queues_in_order_and_refuses_past_the_queue():
    async def scenario() -> None:
        gate = Gate(slots=2, max_queued=2, switches=False)
        assert gate.try_enter("m") and gate.try_enter("m") and not gate.try_enter("m")
        order: list[int] = []

        async def waiter(n: int) -> None:
            await gate.enter("m", 5)
            order.append(n)

        tasks = [asyncio.ensure_future(waiter(n)) for n in (1, 2)]
        await settle()
        with pytest.raises(QueueFull):
            await gate.enter("m", 5)
        gate.leave()
        await settle()
        assert order == [1] and gate.in_flight == 2 and gate.queued == 1
        gate.leave()
        await asyncio.gather(*tasks)
        assert order == [1, 2]
        with pytest.raises(GateTimeout):
            await gate.enter("m", 0.01)
        assert gate.queued == 0

    asyncio.run(scenario())


def test_a_request_for_another_model_holds_up_those_behind_it_until_the_instance_is_idle():
    async def scenario() -> None:
        gate = Gate(slots=4, max_queued=10, switches=True)
        assert gate.try_enter("a")
        admitted: list[str] = []

        async def waiter(model: str, tag: str) -> None:
            await gate.enter(model, 5)
            admitted.append(tag)

        b = asyncio.ensure_future(waiter("b", "b1"))
        await settle()
        a2 = asyncio.ensure_future(waiter("a", "a2"))  # a slot is free, but b is first: it waits too
        await settle()
        assert admitted == [] and gate.queued == 2
        gate.leave()  # the instance is idle: b goes in (its lease switches the model), then a2 waits for b
        await settle()
        assert admitted == ["b1"] and gate.serving == "b" and gate.queued == 1
        gate.leave()
        await asyncio.gather(b, a2)
        assert admitted == ["b1", "a2"]

    asyncio.run(scenario())


def test_a_waiter_whose_client_went_away_leaves_the_queue():
    async def scenario() -> None:
        gate = Gate(slots=1, max_queued=5, switches=False)
        assert gate.try_enter("m")
        gone = asyncio.Event()
        task = asyncio.ensure_future(gate.enter("m", 5, gone))
        await settle()
        gone.set()
        with pytest.raises(CallerGone):
            await task
        assert gate.queued == 0

    asyncio.run(scenario())


# --- translation ---------------------------------------------------------------------------------


def test_an_ollama_chat_request_becomes_an_openai_one():
    body = {"model": "tiny", "stream": True, "format": "json", "keep_alive": "5m",
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "what is this?", "images": ["aGk="]}],
            "options": {"temperature": 0.2, "num_predict": 16, "seed": 7, "stop": ["\n"], "num_ctx": 4096}}
    out = translate.chat_request(body, "tiny-upstream", stream=True)
    assert out == {
        "model": "tiny-upstream", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                  {"type": "image_url",
                                                   "image_url": {"url": "data:image/png;base64,aGk="}}]}],
        "temperature": 0.2, "max_tokens": 16, "seed": 7, "stop": ["\n"], "response_format": {"type": "json_object"},
    }
    path, raw = translate.generate_request({"model": "m", "prompt": "2+2=", "raw": True, "stream": False}, "m", False)
    assert path == "/v1/completions" and raw == {"model": "m", "prompt": "2+2=", "stream": False}
    path, chat = translate.generate_request({"model": "m", "prompt": "hi", "system": "s"}, "m", True)
    assert path == "/v1/chat/completions" and [m["role"] for m in chat["messages"]] == ["system", "user"]


def test_an_openai_stream_becomes_ollama_ndjson_chunk_by_chunk_however_it_is_split():
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    wire = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b": keep-alive\n\ndata: [DONE]\n\n"
    for size in (1, 7, len(wire)):
        stream = translate.StreamTranslator("tiny", "chat", 0)
        out = b"".join(stream.feed(wire[i:i + size]) for i in range(0, len(wire), size))
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["message"]["content"] for line in lines] == ["Hel", "lo", ""]
        assert [line["done"] for line in lines] == [False, False, True]
        assert lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 2
        assert lines[-1]["prompt_eval_count"] == 5 and all(line["model"] == "tiny" for line in lines)
        assert stream.done and stream.finish() == b""  # the done line comes once


def test_a_stream_cut_short_ends_with_an_error_line_as_ollama_streams_do():
    stream = translate.StreamTranslator("m", "generate", 0)
    first = stream.feed(b'data: {"choices":[{"index":0,"text":"x","finish_reason":null}]}\n')
    assert json.loads(first) == {"model": "m", "created_at": json.loads(first)["created_at"], "response": "x",
                                 "done": False}
    assert json.loads(stream.cut_short("the model server broke off")) == {"error": "the model server broke off"}


def test_whole_answers_and_embeddings_are_translated():
    answer = {"choices": [{"message": {"role": "assistant", "content": "4", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}]},
        "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    chat = translate.complete_answer(answer, "m", "chat", 0)
    assert chat["message"] == {"role": "assistant", "content": "4",
                               "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}]}
    assert chat["done"] and chat["done_reason"] == "stop" and chat["eval_count"] == 1
    vectors = {"data": [{"index": 1, "embedding": [0.2]}, {"index": 0, "embedding": [0.1]}],
               "usage": {"prompt_tokens": 2}}
    assert translate.embed_answer(vectors, "e", False, 0)["embeddings"] == [[0.1], [0.2]]
    assert translate.embed_answer(vectors, "e", True, 0) == {"embedding": [0.1]}
    assert translate.error_text(b'{"error": {"message": "context too long"}}', 400) == "context too long"


def test_keep_alive_durations_and_error_shapes():
    assert [parse_duration(v) for v in (None, 0, -1, "300", "5m", "1h30m", "-1s", "1.5s", "250ms")] == [
        None, 0.0, -1.0, 300.0, 300.0, 5400.0, -1.0, 1.5, 0.25]
    with pytest.raises(ValueError, match="expected seconds"):
        parse_duration("forever")
    openai = error("openai", 429, "full", retry_after_s=2.4)
    assert json.loads(openai.body) == {"error": {"message": "full", "type": "rate_limit_error", "param": None,
                                                 "code": "queue_full"}}
    assert (b"retry-after", b"2") in openai.headers
    assert json.loads(error("ollama", 404, "model 'x' not found").body) == {"error": "model 'x' not found"}


# --- keep_alive, traffic, causes -----------------------------------------------------------------


def _instance(service: str, pid: int, model: str | None = None) -> Instance:
    return Instance(service=service, gpu=0, origin="started", pid=pid, create_time=1.0, model=model,
                    launch=Launch(argv=["x"]), state="running", since=NOW)


def test_keep_alive_is_planned_with_for_the_instance_it_was_said_for_only():
    snapshot = Snapshot(format_version=1, node="n", now=NOW, gpus=[],
                        instances=[_instance("a", 10), _instance("b", 20)])
    keep = KeepAlive()
    keep.set("a", 0.0, 10)
    keep.set("b", -1.0, 99)  # said for a process that was replaced since
    out = {i.service: i.keep_alive_s for i in keep.apply(snapshot).instances}
    assert out == {"a": 0.0, "b": None} and keep.get("b") is None and keep.get("a") == 0.0
    keep.set("a", None, 10)
    assert keep.apply(snapshot) is snapshot  # nothing said: the snapshot as it was


def test_traffic_counts_and_percentiles():
    traffic = Traffic()
    model = traffic.of("tiny", "llm")
    for ms in range(1, 101):
        model.answered(200 if ms % 10 else 503, ms / 1000)
    assert model.requests == 100 and model.errors == 10 and model.statuses == {200: 90, 503: 10}
    assert model.total.quantile(0.5) == pytest.approx(0.051) and percentile([], 0.5) is None
    assert traffic.of("tiny", "llm") is model and [m.model for m in traffic.models()] == ["tiny"]


def test_what_a_gateway_demand_caused_is_read_from_the_plan():
    p = profile("""\
        services:
          llm:
            max_mb: 4096
            priority: 1
            models: {tiny: {max_mb: 1024}, big: {max_mb: 6144}}
            managed: {type: process, exec_path: /bin/llama, args_template: "-m {model} --port {port}", port: 8080}
          comfy:
            max_mb: 3072
            priority: 4
            managed: {type: process, exec_path: /bin/comfy, args_template: "--port {port}", port: 8188}
        """)
    snapshot = Snapshot(
        format_version=1, node="n", now=NOW,
        gpus=[Gpu(index=0, total_mb=8192, used_mb=4096,
                  processes=[GpuProcess(pid=10, used_mb=1024), GpuProcess(pid=20, used_mb=3072)])],
        processes=[Process(pid=10, create_time=1.0, listening=[8080]), Process(pid=20, create_time=1.0,
                                                                               listening=[8188])],
        probes={"llm": Probe(healthy=True), "comfy": Probe(healthy=True)},
        instances=[_instance("llm", 10, "tiny").model_copy(update={"launch": Launch(
                       argv=["/bin/llama", "-m", "tiny", "--port", "8080"], port=8080)}),
                   _instance("comfy", 20).model_copy(update={"launch": Launch(
                       argv=["/bin/comfy", "--port", "8188"], port=8188)})],
        demands=[Demand(id="D1", service="llm", holder="gateway 127.0.0.1:5000", model="big", requested_at=NOW),
                 Demand(id="D2", service="llm", holder="gateway 127.0.0.1:5001", model="big", requested_at=NOW)])
    result = plan(p, snapshot)
    taken: set[str] = set()
    first = caused_by(result, snapshot, "D1", taken)
    assert [(c.kind, c.service, c.model) for c in first] == [("evict", "comfy", None), ("switch", "llm", "big")]
    assert [c.words() for c in first] == ["evicted comfy", "switched llm to big"]
    assert caused_by(result, snapshot, "D2", taken) == []  # the same switch: D1's doing


def test_text_output_leaves_out_the_gateway_s_implicit_leases_but_not_others():
    from reconciler.gateway.leases import holder
    from reconciler.render.events import format_text

    ours = {"kind": "lease.granted", "ts": "2026-11-22T16:00:00Z", "lease": "x", "holder": holder("127.0.0.1:5")}
    assert ours["holder"] == "gateway 127.0.0.1:5" and format_text(ours) is None
    assert format_text({**ours, "kind": "lease.released"}) is None
    theirs = format_text({**ours, "holder": "kiwi"})
    assert theirs is not None and "holder=kiwi" in theirs


def test_a_pull_goes_to_the_ollama_that_serves_the_model_or_the_only_one_else_a_404_says_why() -> None:
    def ollama(name: str, port: int, models: str = "") -> str:
        return (f"  {name}:\n    max_mb: 1024\n    priority: 1\n    backend: ollama\n{models}"
                f"    managed: {{type: process, exec_path: /bin/ollama, args_template: serve, port: {port}}}\n")

    llama = ("  llm:\n    max_mb: 1024\n    priority: 2\n    models: [tiny]\n"
             "    managed: {type: process, exec_path: /bin/llama-server, args_template: \"-m {model}\", port: 8080}\n")
    one = profile("services:\n" + ollama("ol", 11434) + llama)
    routes = Routes(SimpleNamespace(last_pass=lambda: None), lambda: one)  # type: ignore[arg-type]
    found = pull_target(routes, one, "qwen3:8b")
    assert isinstance(found, Target) and (found.service, found.model, found.api) == ("ol", "qwen3:8b", "ollama")
    tiny = pull_target(routes, one, "tiny")
    assert isinstance(tiny, Target) and tiny.api == "openai"  # answered "success": the profile provides it
    assert json.loads(provided(stream=False).body) == {"status": "success"}
    assert provided(stream=True).content_type == b"application/x-ndjson"

    two = profile("services:\n" + ollama("a", 11434, "    models: [llama3.2:3b]\n") + ollama("b", 11435) + llama)
    routes = Routes(SimpleNamespace(last_pass=lambda: None), lambda: two)  # type: ignore[arg-type]
    known = pull_target(routes, two, "llama3.2:3b")
    assert isinstance(known, Target) and known.service == "a"  # its models: name the one that pulls it
    why = pull_target(routes, two, "llama3.2:1b")
    assert isinstance(why, str) and "2 Ollama services could pull it (a, b)" in why and "`models:`" in why
    assert "did you mean 'llama3.2:3b'" in why

    none = profile("services:\n" + llama)
    routes = Routes(SimpleNamespace(last_pass=lambda: None), lambda: none)  # type: ignore[arg-type]
    why = pull_target(routes, none, "qwen3:8b")
    assert isinstance(why, str) and "no Ollama service in profile 'gw' could pull it" in why
