"""A real etcd (1 or 3 members) on loopback, for the cluster tests and benchmarks.

``.ci/run`` installs Debian's ``etcd-server`` when ``/usr/bin/etcd`` is missing;
:func:`find_etcd` says where it is (``$RECONCILER_TEST_ETCD`` first), and
``tests/cluster_support.py`` makes the cluster tests skip with a message that
says so when there is none. Members listen on free loopback ports in a
directory of the caller's; only the processes started here are ever
signalled (by their pid).
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from reconciler.testing.ports import free_port

START_TIMEOUT_S = 20.0


MISSING = ("etcd is not installed: `apt-get install etcd-server` (Debian; .ci/run does it) or set "
           "$RECONCILER_TEST_ETCD to an etcd 3.4+ binary")


class EtcdMissing(RuntimeError):
    """No etcd binary here (:data:`MISSING` says how to get one)."""


def find_etcd() -> str | None:
    """The etcd server binary, or None."""
    return os.environ.get("RECONCILER_TEST_ETCD") or shutil.which("etcd") or (
        "/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)


def etcd_binary() -> str:
    found = find_etcd()
    if found is None:
        raise EtcdMissing(MISSING)
    return found


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    scheme: str = "http"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    """``size`` etcd members on loopback; :meth:`start`, :meth:`kill` one, :meth:`stop` all."""

    root: Path
    size: int = 3
    tls: dict[str, str] | None = None  # {"cert", "key", "cacert"}: clients must present a certificate
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        scheme = "https" if self.tls else "http"
        for i in range(self.size):
            self.members.append(Member(f"m{i}", free_port(), free_port(), self.root / f"m{i}", scheme))

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def endpoints(self) -> str:
        return ",".join(self.urls)

    def start(self) -> EtcdCluster:
        binary = etcd_binary()
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            self._spawn(binary, member, initial, "new")
        self.wait_healthy()
        return self

    def _spawn(self, binary: str, member: Member, initial: str, state: str) -> None:
        member.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            binary, "--name", member.name, "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.url, "--advertise-client-urls", member.url,
            "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", state,
            "--initial-cluster-token", f"t-{self.root.name}",
            "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "error",
        ]
        if self.tls:
            argv += ["--cert-file", self.tls["server_cert"], "--key-file", self.tls["server_key"],
                     "--client-cert-auth", "--trusted-ca-file", self.tls["cacert"]]
        log = open(self.root / f"{member.name}.log", "ab")  # noqa: SIM115 - owned by the process
        member.process = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def wait_healthy(self, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for member in members or self.members:
            while True:
                if member.process is not None and member.process.poll() is not None:
                    raise RuntimeError(f"etcd {member.name} exited: {(self.root / f'{member.name}.log').read_text()}")
                if self._healthy(member):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {member.name} not healthy within {START_TIMEOUT_S} s")
                time.sleep(0.1)

    def _healthy(self, member: Member) -> bool:
        kwargs: dict[str, object] = {}
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls["cacert"])
            context.load_cert_chain(self.tls["cert"], self.tls["key"])
            kwargs = {"verify": context}
        try:
            answer = httpx.get(f"{member.url}/health", timeout=1.0, **kwargs)  # type: ignore[arg-type]
            return answer.status_code == 200 and answer.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def kill(self, index: int) -> None:
        """``kill -9`` one member (only ever one we started)."""
        process = self.members[index].process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def restart(self, index: int) -> None:
        member = self.members[index]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self._spawn(etcd_binary(), member, initial, "existing")

    def stop(self) -> None:
        for member in self.members:
            process = member.process
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(5)


def make_tls(root: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with ``openssl``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise EtcdMissing("openssl is not installed: cannot make certificates for the TLS test")
    root.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=root)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=test-ca")
    (root / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                  "extendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext")
    return {"cacert": str(root / "ca.crt"), "server_cert": str(root / "server.crt"),
            "server_key": str(root / "server.key"), "cert": str(root / "client.crt"), "key": str(root / "client.key")}
