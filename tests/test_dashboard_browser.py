"""The dashboard in a real headless browser (Debian's chromium + chromedriver, see tests/webdriver.py).

A real ``reconciler serve`` runs a copy of the demo profile (fake services on a
simulated 8 GB GPU, ports moved to free ones) with a fake Ollama that was
already listening, so it is adopted. The page must show the services and the
adopted Ollama with its state and URL, reflect a lease taken through the API
within a second (live, from the event stream: no reload), and put data into
the page as text: a holder named like an HTML tag stays text and creates no
element. Skipped, saying why, where chromium or chromedriver is absent
(``.ci/run`` installs them).

With ``--token-file`` every read needs the token but the page itself: the
page asks for it (a wrong one is refused), or takes it from ``#token=…`` in
its URL (and drops it from the address bar), keeps it in the tab's
sessionStorage, and stays live — the event stream is read with ``fetch()``,
which can send the token, where EventSource cannot.

The screenshot of the page is saved as ``dashboard.png`` in the test's tmp
directory (or where ``RECONCILER_DASHBOARD_SCREENSHOT`` says) and its path printed.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.testing.ports import free_port, is_listening
from tests import webdriver
from tests.api_support import profile, service
from tests.e2e_support import Host, WatchRun, host, wait_until  # noqa: F401

DEMO = Path(__file__).resolve().parent.parent / "demo" / "profile.yaml"
XSS = "<img src=x onerror=alert(1)>"
START_S = 30.0  # the demo's services starting (llm takes a second) on a busy CI machine

pytestmark = pytest.mark.skipif(webdriver.missing() is not None, reason=webdriver.missing() or "")


def poll(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.01) -> Any:
    """The first truthy value of ``condition()``; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (webdriver.WebDriverError, httpx.HTTPError, KeyError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            suffix = f" (last error: {last_error})" if last_error else ""
            raise AssertionError(f"{what} not within {timeout_s} s{suffix}")
        time.sleep(interval_s)


class Server:
    """``reconciler serve`` on the test host's profile, on a free loopback port."""

    def __init__(self, world: Host, token: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable, "-m", "reconciler", "serve",
            "--profile", str(world.profile), "--gpu", "sim:8192", "--state-dir", str(world.state_dir),
            "--listen", f"127.0.0.1:{self.port}",
        ]
        if token is not None:
            token_file = world.root / "token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            argv += ["--token-file", str(token_file)]
        # WatchRun reads its stdout on a thread (and keeps it from filling a pipe); Host kills it at the end
        self.run = WatchRun(argv, world.env(), world.root / "serve.stderr")
        world.runs.append(self.run)
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self.http = httpx.Client(base_url=self.base, timeout=30, headers=headers)

    def status(self) -> dict[str, Any]:
        response = self.http.get("/v1/status")
        response.raise_for_status()
        return response.json()

    def wait_up(self, timeout_s: float = START_S) -> None:
        def up() -> bool:
            if self.run.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.run.process.returncode}:\n{self.run.stderr()[-3000:]}")
            return is_listening(self.port)
        poll(up, timeout_s, "serve listening", 0.05)

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    with webdriver.Chrome.start() as chrome:
        chrome.viewport(1280, 800)
        yield chrome


def demo_profile(world: Host) -> dict[str, int]:
    """The demo profile with every port moved to a free one; returns the ports by service."""
    ports: dict[str, int] = {}
    text = DEMO.read_text()
    for name in re.findall(r"^  (\w+):\n", text, flags=re.M):
        ports[name] = world.port()
    def move(match: re.Match[str]) -> str:
        service = re.findall(r"^  (\w+):\n", text[: match.start()], flags=re.M)[-1]
        return f"port: {ports[service]}"
    world.write(re.sub(r"port: 18\d\d\d", move, text))
    return ports


def row_text(browser: webdriver.Chrome, table: str, key: str, value: str) -> dict[str, str] | None:
    """The cells of the row of ``#table`` whose ``data-key`` is ``value``, by cell class (None if absent)."""
    return browser.script(
        """
        const [table, key, value] = arguments;
        for (const row of document.querySelectorAll(`#${table} tbody tr`)) {
          if (row.dataset[key] !== value) continue;
          const cells = {};
          for (const td of row.cells) {
            const name = [...td.classList].find((c) => c !== "num" && c !== "muted" && c !== "mono");
            cells[name || td.cellIndex] = td.textContent.trim();
          }
          return cells;
        }
        return null;
        """,
        table, key, value,
    )


