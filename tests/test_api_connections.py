"""Connection exhaustion: clients that never finish a request cannot take the descriptors the loop needs.

A real ``watch --api`` runs with ``RLIMIT_NOFILE`` 256 (soft = hard: nothing to
raise), the limit under which 300 half-sent requests used to make every pass
fail with "Too many open files" and the API stop answering. Here a flood
keeps 300 connections open that each sent a request line and some headers
but never the blank line that ends the head (a closed one is replaced, up to
100 a second, so the flood lasts while we look). Meanwhile:

- a normal request, on a fresh connection, is answered promptly (the
  longest-waiting half-sent connection makes room for it);
- a lease request for a stopped service still leads to its start: the
  control loop converges while the flood lasts;
- the server never holds more descriptors than its limit allows.

Once the flood stops replacing them, every half-sent connection is closed by
the server within the head timeout (408 for those that timed out, 503 for
those that made room); a connection that sent nothing at all, and one whose
body stalls, are closed too. Loops are bounded in count and time; loopback only.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import threading
import time
from collections import Counter

import httpx
import psutil
import pytest

from tests.api_support import ApiRun, profile, service
from tests.e2e_support import Host

NOFILE = 256
FLOOD = 300
HEAD_TIMEOUT_S = 5.0  # reconciler.api.connections.HEAD_TIMEOUT_S, BODY_TIMEOUT_S: the test says what it expects
BODY_TIMEOUT_S = 5.0
SLACK_S = 3.0  # a busy CI machine
MAX_OPENED = 4000  # the flood's budget of connections in all
REPLACE_PER_S = 100  # the flood replaces at most this many closed connections a second
HALF_SENT = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\nAccept: */*\r\n"


def first_line(data: bytes) -> str:
    """``"408"``, ``"503"``…; ``"closed"`` for a close with nothing said, ``"reset"`` for a reset."""
    if not data:
        return "closed"
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    return line.split(" ")[1] if line.startswith("HTTP/1.1 ") else line[:40]


class Flood:
    """``size`` half-sent connections held open on a thread; each one the server closes is replaced, until
    :meth:`stop_replacing`. Records how each ended (the status line the server sent, or closed/reset)."""

    def __init__(self, port: int, size: int):
        self.address = ("127.0.0.1", port)
        self.size = size
        self.selector = selectors.DefaultSelector()
        self.opened = 0
        self.initial = 0  # opened by start(), before any replacement
        self.failed_connects = 0
        self.ended: Counter[str] = Counter()
        self.open_since: dict[socket.socket, float] = {}
        self.lifetimes: list[float] = []  # of the connections closed after stop_replacing
        self.replacing = True
        self.owed = 0  # closed connections not yet replaced
        self.started = 0.0
        self.stopped_at = 0.0
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def allowed(self) -> int:
        """How many connections the flood may have opened by now: its size, then REPLACE_PER_S more a second."""
        return self.size + int((time.monotonic() - self.started) * REPLACE_PER_S)

    def start(self) -> None:
        self.started = time.monotonic()
        for _ in range(self.size):
            self._open()
        self.initial = self.opened  # before the thread starts replacing what the server closed meanwhile
        self.thread.start()

    def _open(self) -> None:
        if self.opened >= MAX_OPENED:
            return
        self.opened += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2.0)
        try:
            sock.connect(self.address)
            sock.sendall(HALF_SENT)
        except OSError:
            self.failed_connects += 1
            sock.close()
            return
        sock.setblocking(False)
        with self.lock:
            self.open_since[sock] = time.monotonic()
        self.selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        deadline = time.monotonic() + 90  # bounded whatever happens
        while not self.done.is_set() and time.monotonic() < deadline:
            while self.replacing and self.owed and self.opened < self.allowed():
                self.owed -= 1
                self._open()
            for key, _ in self.selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                    how = first_line(data)
                except ConnectionResetError:
                    how = "reset"
                except BlockingIOError:
                    continue
                self.selector.unregister(sock)
                sock.close()
                with self.lock:
                    since = self.open_since.pop(sock)
                    self.ended[how] += 1
                    if not self.replacing:
                        self.lifetimes.append(time.monotonic() - max(since, self.stopped_at))
                if self.replacing:
                    self.owed += 1  # replaced above, as the rate allows
            if not self.replacing and not self.open_since:
                return

    def stop_replacing(self) -> None:
        with self.lock:
            self.replacing = False
            self.stopped_at = time.monotonic()

    def still_open(self) -> int:
        with self.lock:
            return len(self.open_since)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)
        with self.lock:
            for sock in list(self.open_since):
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(sock)
                sock.close()
            self.open_since.clear()
        self.selector.close()


@pytest.fixture
def server(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 200:  # this test's own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    with Host(tmp_path) as host:
        host.write(profile(service("llm", host.port(), mb=1024, priority=1), name="flood"))
        api = ApiRun(host, nofile=NOFILE)
        try:
            yield api
        finally:
            api.close()


def answered_fresh(url: str) -> float:
    """Seconds a ``GET /v1/status`` on a new connection took to be answered 200."""
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=10) as client:
        response = client.get("/v1/status")
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def test_half_sent_requests_cannot_starve_the_api_or_the_loop(server: ApiRun) -> None:
    process = psutil.Process(server.run.pid)
    assert process.rlimit(psutil.RLIMIT_NOFILE) == (NOFILE, NOFILE)
    cap = server.started.get("max_connections")
    print(f"\nNOFILE {NOFILE}: the API takes at most {cap} connections")
    port = int(server.url.rsplit(":", 1)[1])
    flood = Flood(port, FLOOD)
    peak_fds = 0
    try:
        flood.start()
        assert flood.initial == FLOOD and flood.failed_connects == 0

        latencies = []
        for _ in range(5):
            latencies.append(answered_fresh(server.url))
            peak_fds = max(peak_fds, process.num_fds())
            time.sleep(0.2)
        print(f"status on a fresh connection during the flood: {max(latencies) * 1000:.0f} ms at most")
        assert max(latencies) < 2.0, latencies

        # the loop still works: a lease request for a stopped service starts it
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=40) as client:
            lease = client.post("/v1/leases", json={"service": "llm", "holder": "during-flood", "wait_s": 30})
        assert lease.status_code == 200, lease.text
        print(f"lease (a start) during the flood: {time.monotonic() - started:.1f} s")
        assert httpx.get(lease.json()["url"] + "/health", timeout=5).status_code == 200
        peak_fds = max(peak_fds, process.num_fds())
        assert flood.still_open() > 0  # the flood lasted through all of it
        assert sum(flood.ended.values()) > 0, "the server made no room: the cap was never reached"

        # -- the flood stops replacing what is closed: the server closes the rest within the head timeout
        flood.stop_replacing()
        deadline = time.monotonic() + HEAD_TIMEOUT_S + SLACK_S
        while flood.still_open() and time.monotonic() < deadline:
            peak_fds = max(peak_fds, process.num_fds())
            time.sleep(0.1)
        assert flood.still_open() == 0, f"{flood.still_open()} half-sent connections still open"
        print(f"flood: {flood.opened} connections; ended {dict(flood.ended)}; "
              f"the last ones within {max(flood.lifetimes):.1f} s; server fds at most {peak_fds}")
        assert max(flood.lifetimes) <= HEAD_TIMEOUT_S + SLACK_S
        assert flood.ended["408"] > 0 and flood.ended["503"] + flood.ended["reset"] > 0, flood.ended
        assert set(flood.ended) <= {"408", "503", "reset", "closed"}, flood.ended
    finally:
        flood.close()
    assert peak_fds < NOFILE
    stderr = server.run.stderr()
    assert "Too many open files" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not server.run.seen("pass.failed")
    assert answered_fresh(server.url) < 2.0


def read_until_closed(sock: socket.socket, within_s: float) -> tuple[bytes, float]:
    """What the server sent before closing ``sock``, and after how long; fails after ``within_s``."""
    started = time.monotonic()
    sock.settimeout(0.2)
    data = b""
    while time.monotonic() - started < within_s:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    else:
        raise AssertionError(f"still open after {within_s} s; got {data!r}")
    return data, time.monotonic() - started


def test_silent_and_stalled_connections_are_closed_with_408(server: ApiRun) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=2) as silent, \
            socket.create_connection(("127.0.0.1", port), timeout=2) as stalled, \
            socket.create_connection(("127.0.0.1", port), timeout=2) as slow_but_steady:
        stalled.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"serv")
        body = b'{"service": "nope", "holder": "' + b"x" * 60 + b'"}'
        slow_but_steady.sendall(b"POST /v1/leases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        steady: dict[str, bytes] = {}

        def trickle() -> None:  # a byte every 0.1 s (8 s in all): slow, never stalled — answered, not cut off
            try:
                for i in range(len(body)):
                    slow_but_steady.sendall(body[i:i + 1])
                    time.sleep(0.1)
                steady["answer"] = slow_but_steady.recv(4096)
            except OSError as exc:  # the server cut it off (or the test ended early)
                steady["answer"] = repr(exc).encode()

        writer = threading.Thread(target=trickle, daemon=True)
        writer.start()
        said, after = read_until_closed(silent, HEAD_TIMEOUT_S + SLACK_S)
        assert first_line(said) == "408" and b"head" in said, said
        assert after >= HEAD_TIMEOUT_S - 0.5, after
        said, after = read_until_closed(stalled, BODY_TIMEOUT_S + SLACK_S)
        assert first_line(said) == "408" and b"body" in said, said
        writer.join(15)
        assert first_line(steady.get("answer", b"")) == "404", steady  # answered: unknown service
    stderr = server.run.stderr()
    assert "Traceback" not in stderr, stderr[-3000:]


@pytest.mark.parametrize("complete", [True, False], ids=["whole head", "head never ended"])
def test_a_request_head_over_its_bound_is_a_400(server: ApiRun, complete: bool) -> None:
    """llhttp bounds no head: the protocol does (16 KiB, as h11 did), whether it came at once or is still coming."""
    port = int(server.url.rsplit(":", 1)[1])
    head = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (20 * 1024) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + (b"\r\n" if complete else b""))
        data, _ = read_until_closed(sock, 5)
    assert first_line(data) == "400" and b"larger than 16384 bytes" in data
    assert httpx.get(f"{server.url}/v1/status", timeout=5).status_code == 200  # the server answers on
