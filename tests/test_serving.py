"""reconciler/serving.py: uvicorn's server without its tick, the Date header renewed when a response reads it."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate, parsedate_to_datetime

import httpx
import uvicorn

from reconciler import serving
from reconciler.serving import DatedState, QuietServer
from reconciler.testing.ports import free_port


async def app(scope, receive, send) -> None:  # the smallest ASGI app
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_the_date_is_that_of_the_second_it_is_read(monkeypatch):
    clock = [1_800_000_000.25]
    monkeypatch.setattr(serving.time, "time", lambda: clock[0])
    state = DatedState()
    state.default_headers = [(b"date", b"stale"), (b"server", b"x")]  # what uvicorn's first tick assigns
    first = state.default_headers
    assert first == [(b"date", formatdate(clock[0], usegmt=True).encode()), (b"server", b"x")]
    clock[0] += 0.5
    assert state.default_headers is first  # the same second: formatted once
    clock[0] += 1
    assert state.default_headers[0] == (b"date", formatdate(clock[0], usegmt=True).encode())
    state.default_headers = [(b"server", b"x")]  # date_header=False: no date at all
    assert state.default_headers == [(b"server", b"x")]


def test_an_idle_server_does_not_wake_and_stops_at_once():
    port = free_port()

    async def run() -> tuple[list[str], int, float]:
        server = QuietServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        serving_task = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.1)
        timers = sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]  # asyncio's timers
        async with httpx.AsyncClient() as client:
            dates = [(await client.get(f"http://127.0.0.1:{port}/")).headers["date"]]
            await asyncio.sleep(1.2)
            dates.append((await client.get(f"http://127.0.0.1:{port}/")).headers["date"])
        began = time.monotonic()
        server.should_exit = True
        await asyncio.wait_for(serving_task, 5)
        return dates, timers, time.monotonic() - began

    dates, timers, stopping_s = asyncio.run(run())
    assert all(abs(parsedate_to_datetime(d).timestamp() - time.time()) < 5 for d in dates)
    assert dates[0] != dates[1]  # renewed without a tick
    assert timers == 0  # nothing scheduled while no connection is open: the server waits for its exit alone
    assert stopping_s < 2
