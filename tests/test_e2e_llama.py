"""End to end with a real model server: llama.cpp's ``llama-server`` under ``reconciler serve``.

The other end-to-end tests run fake services that answer health checks and
nothing else. Here the service is the real thing — ``llama-server -m {model}
--port {port}``, built from source by :mod:`reconciler.testing.llama`, on the
CPU, with two tiny random-weight llama models generated for the session
(``tiny-llama-a.gguf`` and ``-b``, ~0.45 MB each; their absolute paths are the
model names). Against a real ``serve`` (HTTP on loopback, a simulated 8 GB
GPU, a Host of its own per test) they check what only a real server shows:

* a cold lease starts llama-server, and the lease's URL really completes a
  prompt (``/completion`` and the OpenAI-compatible ``/v1/completions``);
* a lease for the other model, while the first is idle, restarts the server
  with the other file: a new process whose argv names it, whose ``/props``
  reports it, and whose answer differs;
* ``kill -9`` of an ``always_on`` llama-server is noticed (``instance.gone``),
  backed off, and the server is started again once the first backoff has
  passed, and serves;
* a llama-server the test started before the reconciler, on the port of an
  ``adopt: true`` service, is adopted — leased, never started twice, never
  signalled, still serving after the reconciler exits.

**Where the binary comes from: the cache only.** Building llama-server takes
about ten minutes of two cores, so a test run never builds it: the session
fixture looks for it in the cache (:func:`reconciler.testing.llama.find_server`,
``~/.cache/reconciler/llama-server/<version>/``) and, when it is not there,
every test here is skipped with the reason and the command that fills the
cache (``.venv/bin/python -m reconciler.testing.llama build``). ``.ci/run``
runs that build before the suite, so CI always runs these tests (unless the
build itself cannot run: no cmake or compiler, no index; the skip then says
so). The tiny models need only the ``gguf`` test extra and take well under a
second. Every wait is bounded, every port is loopback, and the Host's
teardown kills every process a test started (the foreign server too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from reconciler.core.backoff import DEFAULT_POLICY as BACKOFF_POLICY
from reconciler.testing.llama import find_server, unavailable_reason, write_tiny_models
from tests.api_support import ApiRun, profile
from tests.e2e_support import Host, alive, host, wait_until  # noqa: F401

START_S = 60.0  # a llama-server with a tiny model is healthy in well under a second; this is slack for a busy CI
ARGS = "-m {model} --host 127.0.0.1 --port {port} -c 512 -np 1 -t 1 --threads-http 2 --no-webui --no-warmup"

LLAMA = """\
  {name}:
    max_mb: 1024
    priority: 1
    always_on: {always_on}
    model: "{model}"
    start_timeout_s: {start_timeout_s}
    probe_interval_s: 0.5
    probe_timeout_s: 2
    managed:
      type: process
      adopt: {adopt}
      exec_path: "{binary}"
      args_template: "{args}"
      port: {port}
