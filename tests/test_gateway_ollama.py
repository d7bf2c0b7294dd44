"""The gateway's Ollama API: translated for an OpenAI-only upstream, passed through to an Ollama, keep_alive.

An Ollama client's requests (``/api/chat``, ``/api/generate``,
``/api/embed``, what Open WebUI and the Ollama SDKs send) against
``reconciler watch --api --gateway``: to a fake OpenAI-only model server
(:mod:`reconciler.testing.fake_openai`) they are translated both ways and
the NDJSON stream is checked line by line as it arrives; to a fake Ollama
(:mod:`reconciler.testing.fake_ollama`) they pass through, and its
``/api/tags`` are routable. ``keep_alive`` decides how long an instance of
ours stays once idle.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest

from reconciler.testing.fake_openai import embedding, reply
from tests.e2e_support import Host, host  # noqa: F401
from tests.gateway_support import GatewayRun, fake, fake_ollama, profile, upstream_stats

MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]
CHUNK_S = 0.2


def lines_as_they_arrive(gw: GatewayRun, path: str, body: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """POST and read the NDJSON answer line by line: (seconds since the request, the parsed line)."""
    started = time.monotonic()
    out = []
    with gw.ollama.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "application/x-ndjson"
        for line in response.iter_lines():
            if line:
                out.append((time.monotonic() - started, json.loads(line)))
    return out


def test_an_ollama_chat_stream_from_an_openai_only_upstream_is_translated_chunk_by_chunk(host: Host) -> None:
    port = host.port()
    host.write(profile(fake("llm", port, models=["tiny"], args=f"--chunk-delay {CHUNK_S}")))
    gw = GatewayRun(host)
    try:
        assert gw.ollama.post("/api/generate", json={"model": "tiny"}).json()["done_reason"] == "load"  # warm it
        arrived = lines_as_they_arrive(gw, "/api/chat", {"model": "tiny", "messages": MESSAGES,
                                                        "options": {"num_predict": 6, "temperature": 0}})
        lines = [line for _, line in arrived]
        assert [line["message"]["content"] for line in lines[:-1]] == reply("tiny", 6)
        assert all(line["model"] == "tiny" and line["done"] is False and line["message"]["role"] == "assistant"
                   for line in lines[:-1])
        final = lines[-1]
        assert final["done"] is True and final["done_reason"] == "length" and final["message"]["content"] == ""
        assert final["eval_count"] == 6 and final["prompt_eval_count"] == 3 and final["total_duration"] > 0
        # relayed as the upstream produced them, not buffered: the first line came a whole stream before the last
        times = [t for t, _ in arrived]
        assert times[-1] - times[0] >= 4 * CHUNK_S * 0.8, times
        assert all(b - a >= CHUNK_S * 0.5 for a, b in itertools.pairwise(times[:6])), times  # the 6 pieces
        sent = upstream_stats(port)["last"]
        assert sent["model"] == "tiny" and sent["max_tokens"] == 6 and sent["temperature"] == 0
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert sent["messages"] == MESSAGES

        generated = gw.ollama.post("/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                                          "options": {"num_predict": 3}}).json()
        assert generated["response"] == "".join(reply("tiny", 3)) and generated["done"] is True
        streamed = lines_as_they_arrive(gw, "/api/generate", {"model": "tiny", "prompt": "hi", "raw": True,
                                                              "options": {"num_predict": 2}})
        assert [line.get("response") for _, line in streamed] == [*reply("tiny", 2), ""]
        assert upstream_stats(port)["paths"]["/v1/completions"] == 1  # raw: plain completions, no chat template
        embedded = gw.ollama.post("/api/embed", json={"model": "tiny", "input": ["a", "b"]}).json()
        assert embedded["model"] == "tiny" and len(embedded["embeddings"]) == 2
        assert embedded["embeddings"][0] == pytest.approx(embedding("a", 8), abs=1e-6)
        legacy = gw.ollama.post("/api/embeddings", json={"model": "tiny", "prompt": "a"}).json()
        assert legacy["embedding"] == pytest.approx(embedding("a", 8), abs=1e-6)

        missing = gw.ollama.post("/api/chat", json={"model": "tiny:7b", "messages": MESSAGES})
        assert missing.status_code == 404 and "did you mean 'tiny'?" in missing.json()["error"]
        bad = gw.ollama.post("/api/chat", json={"model": "tiny", "messages": MESSAGES, "keep_alive": "forever"})
        assert bad.status_code == 400 and "keep_alive 'forever'" in bad.json()["error"]
        tags = gw.ollama.get("/api/tags").json()["models"]
        assert [t["name"] for t in tags] == ["tiny"]
        assert [m["name"] for m in gw.ollama.get("/api/ps").json()["models"]] == ["tiny"]
        assert gw.ollama.get("/").text == "Ollama is running"
        gw.assert_clean()
    finally:
        gw.close()


def test_an_ollama_upstream_is_passed_through_and_its_own_tags_are_routable(host: Host) -> None:
    port = host.port()
    host.write(profile(fake_ollama("ollama", port, ["llama3.2:3b", "qwen3:latest"], args="--chunk-delay 0.05")))
    gw = GatewayRun(host)
    try:
        gw.wait_until(lambda: any(t["name"] == "qwen3:latest" for t in gw.ollama.get("/api/tags").json()["models"]),
                      "the Ollama's own tags listed")
        tags = {t["name"]: t for t in gw.ollama.get("/api/tags").json()["models"]}
        assert set(tags) == {"llama3.2:3b", "qwen3:latest", "ollama"}
        assert tags["llama3.2:3b"]["details"] == {"format": "gguf"}  # its own entry, passed through
        arrived = lines_as_they_arrive(gw, "/api/chat", {"model": "qwen3", "messages": MESSAGES, "keep_alive": 0,
                                                        "options": {"num_predict": 3}})
        lines = [line for _, line in arrived]
        assert [line["message"]["content"] for line in lines[:-1]] == reply("qwen3:latest", 3)
        assert lines[-1]["done"] is True
        stats = gw.ollama.get(f"http://127.0.0.1:{port}/stats").json()
        assert stats["prompts"] == 1 and stats["last"]["model"] == "qwen3:latest"
        assert stats["last"]["keep_alive"] == 0  # Ollama's own keep_alive is Ollama's business: passed on
        assert [m["name"] for m in gw.ollama.get("/api/ps").json()["models"]] == ["llama3.2:3b", "qwen3:latest"]
        assert gw.ollama.get("/api/version").json() == {"version": "0.6.8"}  # this fake has no /api/version
        assert gw.instance("ollama")["state"] == "running"  # keep_alive 0 unloads inside Ollama, never stops it
        shown = gw.ollama.post("/api/show", json={"model": "qwen3:latest"})
        assert shown.status_code == 200 and shown.json()["modelfile"] == "FROM qwen3:latest"  # Ollama's own
        unknown = gw.ollama.post("/api/show", json={"model": "qwen4"})
        assert unknown.status_code == 404 and "not served here" in unknown.json()["error"]  # Ollama's shape
    finally:
        gw.close()


def test_show_describes_a_model_whose_service_is_not_running_without_starting_it(host: Host) -> None:
    host.write(profile(fake("llm", host.port(), models={"tiny": 1024})))
    gw = GatewayRun(host)
    try:
        shown = gw.ollama.post("/api/show", json={"model": "tiny"})
        assert shown.status_code == 200, shown.text
        assert shown.json()["details"]["family"] == "llm" and "completion" in shown.json()["capabilities"]
        assert gw.instance("llm") is None  # a question about a model starts nothing
        assert gw.ollama.post("/api/show", json={}).status_code == 400
    finally:
        gw.close()


def test_pull_starts_the_ollama_relays_its_progress_and_the_model_is_then_served(host: Host) -> None:
    """``POST /api/pull``: a name nobody serves yet goes to the one Ollama (started on demand, held until the pull
    ends), its progress lines relayed as they come; a registry error is Ollama's own line; a model of an
    OpenAI-only server is already there: ``success``, nothing started."""
    port = host.port()
    host.write(profile(fake_ollama("ollama", port, ["llama3.2:3b"], always_on=False,
                                   args="--pullable newmodel --pull-s 1.0"),
                       fake("llm", host.port(), models={"tiny": 1024})))
    gw = GatewayRun(host)
    try:
        assert gw.instance("ollama") is None  # on demand: not running before the pull
        arrived = lines_as_they_arrive(gw, "/api/pull", {"model": "newmodel"})
        statuses = [line["status"] for _, line in arrived]
        assert statuses[0] == "pulling manifest" and statuses[-3:] == [
            "verifying sha256 digest", "writing manifest", "success"]
        progress = [line for _, line in arrived if "completed" in line]
        assert [round(5 * line["completed"] / line["total"]) for line in progress] == [0, 1, 2, 3, 4, 5]
        spread = arrived[-1][0] - arrived[0][0]
        assert spread >= 0.7, f"the lines came together ({spread:.2f} s apart): buffered, not relayed as they came"
        assert gw.instance("ollama")["state"] == "running"  # started for the pull
        assert gw.status()["leases"] == []  # held while it pulled, released at its end

        gw.wait_until(lambda: any(t["name"] == "newmodel:latest" for t in gw.ollama.get("/api/tags").json()["models"]),
                      "the pulled model listed by the Ollama's next probe")
        answer = gw.ollama.post("/api/chat", json={"model": "newmodel", "messages": MESSAGES, "stream": False,
                                                   "options": {"num_predict": 2}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["message"]["content"] == "".join(reply("newmodel:latest", 2))

        refused = [line for _, line in lines_as_they_arrive(gw, "/api/pull", {"name": "nosuch:7b"})]
        assert refused == [{"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]

        streamed = gw.ollama.post("/api/pull", json={"model": "tiny"})
        assert streamed.status_code == 200 and streamed.headers["content-type"] == "application/x-ndjson"
        assert [json.loads(line) for line in streamed.text.splitlines()] == [{"status": "success"}]
        whole = gw.ollama.post("/api/pull", json={"model": "tiny", "stream": False})
        assert whole.status_code == 200 and whole.json() == {"status": "success"}
        assert gw.instance("llm") is None  # a model the profile provides: nothing to download, nothing started

        bad = gw.ollama.post("/api/pull", content=b"not json")
        assert bad.status_code == 400 and "naming the \"model\" to pull" in bad.json()["error"]
    finally:
        gw.close()


def test_keep_alive_0_stops_the_instance_when_idle_and_minus_1_keeps_it(host: Host) -> None:
    short, keep = host.port(), host.port()
    host.write(profile(fake("short", short, model="s"), fake("keep", keep, model="k", idle_stop_after_s=0.5)))
    gw = GatewayRun(host)
    try:
        kept = gw.ollama.post("/api/chat", json={"model": "k", "messages": MESSAGES, "stream": False,
                                                 "keep_alive": -1})
        assert kept.status_code == 200 and kept.json()["done"] is True
        answer = gw.ollama.post("/api/chat", json={"model": "s", "messages": MESSAGES, "stream": False,
                                                   "keep_alive": 0})
        assert answer.json()["message"]["content"] == "".join(reply("s", 8))
        stopped = gw.run.wait_kind("action.finished", action="stop:short", timeout_s=10)
        assert stopped["status"] == "done"
        started = [e for e in gw.run.events if e.get("kind") == "action.started" and e.get("action") == "stop:short"]
        assert "keep_alive of its last request is 0 s" in started[0]["message"]
        time.sleep(1.5)  # three times idle_stop_after_s: keep_alive -1 keeps it
        assert gw.instance("keep")["state"] == "running" and gw.instance("short") is None

        loaded = gw.ollama.post("/api/generate", json={"model": "s"}).json()  # load: starts it, no prompt
        assert loaded["done_reason"] == "load" and gw.instance("short")["state"] == "running"
        assert upstream_stats(short)["requests"] == 0
        unloaded = gw.ollama.post("/api/generate", json={"model": "s", "keep_alive": 0}).json()
        assert unloaded["done_reason"] == "unload"
        gw.run.wait_kind("instance.stopped", service="short", timeout_s=10)
        assert gw.ollama.post("/api/generate", json={"model": "s", "keep_alive": 0}).json()["done_reason"] == "unload"
        time.sleep(0.5)
        assert gw.instance("short") is None  # unloading a model that is not loaded starts nothing
    finally:
        gw.close()
