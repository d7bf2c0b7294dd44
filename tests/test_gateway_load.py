"""The gateway under pressure: clients that go away, and 200 requests at once for three models on a GPU for two.

``reconciler watch --api --gateway`` as a real process with fake
OpenAI-compatible model servers (:mod:`reconciler.testing.fake_openai`,
which count the requests they run at once and the streams cut short, and
write what they saw when they exit).

* A client that disconnects mid-stream leaves no lease behind, and the
  upstream request is cancelled (the model server sees its connection close
  and stops); one that goes away while its model is still starting leaves
  neither a demand nor a lease.
* A client that stops reading stops the upstream too, once the buffers on
  the way are full: the gateway buffers nothing of its own.
* 200 concurrent requests (the real OpenAI SDK, async) over three models,
  one per service, on a simulated GPU that holds two of them: every request
  is answered with its own model's reply, no instance ever runs more
  requests at once than ``max_concurrent``, and the GPU's reservations and
  usage never exceed its total (sampled throughout from ``/v1/status``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx

from reconciler.testing.fake_openai import reply
from tests.e2e_support import Host, host  # noqa: F401
from tests.gateway_support import GatewayRun, fake, profile, upstream_stats

MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_client_that_disconnects_mid_stream_cancels_the_upstream_and_leaves_no_lease(host: Host) -> None:
    port, slow = host.port(), host.port()
    host.write(profile(fake("llm", port, model="m", args="--chunk-delay 0.2 --tokens 50"),
                       fake("slow", slow, model="late", args="--startup-delay 3")))
    gw = GatewayRun(host)
    try:
        gw.openai().chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
        with httpx.Client(base_url=gw.gateway, timeout=30) as client, client.stream(
                "POST", "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}) as response:
            assert response.status_code == 200
            events = response.iter_lines()
            first = [line for line in (next(events), next(events), next(events)) if line.startswith("data:")]
            assert json.loads(first[0][5:])["choices"][0]["delta"]["content"] == "m:"
            assert gw.model("m")["in_flight"] == 1 and len(gw.status()["leases"]) == 1
        # the connection is closed with 47 chunks to go
        gw.wait_until(lambda: upstream_stats(port)["cancelled"] == 1, "the upstream stream cancelled", timeout_s=5)
        gw.wait_until(lambda: not gw.status()["leases"], "the lease released", timeout_s=5)
        stats = upstream_stats(port)
        assert stats["in_flight"] == 0 and stats["completed_streams"] == 0
        traffic = gw.model("m")
        assert traffic["disconnected"] == 1 and traffic["in_flight"] == 0

        with httpx.Client(base_url=gw.gateway, timeout=httpx.Timeout(30, read=0.7)) as client:
            try:
                client.post("/v1/chat/completions", json={"model": "late", "messages": MESSAGES})
                raise AssertionError("answered before its model could have started")
            except httpx.ReadTimeout:
                pass  # the client gives up and closes its connection while the service starts
        gw.wait_until(lambda: not gw.status()["demands"], "the demand withdrawn", timeout_s=5)
        withdrawn = gw.run.wait_kind("demand.withdrawn", service="slow")
        assert withdrawn["holder"].startswith("gateway 127.0.0.1:")
        gw.wait_until(lambda: (gw.instance("slow") or {}).get("state") == "running", "slow started", timeout_s=15)
        assert not gw.status()["leases"] and gw.model("late")["disconnected"] == 1
    finally:
        gw.close()


def test_a_slow_client_s_backpressure_reaches_the_upstream_nothing_is_buffered(host: Host) -> None:
    port = host.port()
    total = 300_000  # chunks of ~200 bytes: far more than every buffer on the way can hold
    host.write(profile(fake("llm", port, model="m")))
    gw = GatewayRun(host)
    try:
        gw.openai().chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
        with httpx.Client(base_url=gw.gateway, timeout=60) as client, client.stream(
                "POST", "/v1/chat/completions",
                json={"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": total}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the stream runs; now the client stops reading
            time.sleep(2.0)
            stalled = upstream_stats(port)["chunks_sent"]
            time.sleep(0.5)
            still = upstream_stats(port)["chunks_sent"]
            assert stalled < total // 2, f"the upstream wrote {stalled} of {total} chunks for a client that reads none"
            assert still - stalled < 500, f"the upstream kept writing ({stalled} → {still}) while nobody read"
            read = sum(1 for _ in zip(range(2000), lines, strict=False))
            assert read == 2000  # reading again lets it go on
        gw.wait_until(lambda: upstream_stats(port)["cancelled"] == 1, "the stream cancelled", timeout_s=10)
        gw.wait_until(lambda: not gw.status()["leases"], "the lease released", timeout_s=10)
    finally:
        gw.close()


def test_200_concurrent_requests_over_three_models_on_a_gpu_that_fits_two(host: Host) -> None:
    stats_file = host.root / "upstream-stats.jsonl"
    ports = {name: host.port() for name in ("a", "b", "c")}
    host.write(profile(*(
        fake(name, port, model=f"model-{name}", mb=3072, max_concurrent=4, idle_stop_after_s=0.3,
             args=f"--delay 0.05 --chunk-delay 0.01 --tokens 4 --stats-file {stats_file}",
             extra="    request_wait_s: 120\n    max_queued: 100\n")
        for name, port in ports.items())))
    gw = GatewayRun(host)
    samples: list[dict] = []
    sampling = threading.Event()

    def sample() -> None:
        with httpx.Client(base_url=gw.url, timeout=10) as api:
            while not sampling.is_set():
                samples.append(api.get("/v1/status").json())
                time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        async def burst() -> list[tuple[str, str]]:
            sdk = gw.async_openai(timeout=120)

            async def one(i: int) -> tuple[str, str]:
                model = f"model-{'abc'[i % 3]}"
                if i % 5 == 0:
                    stream = await sdk.chat.completions.create(model=model, messages=MESSAGES, stream=True)
                    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                else:
                    answer = await sdk.chat.completions.create(model=model, messages=MESSAGES)
                    text = answer.choices[0].message.content or ""
                return model, text

            try:
                return await asyncio.gather(*(one(i) for i in range(200)))
            finally:
                await sdk.close()

        started = time.monotonic()
        answers = asyncio.run(burst())
        took = time.monotonic() - started
    finally:
        sampling.set()
        sampler.join(30)
    try:
        assert len(answers) == 200
        assert all(text == "".join(reply(model, 4)) for model, text in answers), answers[:5]
        for name in "abc":
            traffic = gw.model(f"model-{name}")
            assert traffic["requests"] in (66, 67) and traffic["errors"] == 0, traffic
        assert sum(gw.model(f"model-{n}")["caused"]["start"] for n in "abc") >= 3  # each model started at least once
        swapped = gw.run.wait_for(lambda e: e.get("kind") == "action.finished" and e.get("status") == "done"
                                  and str(e.get("action", "")).startswith("stop:"), what="an idle stop")
        assert swapped["action"] in ("stop:a", "stop:b") and swapped["status"] == "done"  # c waited for one to idle
        # what every model server saw: those stopped since wrote it when they exited, the running ones say it now
        seen = [json.loads(line) for line in stats_file.read_text().splitlines()] if stats_file.exists() else []
        seen += [upstream_stats(port) for name, port in ports.items() if gw.instance(name) is not None]
        assert sum(s["requests"] for s in seen) == 200
        assert max(s["max_in_flight"] for s in seen) <= 4, seen
        assert len(samples) > 10, f"only {len(samples)} status samples in {took:.1f} s"
        for status in samples:
            for gpu in status["gpus"]:
                booked = gpu["reserved_started_mb"] + gpu["adopted_mb"] + gpu["leased_mb"]
                assert booked <= gpu["total_mb"] and gpu["used_mb"] <= gpu["total_mb"], gpu
            held: dict[str, int] = {}
            for lease in status["leases"]:
                held[lease["service"]] = held.get(lease["service"], 0) + 1
            assert all(n <= 4 for n in held.values()), held
        gw.wait_until(lambda: not gw.status()["leases"] and not gw.status()["demands"], "nothing left behind")
    finally:
        gw.close()