"""


def llama_block(binary: Path, model: Path, port: int, *, name: str = "llm", always_on: bool = False,
                adopt: bool = False, by_name: bool = False) -> str:
    """``by_name``: ``{model}`` is the file's name in its directory (``-m /models/{model}``), as a profile
    whose leases may name a model must have it — a lease's model is a name, never a path of its choosing."""
    args = ARGS.replace("{model}", f"{model.parent}/{{model}}") if by_name else ARGS
    return LLAMA.format(name=name, binary=binary, model=model.name if by_name else model, port=port,
                        always_on=str(always_on).lower(), adopt=str(adopt).lower(), args=args,
                        start_timeout_s=START_S)


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The cached llama-server binary; skips (with the command that builds it) when there is none."""
    found = find_server()
    if found is None:
        pytest.skip(unavailable_reason())
    return found.path


@pytest.fixture(scope="session")
def tiny_models(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("llama-models"))


def complete(url: str, prompt: str = "Hello there, how are") -> dict[str, Any]:
    """llama-server's own ``/completion``: 8 tokens, greedy, whatever the model would rather say."""
    response = httpx.post(f"{url}/completion", timeout=30,
                          json={"prompt": prompt, "n_predict": 8, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, f"{url}/completion: {response.status_code} {response.text[:500]}"
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("content"), str) and body["content"], f"no generated text: {body}"
    assert body["tokens_predicted"] == 8, body
    return body


def served_model(url: str) -> str:
    response = httpx.get(f"{url}/props", timeout=10)
    assert response.status_code == 200, response.text[:500]
    path: str = response.json()["model_path"]
    return path


def argv(pid: int) -> list[str]:
    return psutil.Process(pid).cmdline()


def instance(api: ApiRun, service: str = "llm") -> dict[str, Any]:
    found = [i for i in api.status()["instances"] if i["service"] == service]
    assert len(found) == 1, api.status()["instances"]
    return found[0]


def log_of(host: Host, service: str = "llm") -> str:
    path = host.state_dir / "logs" / f"{service}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def test_a_cold_lease_starts_llama_server_and_its_url_serves_completions(
        llama_server: Path, tiny_models: tuple[Path, Path], host: Host) -> None:
    model, _ = tiny_models
    port = host.port()
    host.write(profile(llama_block(llama_server, model, port), name="llama"))
    api = ApiRun(host)
    try:
        assert api.status()["instances"] == []  # nothing wanted yet: nothing runs
        response = api.lease("llm", holder="e2e", ttl_s=120, wait_s=START_S)
        assert response.status_code == 200, f"{response.text}\n{log_of(host)}"
        lease = response.json()
        assert lease["url"] == f"http://127.0.0.1:{port}" and lease["model"] == str(model)

        body = complete(lease["url"])
        assert body["model"] or body["generation_settings"]  # a real llama-server answered, with its settings
        openai = httpx.post(f"{lease['url']}/v1/completions", timeout=30,
                            json={"model": str(model), "prompt": "Once upon a time", "max_tokens": 4,
                                  "temperature": 0})
        assert openai.status_code == 200, openai.text[:500]
        assert openai.json()["choices"][0]["text"], openai.json()

        running = instance(api)
        assert running["origin"] == "started" and running["healthy"] and running["model"] == str(model)
        assert argv(running["pid"])[0] == str(llama_server)
        assert argv(running["pid"])[1:3] == ["-m", str(model)]
        assert served_model(lease["url"]) == str(model)
        assert host.listeners(port) == [running["pid"]]

        assert api.http.delete(f"/v1/leases/{lease['id']}").status_code == 200
        api.assert_clean()
        assert alive(running["pid"])  # released, not stopped: no idle_stop_after_s
    finally:
        api.close()


def test_a_lease_for_the_other_model_restarts_the_idle_server_with_it(
        llama_server: Path, tiny_models: tuple[Path, Path], host: Host) -> None:
    model_a, model_b = tiny_models
    port = host.port()
    host.write(profile(llama_block(llama_server, model_a, port, by_name=True), name="llama"))
    api = ApiRun(host)
    try:
        first = api.lease("llm", holder="a", ttl_s=120, wait_s=START_S)
        assert first.status_code == 200, f"{first.text}\n{log_of(host)}"
        api.run.wait_kind("lease.granted", holder="a")
        pid_a = instance(api)["pid"]
        said_a = complete(first.json()["url"])["content"]
        api.http.delete(f"/v1/leases/{first.json()['id']}")
        api.assert_clean()

        mark = api.run.mark
        refused = api.lease("llm", holder="b", model=str(model_b), ttl_s=120, wait_s=START_S)
        assert refused.status_code == 422 and "starts with '/'" in refused.text, refused.text  # a path is not a name
        second = api.lease("llm", holder="b", model=model_b.name, ttl_s=120, wait_s=START_S)
        assert second.status_code == 200, f"{second.text}\n{log_of(host)}"
        lease = second.json()
        assert lease["model"] == model_b.name and lease["url"] == f"http://127.0.0.1:{port}"
        switched = instance(api)
        assert switched["model"] == model_b.name and switched["pid"] != pid_a
        wait_until(lambda: not alive(pid_a), timeout_s=10, what="the server of the first model gone")
        assert argv(switched["pid"])[1:3] == ["-m", str(model_b)]
        assert served_model(lease["url"]) == str(model_b)
        said_b = complete(lease["url"])["content"]
        assert said_b != said_a, "the same greedy answer from other weights: is it still the first model?"
        api.run.wait_kind("lease.granted", holder="b")
        switch = api.run.since(mark)
        started = [e for e in switch if e.get("kind") == "action.started" and e.get("action_kind") != "lease"]
        assert [e["action"] for e in started] == ["restart:llm"], started  # one restart, not a stop and a start
        assert model_b.name in started[0]["message"] and model_a.name in started[0]["message"]
        assert [e["pid"] for e in switch if e.get("kind") == "instance.launched"] == [switched["pid"]]
        api.http.delete(f"/v1/leases/{lease['id']}")
        api.assert_clean()
    finally:
        api.close()