def seconds(text: str) -> float:
    """``4m 58s`` → 298."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return float(sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([dhms])", text)))


def test_dashboard_shows_the_demo_and_follows_a_lease_live(
    host: Host, browser: webdriver.Chrome, tmp_path: Path,
) -> None:
    ports = demo_profile(host)
    ollama = host.start_foreign(
        "reconciler.testing.fake_ollama", "--port", str(ports["ollama"]), "--models", "llama3.2:3b",
        "--vram-mb", "2048", sim_mb=2048,
    )
    wait_until(lambda: is_listening(ports["ollama"]), what="the fake Ollama listening")
    server = Server(host)
    try:
        server.wait_up()
        always_on = {"ollama", "llm", "embed", "comfyui"}

        def converged() -> bool:
            status = server.status()
            running = {i["service"] for i in status["instances"] if i["state"] == "running" and i["healthy"]}
            gpus = status["gpus"]  # from the last pass's observation, which may predate the starts
            return (running == always_on and gpus and gpus[0]["reserved_started_mb"] == 3072 + 1024 + 2048
                    and gpus[0]["adopted_mb"] == 2048)  # the adopted Ollama's memory observed, too
        poll(converged, START_S, "the demo's always-on services running", 0.1)
        status = server.status()
        by_service = {i["service"]: i for i in status["instances"]}
        assert by_service["ollama"]["origin"] == "adopted" and by_service["ollama"]["pid"] == ollama.pid

        # -- the page loads and shows the demo ------------------------------------------------
        started = time.monotonic()
        browser.get(server.base + "/")
        assert browser.script("return document.title") == "reconciler"
        poll(lambda: browser.script("return document.body.dataset.renders"), 10, "the first render")
        print(f"\nfirst render {1000 * (time.monotonic() - started):.0f} ms after navigation")
        assert browser.text("#profile") == "demo"
        assert browser.text("#node") == status["node"]

        ollama_row = poll(lambda: row_text(browser, "instances", "service", "ollama"), 5, "the ollama row")
        assert ollama_row["state"] == "running"
        assert ollama_row["origin"] == "adopted"
        assert ollama_row["url"] == by_service["ollama"]["url"] == f"http://127.0.0.1:{ports['ollama']}"
        link = browser.script("return document.querySelector('#instances tr[data-service=\"ollama\"] td.url a').href")
        assert link.rstrip("/") == by_service["ollama"]["url"]
        for name in ("llm", "embed", "comfyui"):
            row = row_text(browser, "instances", "service", name)
            assert row and row["state"] == "running" and row["origin"] == "started", (name, row)
            assert row["url"] == f"http://127.0.0.1:{ports[name]}"
        assert row_text(browser, "instances", "service", "llm")["model"] == "qwen2.5-3b"
        tts = row_text(browser, "instances", "service", "tts")  # in the profile, not running (not always_on)
        assert tts and tts["state"] == "not running"

        # the GPU bar: a segment per started and adopted service, with MB labels matching the status
        gpu = status["gpus"][0]
        segments = poll(lambda: browser.script(
            "return Object.fromEntries([...document.querySelectorAll('#gpus .gpu[data-gpu=\"0\"] .bar .seg')]"
            ".map(s => [s.dataset.service || s.dataset.part,"
            " [Number(s.dataset.mb), s.getBoundingClientRect().width, s.textContent, s.dataset.part]]))"
        ), 5, "the GPU bar")
        started = {k: v for k, v in segments.items() if v[3] == "started"}
        assert sum(v[0] for v in started.values()) == gpu["reserved_started_mb"] == 3072 + 1024 + 2048
        assert {k: v[0] for k, v in started.items()} == {"llm": 3072, "embed": 1024, "comfyui": 2048}
        assert segments["ollama"][0] == gpu["adopted_mb"] == 2048 and segments["ollama"][3] == "adopted"
        assert segments["llm"][2] == "llm 3,072 MB" and segments["ollama"][2] == "ollama 2,048 MB"
        assert segments["llm"][1] > segments["ollama"][1] > segments["embed"][1] > 0  # widths in proportion
        numbers = browser.text("#gpus .gpu[data-gpu='0'] .gpu-numbers")
        assert "adopted 2,048 MB · ollama" in numbers and "free " in numbers

        # the live stream is open before we act (the page says so)
        poll(lambda: browser.text("#conn") == "live", 5, "the event stream connected")
        assert browser.text("#leases-empty") == "No leases."

        # -- a lease taken through the API shows up within a second, without a reload ----------
        renders = int(browser.script("return document.body.dataset.renders"))
        browser.script("window.__sameDocument = true")
        sent = time.monotonic()
        response = server.http.post("/v1/leases", json={"service": "embed", "holder": "kiwi", "ttl_s": 120})
        answered, answered_wall = time.monotonic(), time.time()
        assert response.status_code == 200, response.text
        lease = response.json()
        row = poll(lambda: row_text(browser, "leases", "lease", lease["id"]), 1.0, "the lease on the page")
        shown = time.monotonic()
        print(f"lease → page: {1000 * (shown - answered):.0f} ms after the API answered "
              f"({1000 * (shown - sent):.0f} ms after the request was sent; "
              f"the grant took {1000 * (answered - sent):.0f} ms)")
        trace = browser.script(
            "const s = window.reconcilerDashboard; return [s.eventAt['lease.granted'], s.renderedAt]"
        )
        print(f"  in the page: lease.granted arrived {trace[0] - 1000 * answered_wall:+.0f} ms, "
              f"rendered {trace[1] - 1000 * answered_wall:+.0f} ms after the API answered")
        assert shown - answered < 1.0
        assert browser.script("return window.__sameDocument") is True  # updated in place, not reloaded
        assert int(browser.script("return document.body.dataset.renders")) > renders
        assert row["service"] == "embed" and row["holder"] == "kiwi" and row["gpu"] == "0"
        assert 100 <= seconds(row["remaining"]) <= 120
        poll(lambda: row_text(browser, "instances", "service", "embed")["leases"] == "1/1", 1.0, "embed's lease count")
        poll(lambda: browser.script(
            "return [...document.querySelectorAll('#events li')].some(li => li.dataset.kind === 'lease.granted')"),
            1.0, "lease.granted in the event log")

        # the TTL counts down in the page between status fetches
        first = seconds(row_text(browser, "leases", "lease", lease["id"])["remaining"])
        time.sleep(1.3)
        later = seconds(row_text(browser, "leases", "lease", lease["id"])["remaining"])
        assert later < first, (first, later)

        # -- data is text, never HTML ------------------------------------------------------------
        response = server.http.post("/v1/leases", json={"service": "llm", "holder": XSS, "ttl_s": 60})
        assert response.status_code == 200, response.text
        evil = response.json()
        row = poll(lambda: row_text(browser, "leases", "lease", evil["id"]), 1.0, "the second lease on the page")
        assert row["holder"] == XSS  # shown literally
        assert browser.alert_text() is None
        assert browser.script("return document.querySelectorAll('img').length") == 0
        assert browser.script(
            "return document.querySelector(`#leases tr[data-lease=\"${arguments[0]}\"] td.holder`).childElementCount",
            evil["id"]) == 0

        shot = Path(os.environ.get("RECONCILER_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
        browser.screenshot(shot)
        print(f"screenshot: {shot}")

        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert errors == [], errors

        # releasing it takes it off the page again
        assert server.http.delete(f"/v1/leases/{lease['id']}").status_code == 200
        poll(lambda: row_text(browser, "leases", "lease", lease["id"]) is None, 1.0, "the released lease gone")

        # -- a demand that cannot be met waits on the page with the plan's reason ----------------
        answer: dict[str, httpx.Response] = {}
        waiting = threading.Thread(target=lambda: answer.setdefault("tts", server.http.post(
            "/v1/leases", json={"service": "tts", "holder": "batch", "ttl_s": 60, "wait_s": 2})))
        waiting.start()
        try:
            def reason() -> str | None:  # first "waiting for the next pass", then the plan's reason
                text = browser.script("const li = document.querySelector('#pending li[data-service=\"tts\"]');"
                                      "return li && li.querySelector('.reason').textContent")
                return text if text and "needs 2048 MB on GPU 0" in text else None
            shown_reason = poll(reason, 2.0, "the tts demand pending on the page with the plan's reason")
            assert "tts for batch" in browser.text("#pending")
            assert "1 pending" in browser.text("#plan-empty")
        finally:
            waiting.join(10)
        assert answer["tts"].status_code == 503 and answer["tts"].json()["detail"] == shown_reason
        poll(lambda: browser.text("#pending-empty") == "Nothing is waiting.", 1.0, "the withdrawn demand gone")
    finally:
        server.close()


TOKEN = "dashboard-token-for-tests"


def submit_token(browser: webdriver.Chrome, token: str) -> None:
    browser.script("const form = document.getElementById('auth'); form.elements.token.value = arguments[0];"
                   "form.requestSubmit();", token)


def test_dashboard_with_a_token_asks_for_it_and_stays_live(host: Host, browser: webdriver.Chrome) -> None:
    host.write(profile(service("llm", host.port(), mb=1024, priority=1, always_on=True),
                       service("embed", host.port(), mb=512, max_concurrent=2), name="secured"))
    server = Server(host, token=TOKEN)
    try:
        server.wait_up()
        poll(lambda: any(i["service"] == "llm" and i["state"] == "running" for i in server.status()["instances"]),
             START_S, "llm running", 0.1)
        assert httpx.get(server.base + "/v1/status").status_code == 401  # the data is private…
        assert httpx.get(server.base + "/").status_code == 200  # …the page is not

        # -- no token yet: the page asks for it, shows no data, refuses a wrong one ---------------
        browser.get(server.base + "/")
        poll(lambda: browser.script("return !document.getElementById('auth').hidden"), 5, "the token form")
        assert browser.text("#profile") == "—"
        assert browser.text("#conn") == "token needed"
        submit_token(browser, "not-the-token")
        poll(lambda: "not accepted" in browser.text("#auth-error"), 5, "the wrong token refused")
        assert browser.script("return document.getElementById('auth').hidden") is False
        assert browser.text("#profile") == "—"

        # -- the right one: data, and live updates over the fetch() stream -------------------------
        submit_token(browser, TOKEN)
        poll(lambda: browser.text("#profile") == "secured", 5, "the status rendered with the token")
        poll(lambda: browser.text("#conn") == "live", 5, "the event stream connected with the token")
        assert browser.script("return document.getElementById('auth').hidden") is True
        assert browser.script("return sessionStorage.getItem('reconciler.token')") == TOKEN
        lease = server.http.post("/v1/leases", json={"service": "llm", "holder": "secret-keeper", "ttl_s": 60})
        assert lease.status_code == 200, lease.text
        answered = time.monotonic()
        row = poll(lambda: row_text(browser, "leases", "lease", lease.json()["id"]), 1.0, "the lease, live")
        print(f"\nwith a token: lease → page {1000 * (time.monotonic() - answered):.0f} ms")
        assert row["holder"] == "secret-keeper"
        poll(lambda: browser.script(
            "return [...document.querySelectorAll('#events li')].some(li => li.dataset.kind === 'lease.granted')"),
            1.0, "lease.granted in the event log")

        # -- a link with #token=… works in a fresh tab, and the token leaves the address bar -------
        browser.script("sessionStorage.clear()")
        browser.get("about:blank")
        browser.get(server.base + "/#token=" + TOKEN)
        poll(lambda: browser.text("#profile") == "secured", 5, "the status rendered with the token from the URL")
        poll(lambda: browser.text("#conn") == "live", 5, "the event stream connected")
        assert browser.script("return location.hash") == ""
        assert TOKEN not in browser.script("return location.href")
        assert row_text(browser, "leases", "lease", lease.json()["id"]) is not None
        assert server.http.delete(f"/v1/leases/{lease.json()['id']}").status_code == 200
        poll(lambda: row_text(browser, "leases", "lease", lease.json()["id"]) is None, 1.0, "the release, live")

        errors = [e for e in browser.console() if e.get("level") == "SEVERE" and " 401 " not in e.get("message", "")]
        assert errors == [], errors
    finally:
        server.close()


def test_dashboard_shows_history_rejections_holds_backoff_and_logs(host: Host, browser: webdriver.Chrome) -> None:
    good = profile(service("db", host.port(), mb=512, priority=1, always_on=True),
                   service("sick", host.port(), mb=256, priority=2, always_on=True,
                           args="--refuse-health").replace("start_timeout_s: 10", "start_timeout_s: 1"),
                   name="ops")
    host.write(good)
    server = Server(host)
    try:
        server.wait_up()
        def ready() -> dict[str, Any] | None:
            now = server.status()
            up = any(i["service"] == "db" and i["state"] == "running" for i in now["instances"])
            return now if up and any(x["backoff"] for x in now["services"]) else None
        status = poll(ready, START_S, "db running, sick backing off", 0.1)
        db = next(i for i in status["instances"] if i["service"] == "db")

        # on load: the history from the store, not "No events yet"
        browser.viewport(600, 900)
        browser.get(server.base + "/")
        poll(lambda: browser.script("return document.body.dataset.renders"), 10, "the first render")
        kinds = poll(lambda: browser.script(
            "return [...document.querySelectorAll('#events li')].map(li => li.dataset.kind)"), 5, "the history")
        assert "instance.healthy" in kinds and "backoff" in kinds, kinds
        assert browser.script("return document.getElementById('events-empty').hidden") is True

        # a row: pid, priority, MB; the idle failing service says so
        row = poll(lambda: row_text(browser, "instances", "service", "db"), 5, "the db row")
        assert row["pid"] == str(db["pid"]) and row["priority"] == "1" and row["mb"] == "512"
        sick = row_text(browser, "instances", "service", "sick")
        assert "backing off" in sick["state"] and "1 failure, last: " in sick["error"], sick
        # the URL stays on one line at 600 px
        lines = browser.script("const td = document.querySelector('#instances tr[data-service=\"db\"] td.url');"
                               "return td.getBoundingClientRect().height / parseFloat(getComputedStyle(td).lineHeight)")
        assert lines < 2.5, lines
        seg = browser.script("const s = document.querySelector('#gpus .seg[data-service=\"db\"]');"
                             "return s && Number(s.dataset.mb)")
        assert seg == 512

        # its log, from the link
        browser.script("document.querySelector('#instances tr[data-service=\"db\"] a.log-link').click()")
        def log_text() -> str | None:
            shown = browser.text("#log-lines")
            return shown if "reconciler: starting db" in shown else None
        text = poll(log_text, 5, "db's log lines")
        assert text.startswith("--- ")

        # a rejected edit shows in the header until a good save
        host.profile.write_text(good.replace("priority: 1", "priority: [1"))
        cond = poll(lambda: browser.script(
            "const li = document.querySelector('#conditions li[data-type=\"profile\"]'); return li && li.textContent"),
            10, "the rejection in the header")
        assert cond.startswith("profile rejected") and "profile.yaml:" in cond, cond
        host.profile.write_text(good)
        poll(lambda: browser.script("return !document.querySelector('#conditions li[data-type=\"profile\"]')"), 10,
             "the rejection gone after a good save")

        # a held service says so
        assert server.http.post("/v1/services/db/stop").status_code == 200
        held = poll(lambda: (r := row_text(browser, "instances", "service", "db")) and "stopped by operator" in
                    r["state"] and r, 5, "db held on the page")
        assert "stopped by an operator" in held["error"]
        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert errors == [], errors
    finally:
        server.close()


def test_dashboard_shows_an_over_committed_gpu(host: Host, browser: webdriver.Chrome) -> None:
    """Issue 8.2: a GPU booked beyond its total is shown as such — a condition, and a line on the GPU —
    never as converged; both go once it fits again. Two always_on services fill the GPU; a foreign
    process then takes 1024 MB more, and nothing may be evicted."""
    host.write(profile(service("tts", host.port(), mb=4096, priority=3, always_on=True),
                       service("comfyui", host.port(), mb=4096, priority=5, always_on=True), name="full"))
    server = Server(host)
    try:
        server.wait_up()
        poll(lambda: sum(i["state"] == "running" for i in server.status()["instances"]) == 2, START_S,
             "both running", 0.1)
        browser.get(server.base + "/")
        poll(lambda: browser.text("#profile") == "full", 5, "the status rendered")
        assert browser.script("return document.querySelector('#gpus .gpu-over')") is None
        foreign = host.start_foreign("reconciler.testing.service", "--port", str(host.port()), sim_mb=1024)
        chip = "return document.querySelector('#conditions li[data-type=over_committed]')?.textContent || ''"
        text = poll(lambda: browser.script(chip), 15, "the over_committed condition on the page")
        assert text.startswith("over-committed · GPU 0 is over-committed: 9216 MB booked on 8192 MB"), text
        converged = "return document.querySelector('#conditions li[data-type=converged]')?.textContent || ''"
        assert browser.script(converged).startswith("not converged"), browser.script(converged)
        line = browser.script("return document.querySelector('#gpus [data-gpu=\"0\"] .gpu-over')?.textContent")
        assert line == "over-committed: 1,024 MB booked beyond its total", line
        foreign.kill()
        foreign.wait(10)
        poll(lambda: browser.script(chip) == "", 15, "the condition gone once the GPU fits")
        assert browser.script("return document.querySelector('#gpus .gpu-over')") is None
        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert errors == [], errors
    finally:
        server.close()
