"""The gateway in front of a real model server: llama.cpp's ``llama-server``, with the real OpenAI SDK.

What the fakes cannot show: that a real OpenAI-compatible server, started,
switched and swapped by the reconciler because an OpenAI client named a
model, answers through the gateway — chat, a streamed chat, embeddings —
and that a model switch really loads the other file. The server and the two
tiny random-weight models are those of ``tests/test_e2e_llama.py`` (see
there and :mod:`reconciler.testing.llama`: the binary is built once into a
cache outside the repository; without it every test here is skipped with
the command that builds it). The model names are the models' absolute
paths (what ``-m {model}`` is filled with), with friendly aliases.

* The SDK lists the models, chats (a cold start), streams, embeds; a request
  for model B while A is loaded and idle switches the server (a new process
  whose ``/props`` names B's file, and whose greedy answer differs).
* A request for B while the server is busy with requests for A waits until
  they are answered (first come, first served), then switches it.
* Two services that do not fit together on the simulated 8 GB GPU swap by
  priority: the more important one evicts the idle other; the less
  important one waits until the more important one has idled out.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.e2e_support import Host, host  # noqa: F401
from tests.gateway_support import GatewayRun, profile
from tests.test_e2e_llama import llama_server, tiny_models  # noqa: F401  (session fixtures: skip without the binary)

START_S = 60.0
ARGS = ("-m {model} --host 127.0.0.1 --port {port} -c 512 -np 1 -t 1 --threads-http 2 --no-webui --no-warmup "
        "--embeddings --pooling mean")
PROMPT = [{"role": "user", "content": "Hello there, how are"}]

LLAMA = """\
  {name}:
    max_mb: {mb}
    priority: {priority}
    idle_stop_after_s: {idle}
    start_timeout_s: 60
    probe_interval_s: 0.5
    probe_timeout_s: 2
    request_wait_s: {wait}
    models:
{models}    managed:
      type: process
      exec_path: "{binary}"
      args_template: "{args}"
      port: {port}
