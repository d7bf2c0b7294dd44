"""The kill -9 soak (invariants 4 and 5 under attack): ``./dev bench soak``.

A real ``reconciler serve`` runs a crowded profile on a simulated 8 GB GPU:
three managed services of 4 GB (priorities 1, 3, 5) and an unmanaged slot of
2 GB, so nearly every lease forces an eviction. Client threads ask for leases
on all four over HTTP, hold them for a random while and release them (or let
them expire). Meanwhile the reconciler is killed with SIGKILL at a random
moment — in the middle of starts, evictions and grants — and started again,
``SOAK_KILLS`` times (default 50). A sampler thread looks at the host every
100 ms, from outside the reconciler:

* **booked** — what the GPU really holds plus what is promised: the memory
  the simulated GPU attributes to live processes (each process the driver
  started declares its ``max_mb``), plus every unmanaged slot with an active
  lease in the store (its ``max_mb``, once), plus VRAM leases. It must never
  exceed the GPU's 8192 MB;
* **duplicates** — two live processes of one service at once.

After the last kill the reconciler is started once more and let converge,
then checked: **orphans** (live service processes the store does not know),
and **lost leases** — a lease a client was granted (200), that had not
expired, that the client had not released, and that no ``lease.released`` or
``lease.expired`` event explains, but that the server no longer knows.

The table reports each count; every one must be 0 (the row's ``ok``). So
that the kills do hit evictions, ``low`` ignores SIGTERM (evicting it takes
``eviction_timeout_s``, 1 s, then SIGKILL), and the table says what each kill
interrupted — the kinds of intents left open when it landed — and how many
starts, evictions and stops the soak began in all; the final status must
show no ``over_committed`` condition. The
soak is not in the default benchmark set (it takes a few minutes); the
services and the reconciler run in a simulation scope of their own and are
killed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from reconciler.testing.ports import free_port, kill_group

KILLS = int(os.environ.get("SOAK_KILLS", "50"))
GPU_MB = 8192
CLIENTS = 4
SCOPE_ENV = "RECONCILER_SIM_SCOPE"
SIM_MB_ENV = "RECONCILER_SIM_GPU_MB"

MANAGED = """\
  {name}:
    max_mb: 4096
    priority: {priority}
    shared: true
    max_concurrent: 2
    idle_stop_after_s: 1
    start_timeout_s: 10
    probe_interval_s: 0.3
    probe_timeout_s: 0.5
    managed:
      type: process
      exec_path: "${{RECONCILER_PYTHON}}"
      args_template: "-m reconciler.testing.service --port {{port}} --name {name} --startup-delay 0.2{extra}"
      port: {port}
"""
SLOT = """\
  batch:
    max_mb: 2048
    priority: 2
    shared: true
    max_concurrent: 4