def test_kill_9_of_llama_server_is_noticed_and_it_is_restarted_after_its_backoff(
        llama_server: Path, tiny_models: tuple[Path, Path], host: Host) -> None:
    model, _ = tiny_models
    port = host.port()
    host.write(profile(llama_block(llama_server, model, port, always_on=True), name="llama"))
    api = ApiRun(host)
    try:
        api.wait_converged(timeout_s=START_S)
        before = instance(api)["pid"]
        complete(f"http://127.0.0.1:{port}")

        killed_at = time.monotonic()
        os.kill(before, signal.SIGKILL)
        api.run.wait_kind("instance.gone", service="llm", timeout_s=15)
        backoff = api.run.wait_kind("backoff", service="llm", timeout_s=15)
        assert backoff["failures"] == 1 and not backoff["stalled"]
        restarted = api.run.wait_kind("action.finished", action="start:llm",
                                      timeout_s=BACKOFF_POLICY.base_s + START_S)
        waited = time.monotonic() - killed_at
        assert restarted["status"] == "done", f"{restarted}\n{log_of(host)}"
        assert 0.9 * BACKOFF_POLICY.base_s <= waited <= BACKOFF_POLICY.base_s + 15, f"restarted after {waited:.1f} s"

        after = instance(api)
        assert after["pid"] != before and after["origin"] == "started" and after["healthy"]
        assert argv(after["pid"])[1:3] == ["-m", str(model)]
        assert host.listeners(port) == [after["pid"]]
        complete(f"http://127.0.0.1:{port}")
    finally:
        api.close()


def test_a_llama_server_started_before_the_reconciler_is_adopted_and_never_killed(
        llama_server: Path, tiny_models: tuple[Path, Path], host: Host) -> None:
    model, _ = tiny_models
    port = host.port()
    argv_foreign = [str(llama_server), *ARGS.format(model=model, port=port).split()]
    with open(host.root / "foreign-llama.log", "wb") as log:
        foreign = subprocess.Popen(argv_foreign, cwd="/", env=host.env(), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    host.foreign.append(foreign)  # the Host's teardown kills it
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert foreign.poll() is None, (host.root / "foreign-llama.log").read_text(errors="replace")[-2000:]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout_s=START_S, what="the foreign llama-server healthy")

    host.write(profile(llama_block(llama_server, model, port, adopt=True), name="llama"))
    api = ApiRun(host)
    try:
        adopted = api.run.wait_kind("instance.adopted", service="llm", timeout_s=15)
        assert adopted
        api.wait_converged(timeout_s=15)
        held = instance(api)
        assert held["origin"] == "adopted" and held["pid"] == foreign.pid

        response = api.lease("llm", holder="e2e", ttl_s=60, wait_s=15)
        assert response.status_code == 200, response.text
        assert response.json()["url"] == url
        complete(url)
        api.http.delete(f"/v1/leases/{response.json()['id']}")
        api.assert_clean()

        assert host.listeners(port) == [foreign.pid]  # nothing else was started on its port
        assert not [e for e in api.run.events if e.get("kind") == "instance.launched"]
        assert not list(host.our_processes())  # no llama-server of the reconciler's anywhere
    finally:
        api.close()
    api.run.signal(signal.SIGTERM)
    assert api.run.wait_exit() == 0
    assert foreign.poll() is None and alive(foreign.pid), "the reconciler killed a server it did not start"
    complete(url)  # and it still serves