"""


def llama(name: str, binary: Path, port: int, models: dict[Path, str], *, mb: int = 1024, priority: int = 1,
          idle: float = 0, wait: float = 90) -> str:
    lines = "".join(f'      "{path}": {{aliases: [{alias}]}}\n' for path, alias in models.items())
    return LLAMA.format(name=name, binary=binary, port=port, models=lines, mb=mb, priority=priority, idle=idle,
                        wait=wait, args=ARGS)


def served_file(port: int) -> str:
    response = httpx.get(f"http://127.0.0.1:{port}/props", timeout=10)
    assert response.status_code == 200, response.text[:300]
    path: str = response.json()["model_path"]
    return path


def test_the_openai_sdk_gets_each_model_from_a_real_llama_server_which_switches_when_idle(
        llama_server: Path, tiny_models: tuple[Path, Path], host: Host) -> None:
    model_a, model_b = tiny_models
    port = host.port()
    host.write(profile(llama("llm", llama_server, port, {model_a: "tiny-a", model_b: "tiny-b"}), name="llama"))
    gw = GatewayRun(host)
    try:
        sdk = gw.openai(timeout=START_S)
        assert {m.id: m.owned_by for m in sdk.models.list()} == {
            str(model_a): "llm", "tiny-a": "llm", str(model_b): "llm", "tiny-b": "llm"}

        first = sdk.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=8, temperature=0)
        said_a = first.choices[0].message.content
        assert said_a and first.usage is not None and first.usage.completion_tokens == 8
        assert first.model == str(model_a)  # llama-server names the file it loaded
        pid_a = gw.instance("llm")["pid"]
        assert served_file(port) == str(model_a)
        assert gw.run.wait_kind("gateway.cold", asked="tiny-a")["caused"] == [
            {"kind": "start", "service": "llm", "model": str(model_a)}]

        stream = sdk.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=8, temperature=0,
                                             stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == said_a and len(pieces) >= 2  # the same greedy answer, in pieces

        vectors = sdk.embeddings.create(model="tiny-a", input=["hello", "world"])
        assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 64  # the tiny model's width
        assert vectors.data[0].embedding != vectors.data[1].embedding

        switched = sdk.chat.completions.create(model="tiny-b", messages=PROMPT, max_tokens=8, temperature=0)
        said_b = switched.choices[0].message.content
        after = gw.instance("llm")
        assert after["model"] == str(model_b) and after["pid"] != pid_a
        assert served_file(port) == str(model_b) and said_b != said_a
        assert gw.run.wait_kind("gateway.cold", asked="tiny-b")["caused"] == [
            {"kind": "switch", "service": "llm", "model": str(model_b)}]
        ollama = gw.ollama.post("/api/chat", json={"model": "tiny-b", "messages": PROMPT, "stream": False,
                                                   "options": {"temperature": 0, "num_predict": 8}}).json()
        assert ollama["message"]["content"] == said_b and ollama["eval_count"] == 8  # translated for llama-server
        gw.assert_clean()
    finally:
        gw.close()


def test_a_request_for_another_model_while_llama_server_is_busy_waits_for_its_requests(
        llama_server: Path, tiny_models: tuple[Path, Path], host: Host) -> None:
    model_a, model_b = tiny_models
    port = host.port()
    host.write(profile(llama("llm", llama_server, port, {model_a: "tiny-a", model_b: "tiny-b"}), name="llama"))
    gw = GatewayRun(host)
    try:
        sdk = gw.openai(timeout=START_S)
        sdk.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=1)  # A is loaded
        ended_a: list[float] = []
        errors: list[BaseException] = []

        def ask_a() -> None:
            try:
                sdk.chat.completions.create(model="tiny-a", messages=PROMPT, max_tokens=400, temperature=0,
                                            extra_body={"ignore_eos": True})
                ended_a.append(time.monotonic())
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        busy = [threading.Thread(target=ask_a) for _ in range(8)]  # -np 1: one at a time, the rest queue
        for thread in busy:
            thread.start()

        def all_of_a_arrived() -> bool:  # (asked after B, one would rightly wait for B and switch back: a busy CI)
            a = gw.model(str(model_a))
            return a["queued"] >= 1 and a["requests"] - 1 + a["in_flight"] + a["queued"] == len(busy)

        gw.wait_until(all_of_a_arrived, "every request for A arrived, some queued behind the one in flight")
        answer = sdk.chat.completions.create(model="tiny-b", messages=PROMPT, max_tokens=4, temperature=0)
        ended_b = time.monotonic()
        for thread in busy:
            thread.join(START_S)
        assert not errors and len(ended_a) == 8
        assert answer.model == str(model_b) and gw.instance("llm")["model"] == str(model_b)
        assert ended_b > max(ended_a)  # B waited for every request for A asked before it, then switched
        assert gw.model(str(model_a))["requests"] == 9 and gw.model(str(model_a))["errors"] == 0
        cold = gw.run.wait_kind("gateway.cold", asked="tiny-b")
        assert cold["caused"] == [{"kind": "switch", "service": "llm", "model": str(model_b)}]
    finally:
        gw.close()


def test_two_llama_servers_that_do_not_fit_together_swap_by_priority(
        llama_server: Path, tiny_models: tuple[Path, Path], host: Host) -> None:
    model_a, model_b = tiny_models
    hi, lo = host.port(), host.port()
    host.write(profile(llama("hi", llama_server, hi, {model_a: "hi-a"}, mb=5000, priority=1, idle=2),
                       llama("lo", llama_server, lo, {model_b: "lo-b"}, mb=5000, priority=2), name="llama"))
    gw = GatewayRun(host)
    try:
        sdk = gw.openai(timeout=START_S)
        assert sdk.chat.completions.create(model="lo-b", messages=PROMPT, max_tokens=2).model == str(model_b)
        assert gw.instance("lo") is not None and gw.instance("hi") is None

        assert sdk.chat.completions.create(model="hi-a", messages=PROMPT, max_tokens=2).model == str(model_a)
        assert gw.instance("lo") is None  # evicted: 5000 + 5000 MB do not fit on 8192
        evicted = gw.run.wait_kind("gateway.cold", asked="hi-a")
        assert evicted["caused"] == [{"kind": "evict", "service": "lo", "model": None},
                                     {"kind": "start", "service": "hi", "model": str(model_a)}]
        assert gw.status()["gpus"][0]["reserved_started_mb"] == 5000

        started = time.monotonic()
        back = sdk.chat.completions.create(model="lo-b", messages=PROMPT, max_tokens=2)
        waited = time.monotonic() - started
        assert back.model == str(model_b) and gw.instance("hi") is None
        assert waited >= 1.5, f"lo did not wait for hi (priority 1) to idle out: {waited:.2f} s"
        assert gw.run.wait_kind("gateway.cold", asked="lo-b")["caused"] == [
            {"kind": "start", "service": "lo", "model": str(model_b)}]  # nothing more important was evicted
        assert gw.model(str(model_a))["caused"]["evict"] == 1
    finally:
        gw.close()

