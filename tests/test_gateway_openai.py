"""The gateway with the real OpenAI Python SDK as its client, against fake OpenAI-compatible model servers.

``reconciler watch --api --gateway`` (what ``serve --gateway`` runs) as a
real process on a simulated 8 GB GPU; the services are
:mod:`reconciler.testing.fake_openai` processes the reconciler starts
(``--model {model}``: one model per process, as ``llama-server -m {model}``).
The SDK lists the models, chats, streams, completes and embeds; the tests
check what reached the upstream, what the reconciler did for it (a start, a
model switch with the model's own ceiling), and what the status, metrics and
events say per model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from reconciler.cli.status_cmd import render
from reconciler.testing.fake_openai import embedding, reply
from tests.e2e_support import Host, host  # noqa: F401
from tests.gateway_support import GatewayRun, fake, profile, upstream_stats

MESSAGES = [{"role": "user", "content": "hello"}]


def test_the_openai_sdk_lists_chats_streams_completes_and_embeds_through_the_gateway(host: Host) -> None:
    llm, emb = host.port(), host.port()
    host.write(profile(
        fake("llm", llm, models={"tiny": 1024, "big": 6144}, extra="", mb=4096, priority=1),
        fake("embed", emb, model="emb", mb=1024, max_concurrent=4),
    ).replace("      tiny: {max_mb: 1024}\n", "      tiny: {max_mb: 1024, aliases: [t]}\n"))
    gw = GatewayRun(host)
    try:
        sdk = gw.openai()
        listed = {m.id: m.owned_by for m in sdk.models.list()}
        assert listed == {"tiny": "llm", "t": "llm", "big": "llm", "emb": "embed"}
        assert sdk.models.retrieve("big").owned_by == "llm"
        assert gw.status()["instances"] == []  # nothing runs until a request asks

        chat = sdk.chat.completions.create(model="t", messages=MESSAGES, max_tokens=4)  # an alias: cold
        assert chat.choices[0].message.content == "".join(reply("tiny", 4))
        assert upstream_stats(llm)["last"]["model"] == "tiny"  # the alias was forwarded as the model's name
        assert gw.instance("llm")["model"] == "tiny"
        cold = gw.run.wait_kind("gateway.cold", model="tiny")
        assert cold["asked"] == "t" and cold["client"].startswith("127.0.0.1:")
        assert cold["caused"] == [{"kind": "start", "service": "llm", "model": "tiny"}]

        stream = sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, stream=True)
        pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
        assert pieces == reply("tiny", 5)

        text = sdk.completions.create(model="tiny", prompt="once upon", max_tokens=3)
        assert text.choices[0].text == "".join(reply("tiny", 3))

        vectors = sdk.embeddings.create(model="emb", input=["hello", "world"])
        assert [v.embedding == pytest.approx(embedding(text, 8), abs=1e-6)
                for v, text in zip(vectors.data, ["hello", "world"], strict=True)] == [True, True]

        with pytest.raises(openai.NotFoundError) as unknown:
            sdk.chat.completions.create(model="bgi", messages=MESSAGES)
        assert "'bgi' is not served here; did you mean 'big'?" in str(unknown.value)
        assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]

        traffic = gw.model("tiny")
        assert traffic["requests"] == 3 and traffic["errors"] == 0 and traffic["in_flight"] == 0
        assert traffic["caused"] == {"start": 1, "switch": 0, "evict": 0}
        assert traffic["ttfb_p50_ms"] > 0 and traffic["total_p99_ms"] >= traffic["ttfb_p50_ms"]
        assert gw.model("emb")["requests"] == 1
        table = render(gw.status())
        assert "MODEL" in table and "TTFB P50" in table and "1 start" in table
        metrics = gw.http.get("/metrics").text
        assert 'reconciler_gateway_requests_total{model="tiny",service="llm",status="200"} 3.0' in metrics
        assert 'reconciler_gateway_caused_total{action="start",model="tiny",service="llm"} 1.0' in metrics
        assert 'reconciler_gateway_ttfb_seconds_count{model="tiny",service="llm"} 3.0' in metrics
        gw.assert_clean()  # every implicit lease ended with its answer
    finally:
        gw.close()


def test_another_model_switches_the_idle_instance_and_its_own_ceiling_is_reserved(host: Host) -> None:
    llm = host.port()
    host.write(profile(fake("llm", llm, models={"tiny": 1024, "big": 6144}, mb=4096, priority=1)))
    gw = GatewayRun(host)
    try:
        sdk = gw.openai()
        sdk.chat.completions.create(model="tiny", messages=MESSAGES)
        first = gw.instance("llm")
        assert first["model"] == "tiny"
        # the status's GPU figures come from the pass's own observation, taken once the start is done
        gw.wait_until(lambda: gw.status()["gpus"][0]["reserved_started_mb"] == 1024, "tiny's 1024 MB reserved")

        answer = sdk.chat.completions.create(model="big", messages=MESSAGES, max_tokens=2)
        assert answer.choices[0].message.content == "".join(reply("big", 2))
        second = gw.instance("llm")
        assert second["model"] == "big" and second["pid"] != first["pid"]
        gw.wait_until(lambda: gw.status()["gpus"][0]["reserved_started_mb"] == 6144,  # big's own max_mb, not 4096
                      "big's 6144 MB reserved")
        switch = gw.run.wait_kind("gateway.cold", model="big")
        assert switch["caused"] == [{"kind": "switch", "service": "llm", "model": "big"}]
        assert "switched llm to big" in switch["message"]
        assert gw.model("big")["caused"]["switch"] == 1
        gw.assert_clean()
    finally:
        gw.close()


def test_a_request_for_another_model_waits_while_the_instance_is_busy(host: Host) -> None:
    llm = host.port()
    host.write(profile(fake("llm", llm, models=["a", "b"], args="--chunk-delay 0.1")))
    gw = GatewayRun(host)
    try:
        sdk = gw.openai()
        sdk.chat.completions.create(model="a", messages=MESSAGES)  # a is loaded, warm
        ended: dict[str, float] = {}

        def slow_stream() -> None:
            chunks = sdk.chat.completions.create(model="a", messages=MESSAGES, max_tokens=15, stream=True)
            assert len([c for c in chunks if c.choices]) == 15
            ended["a"] = time.monotonic()

        streaming = threading.Thread(target=slow_stream)
        streaming.start()
        gw.wait_until(lambda: gw.model("a")["in_flight"] == 1, "the stream in flight")
        answer = sdk.chat.completions.create(model="b", messages=MESSAGES, max_tokens=2)
        ended["b"] = time.monotonic()
        streaming.join(30)
        assert answer.choices[0].message.content == "".join(reply("b", 2))
        assert ended["b"] > ended["a"]  # b waited for a's stream to end: a busy instance keeps serving
        assert gw.instance("llm")["model"] == "b"
        assert upstream_stats(llm)["requests"] == 1  # a fresh process, started with b
    finally:
        gw.close()


def test_past_the_queue_a_429_with_retry_after_and_past_the_wait_a_503_with_the_plan_s_reason(host: Host) -> None:
    busy, huge = host.port(), host.port()
    host.write(profile(
        fake("busy", busy, model="one", extra="    max_queued: 1\n", args="--chunk-delay 0.2"),
        fake("huge", huge, model="whale", mb=9000, extra="    request_wait_s: 1\n"),
    ))
    gw = GatewayRun(host)
    try:
        sdk = gw.openai()
        sdk.chat.completions.create(model="one", messages=MESSAGES)
        holders = [threading.Thread(target=lambda: list(sdk.chat.completions.create(
            model="one", messages=MESSAGES, max_tokens=10, stream=True))) for _ in range(2)]
        for thread in holders:
            thread.start()
        gw.wait_until(lambda: gw.model("one")["in_flight"] == 1 and gw.model("one")["queued"] == 1,
                      "one in flight and one queued")
        raw = httpx.post(f"{gw.gateway}/v1/chat/completions", json={"model": "one", "messages": MESSAGES}, timeout=30)
        assert raw.status_code == 429 and int(raw.headers["retry-after"]) >= 1
        assert raw.json()["error"]["code"] == "queue_full" and "max_queued 1" in raw.json()["error"]["message"]
        for thread in holders:
            thread.join(30)

        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as refused:
            sdk.chat.completions.create(model="whale", messages=MESSAGES)
        assert refused.value.status_code == 503 and time.monotonic() - started < 10
        assert "needs 9000 MB of GPU memory" in str(refused.value) or "needs 9000 MB on GPU 0" in str(refused.value)
        event = gw.run.wait_kind("gateway.refused", model="whale")
        assert event["client"].startswith("127.0.0.1:") and "9000 MB" in event["message"]
        gw.assert_clean()
    finally:
        gw.close()


def test_with_a_token_the_sdk_s_api_key_is_the_bearer_and_off_loopback_needs_one(host: Host) -> None:
    port = host.port()
    host.write(profile(fake("llm", port, model="m")))
    token = host.root / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    gw = GatewayRun(host, "--token-file", str(token))
    try:
        with pytest.raises(openai.AuthenticationError) as denied:
            gw.openai(api_key="wrong").chat.completions.create(model="m", messages=MESSAGES)
        assert "Authorization: Bearer" in str(denied.value)
        assert [m.id for m in gw.openai(api_key="wrong").models.list()] == ["m"]  # reads are open, as the API's
        assert gw.openai(api_key="s3cret").chat.completions.create(model="m", messages=MESSAGES).choices
        assert gw.ollama.post("/api/chat", json={"model": "m", "messages": MESSAGES}).json() == {
            "error": "this gateway needs 'Authorization: Bearer <token>' (the token in the server's --token-file; "
                     "an OpenAI SDK sends its api_key so)"}
    finally:
        gw.close()
    refused = subprocess.run(
        [sys.executable, "-m", "reconciler", "watch", "--profile", str(host.profile), "--gpu", "sim:8192",
         "--state-dir", str(host.root / "other-state"), "--gateway", "0.0.0.0:0"],
        env=host.env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "refusing to listen on 0.0.0.0:0 without a token" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_gateway_stops_with_the_reconciler_and_leaves_the_services_running(host: Host) -> None:
    port = host.port()
    host.write(profile(fake("llm", port, model="m")))
    gw = GatewayRun(host)
    try:
        gw.openai().chat.completions.create(model="m", messages=MESSAGES)
        pid = gw.instance("llm")["pid"]
    finally:
        gw.close()
    gw.run.signal(signal.SIGTERM)
    assert gw.run.wait_exit() == 0
    assert json.loads(httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).text)["requests"] == 1
    assert pid in host.listeners(port)
