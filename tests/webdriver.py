"""A small W3C WebDriver client for chromedriver, over httpx (no Selenium).

    with Chrome.start() as browser:           # chromedriver on a free port + a headless session
        browser.get("http://127.0.0.1:7700/")
        browser.text("#title")                 # text of the first element matching a CSS selector
        browser.script("return document.title")
        browser.screenshot(path)

:func:`missing` says why a browser test cannot run here (None when it can):
Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them).
Everything started here is stopped by ``close()``: the session, chromedriver
(by its own pid) and the temporary profile directory.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from reconciler.testing.ports import free_port

CHROMIUM = os.environ.get("RECONCILER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RECONCILER_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--window-size=1280,800",
]


def missing() -> str | None:
    """Why a real-browser test cannot run here, or None when it can."""
    absent = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if absent:
        return (f"{' and '.join(absent)} not found: install Debian's chromium and chromium-driver "
                f"(apt-get install chromium chromium-driver; .ci/run does) to run the browser tests")
    return None


class WebDriverError(RuntimeError):
    """A WebDriver command failed; ``error`` is the W3C error code (e.g. ``no such element``)."""

    def __init__(self, error: str, message: str):
        super().__init__(f"{error}: {message}")
        self.error = error


class Chrome:
    """One chromedriver process and one headless Chromium session."""

    def __init__(self, driver: subprocess.Popen, port: int, profile_dir: str, log: Path):
        self.driver = driver
        self.base = f"http://127.0.0.1:{port}"
        self.profile_dir = profile_dir
        self.log = log
        self.http = httpx.Client(timeout=60)
        self.session: str | None = None

    @classmethod
    def start(cls, *, startup_timeout_s: float = 20.0) -> Chrome:
        port = free_port()
        profile_dir = tempfile.mkdtemp(prefix="reconciler-chromium-")
        log = Path(profile_dir).with_name(Path(profile_dir).name + ".chromedriver.log")
        with open(log, "wb") as out:
            driver = subprocess.Popen(
                [CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        browser = cls(driver, port, profile_dir, log)
        try:
            browser._wait_ready(startup_timeout_s)
            browser._new_session()
        except BaseException:
            browser.close()
            raise
        return browser

    # -- plumbing ---------------------------------------------------------------------------

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.driver.poll() is not None:
                raise RuntimeError(f"chromedriver exited with {self.driver.returncode}: {self.log.read_text()}")
            try:
                if self.http.get(self.base + "/status", timeout=1).json()["value"]["ready"]:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromedriver not ready after {timeout_s} s: {self.log.read_text()}")
            time.sleep(0.05)

    def _new_session(self) -> None:
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [*ARGS, f"--user-data-dir={self.profile_dir}"]},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        value = self._call("POST", "/session", caps, session=False)
        self.session = value["sessionId"]

    def _call(self, method: str, path: str, body: Any = None, *, session: bool = True) -> Any:
        url = self.base + (f"/session/{self.session}" if session else "") + path
        response = self.http.request(method, url, json=body if method == "POST" else None)
        try:
            payload = response.json()
        except ValueError:
            raise WebDriverError("unknown error", f"{response.status_code} {response.text[:500]}") from None
        value = payload.get("value")
        failed = isinstance(value, dict) and "error" in value and response.status_code != 200
        if response.status_code >= 400 or failed:
            raise WebDriverError(value.get("error", "unknown error"), value.get("message", "")[:2000])
        return value

    # -- commands ---------------------------------------------------------------------------

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        """The element id of the first element matching ``css`` (raises ``no such element``)."""
        return self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self._call("POST", "/elements", {"using": "css selector", "value": css})]

    def text(self, css: str) -> str:
        """The rendered text (``innerText``, trimmed) of the first element matching ``css``.

        One script, not find-then-read: a page that re-renders in between cannot make it stale."""
        found = self.script("const e = document.querySelector(arguments[0]); return e ? e.innerText.trim() : null", css)
        if found is None:
            raise WebDriverError("no such element", f"nothing matches {css!r}")
        return found

    def script(self, source: str, *args: Any) -> Any:
        """Run ``source`` as a function body in the page (``arguments`` holds ``args``); its return value."""
        return self._call("POST", "/execute/sync", {"script": source, "args": list(args)})

    def alert_text(self) -> str | None:
        """The text of an open alert/confirm/prompt dialog, or None when there is none."""
        try:
            return self._call("GET", "/alert/text")
        except WebDriverError as exc:
            if exc.error == "no such alert":
                return None
            raise

    def console(self) -> list[dict[str, Any]]:
        """Browser console entries since the last call (chromedriver's log extension)."""
        return self._call("POST", "/se/log", {"type": "browser"})

    def viewport(self, width: int, height: int) -> None:
        """Make the page's viewport exactly ``width`` × ``height`` CSS pixels (Chrome DevTools emulation)."""
        self._call("POST", "/goog/cdp/execute", {"cmd": "Emulation.setDeviceMetricsOverride", "params": {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path

    def close(self) -> None:
        try:
            if self.session is not None and self.driver.poll() is None:
                self._call("DELETE", "")
        except (httpx.HTTPError, WebDriverError):
            pass
        self.session = None
        self.http.close()
        if self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(5)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait(5)
        shutil.rmtree(self.profile_dir, ignore_errors=True)
        self.log.unlink(missing_ok=True)

    def __enter__(self) -> Chrome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