"""
SLOT_MB = {"batch": 2048}


class Soak:
    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        self.profile = root / "profile.yaml"
        self.scope = f"soak-{uuid.uuid4().hex[:10]}"
        self.api_port = free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.ports = {name: free_port() for name in ("big", "mid", "low")}
        # low ignores SIGTERM: evicting it takes eviction_timeout_s, then SIGKILL — a wide window for a kill
        blocks = [MANAGED.format(name=n, priority=p, port=self.ports[n], extra=extra)
                  for n, p, extra in (("big", 1, ""), ("mid", 3, ""), ("low", 5, " --ignore-sigterm"))]
        self.profile.write_text("schema_version: 1\nname: soak\nvram_total_mb: 8192\neviction_timeout_s: 1\n"
                                "services:\n" + "".join(blocks) + SLOT)
        self.server: subprocess.Popen[bytes] | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.granted: dict[str, dict[str, Any]] = {}  # lease id → {expires, released}
        self.samples = 0
        self.over: list[int] = []
        self.duplicates: list[str] = []
        self.requests = {"granted": 0, "refused": 0, "unreachable": 0}
        self.interrupted: dict[str, int] = {}  # what each kill interrupted: intent kind → kills

    def env(self) -> dict[str, str]:
        return {**os.environ, SCOPE_ENV: self.scope, "RECONCILER_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}

    # --- the reconciler -------------------------------------------------------------------

    def start_server(self) -> None:
        argv = [sys.executable, "-m", "reconciler", "serve", "--profile", str(self.profile), "--gpu",
                f"sim:{GPU_MB}", "--state-dir", str(self.state), "--listen", f"127.0.0.1:{self.api_port}",
                "--events", "json"]
        with open(self.root / "serve.log", "ab") as log:
            self.server = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=log,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"serve did not answer within 30 s; see {self.root / 'serve.log'}")

    def kill_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.kill(self.server.pid, signal.SIGKILL)  # the reconciler alone: its services live on
            self.server.wait(10)

    def note_kill(self) -> None:
        """What the kill interrupted: the kinds of the intents left open (start, stop, evict, restart)."""
        kinds = {kind for kind, in self.query("SELECT kind FROM intents WHERE finished_at IS NULL")} or {"nothing"}
        for kind in kinds:
            self.interrupted[kind] = self.interrupted.get(kind, 0) + 1

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        path = self.state / "state.db"
        if not path.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
            return conn.execute(sql).fetchall()

    def actions(self) -> dict[str, int]:
        """Intents written over the whole soak, by kind: the starts, evictions, stops it carried out or began."""
        return {str(kind): int(n) for kind, n in self.query("SELECT kind, count(*) FROM intents GROUP BY kind")}

    def over_committed(self) -> list[str]:
        """The final status's over_committed conditions (issue 8.2: none once it converged)."""
        with httpx.Client(base_url=self.url, timeout=10) as http:
            status = http.get("/v1/status").json()
        return [c["message"] for c in status["conditions"] if c["type"] == "over_committed"]

    # --- traffic --------------------------------------------------------------------------

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self.stop.is_set():
                service = rng.choice(["big", "mid", "low", "batch"])
                ttl = rng.uniform(1.0, 4.0)
                try:
                    response = http.post("/v1/leases", json={"service": service, "holder": f"soak{seed}",
                                                             "ttl_s": ttl, "wait_s": 3})
                except httpx.HTTPError:
                    with self.lock:
                        self.requests["unreachable"] += 1
                    time.sleep(0.2)
                    continue
                if response.status_code != 200:
                    with self.lock:
                        self.requests["refused"] += 1
                    time.sleep(0.05)
                    continue
                lease = response.json()
                with self.lock:
                    self.requests["granted"] += 1
                    self.granted[lease["id"]] = {"expires": time.time() + ttl, "released": False}
                time.sleep(rng.uniform(0.0, ttl * 1.2))
                if rng.random() < 0.6:
                    with self.lock:
                        self.granted[lease["id"]]["released"] = True  # from now on its absence is ours
                    with contextlib.suppress(httpx.HTTPError):
                        http.delete(f"/v1/leases/{lease['id']}")

    # --- the sampler ----------------------------------------------------------------------

    def carriers(self) -> dict[int, tuple[str, int]]:
        """Live processes of this soak declaring simulated GPU memory: pid → (service, MB)."""
        out: dict[int, tuple[str, int]] = {}
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                env = proc.environ()
                if env.get(SCOPE_ENV) != self.scope or SIM_MB_ENV not in env:
                    continue
                if env.get(SIM_MB_ENV) == (psutil.Process(proc.ppid()).environ().get(SIM_MB_ENV)
                                           if proc.ppid() else None):
                    continue  # an inherited declaration (the sim backend counts it once)
                cmdline = proc.info["cmdline"] or []
                name = cmdline[cmdline.index("--name") + 1] if "--name" in cmdline else "?"
                out[proc.info["pid"]] = (name, int(env[SIM_MB_ENV]))
            except (psutil.Error, ValueError, IndexError):
                continue
        return out

    def slot_leases(self) -> int:
        path = self.state / "state.db"
        if not path.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
                rows = conn.execute("SELECT service, data FROM leases").fetchall()
        except sqlite3.Error:
            return -1
        now = time.time()
        booked, slots = 0, set()
        for service, data in rows:
            lease = json.loads(data)
            expires = lease.get("expires_at")
            if expires and _epoch(expires) <= now:
                continue
            if lease.get("kind") == "vram":
                booked += int(lease.get("mb") or 0)
            elif service in SLOT_MB and service not in slots:
                slots.add(service)
                booked += SLOT_MB[service]
        return booked

    def sampler(self) -> None:
        while not self.stop.is_set():
            carriers = self.carriers()
            slots = self.slot_leases()
            booked = sum(mb for _, mb in carriers.values()) + max(0, slots)
            names = [name for name, _ in carriers.values()]
            with self.lock:
                self.samples += 1
                if booked > GPU_MB:
                    self.over.append(booked)
                for name in set(names):
                    if names.count(name) > 1:
                        self.duplicates.append(name)
            time.sleep(0.1)

    # --- the verdicts ---------------------------------------------------------------------

    def lost_leases(self) -> list[str]:
        explained: set[str] = set()
        with sqlite3.connect(self.state / "state.db") as conn:
            for _kind, data in conn.execute("SELECT kind, data FROM events WHERE kind IN "
                                           "('lease.released', 'lease.expired')"):
                explained.add(json.loads(data).get("lease", ""))
        lost = []
        now = time.time()
        with httpx.Client(base_url=self.url, timeout=10) as http:
            for lease_id, info in list(self.granted.items()):
                if info["released"] or info["expires"] <= now + 0.5 or lease_id in explained:
                    continue
                if http.get(f"/v1/leases/{lease_id}").status_code == 404:
                    lost.append(lease_id)
        return lost

    def orphans(self) -> list[int]:
        with sqlite3.connect(self.state / "state.db") as conn:
            known = {json.loads(d).get("pid") for (d,) in conn.execute("SELECT data FROM instances")}
        return sorted(pid for pid in self.carriers() if pid not in known)

    def cleanup(self) -> None:
        self.kill_server()
        for pid in self.carriers():
            kill_group(pid)


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="reconciler-soak-") as tmp:
        soak = Soak(Path(tmp))
        threads: list[threading.Thread] = []
        began = time.monotonic()
        kills = 0
        try:
            soak.start_server()
            threads = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(CLIENTS)]
            threads.append(threading.Thread(target=soak.sampler, daemon=True))
            for thread in threads:
                thread.start()
            rng = random.Random(7)
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.3, 2.5))
                soak.kill_server()
                kills += 1
                soak.note_kill()
                soak.start_server()
            time.sleep(3)
            soak.stop.set()
            for thread in threads:
                thread.join(15)
            time.sleep(2)  # a pass or two: expiries, idle stops
            lost = soak.lost_leases()
            orphans = soak.orphans()
            over = soak.over_committed()
            actions = soak.actions()
        finally:
            soak.stop.set()
            soak.cleanup()
        took = time.monotonic() - began
    mid = ", ".join(f"{n} {kind}" for kind, n in sorted(soak.interrupted.items()))
    done = ", ".join(f"{n} {kind}" for kind, n in sorted(actions.items()))
    rows = [
        {"benchmark": f"soak: kill -9 of serve during evictions and lease traffic ({took:.0f} s)",
         "value": kills, "target": f"≥ {min(50, KILLS)} kills", "ok": kills >= min(50, KILLS)},
        {"benchmark": f"soak: kills that interrupted an eviction (open intents at the kills: {mid})",
         "value": soak.interrupted.get("evict", 0), "target": "> 0", "ok": soak.interrupted.get("evict", 0) > 0},
        {"benchmark": f"soak: intents begun ({done})", "value": actions.get("evict", 0), "target": "> 0 evictions",
         "ok": actions.get("evict", 0) > 0},
        {"benchmark": "soak: booked-total samples (every 100 ms) above 8192 MB", "value": len(soak.over),
         "target": f"0 of {soak.samples}", "ok": not soak.over},
        {"benchmark": "soak: two live processes of one service at once", "value": len(soak.duplicates),
         "target": "0", "ok": not soak.duplicates},
        {"benchmark": "soak: orphans (live service processes the store does not know)", "value": len(orphans),
         "target": "0", "ok": not orphans},
        {"benchmark": f"soak: lost leases (of {soak.requests['granted']} granted, {soak.requests['refused']} "
                      f"refused, {soak.requests['unreachable']} while down)", "value": len(lost), "target": "0",
         "ok": not lost},
        {"benchmark": "soak: over_committed conditions in the final status", "value": len(over), "target": "0",
         "ok": not over},
    ]
    return rows
