"""A fake OpenAI-compatible model server (a stand-in for llama-server or vLLM), for the gateway's tests.

    python -m reconciler.testing.fake_openai --port P [--model NAME] [--tokens N]
        [--delay S] [--chunk-delay S] [--startup-delay S] [--dimensions N] [--stats-file F]
        [--host 127.0.0.1]

It serves one model (``--model``, as ``llama-server -m {model}`` would) and
answers, deterministically:

* ``GET /health`` — 503 until ``--startup-delay`` has passed, then 200;
* ``GET /v1/models`` — its model;
* ``POST /v1/chat/completions`` and ``POST /v1/completions`` — the reply
  :func:`reply` (``max_tokens`` tokens, default ``--tokens``): ``"<model>:"``
  then ``" w1"``, ``" w2"``… — as one JSON answer after ``--delay`` seconds,
  or with ``"stream": true`` as server-sent events, one token per
  ``data:`` chunk every ``--chunk-delay`` seconds, then ``data: [DONE]``
  (the last chunk carries ``usage`` when ``stream_options.include_usage``);
* ``POST /v1/embeddings`` — one vector of ``--dimensions`` numbers per input,
  computed from the input's text (the same text, the same vector);
* ``GET /stats`` — what a test checks from outside: requests seen, how many
  run now (``in_flight``) and the most at once (``max_in_flight``), streams
  ``cancelled`` because the client went away mid-stream, stream chunks
  written so far (``chunks_sent``: ``drain`` waits while the reader's
  buffers are full, so a reader that stalls stalls it), and the body of the
  last request (``last``); with ``--stats-file`` the same is appended to
  that file as one JSON line when it exits (SIGTERM), so a test sees what
  every process of a service saw, also those stopped since.

A request body may slow itself down: ``fake_delay_s`` and
``fake_chunk_delay_s`` override ``--delay`` and ``--chunk-delay``. Errors
are OpenAI's shape, ``{"error": {"message", "type"}}``. HTTP/1.1 with
keep-alive and chunked streams, on asyncio alone (stdlib only, one thread:
it starts fast and a benchmark measures the gateway, not this server).
SIGTERM exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MAX_BODY = 64 * 1024 * 1024


def reply(model: str, tokens: int) -> list[str]:
    """The deterministic reply of ``model``: ``tokens`` pieces, ``"<model>:"``, ``" w1"``, ``" w2"``…"""
    return [f"{model}:", *(f" w{i}" for i in range(1, max(1, tokens)))]


def embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector made from ``text``'s SHA-256: the same text, the same vector."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [digest[i % len(digest)] / 255.0 - 0.5 for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


@dataclass
class Stats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: int = 0
    completed_streams: int = 0
    chunks_sent: int = 0  # stream chunks handed to the connection (a stalled client stalls this count)
    last: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, int] = field(default_factory=dict)


class FakeOpenAI:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.model: str = args.model
        self.started = time.monotonic()
        self.stats = Stats()

    # --- HTTP/1.1 on asyncio streams ---------------------------------------------------

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
                headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                length = int(headers.get("content-length") or 0)
                if length > MAX_BODY:
                    await self.send(writer, 413, {"error": {"message": "body too large", "type": "invalid_request"}})
                    return
                body = await reader.readexactly(length) if length else b""
                keep = await self.handle(method, target.split("?", 1)[0], body, reader, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def send(self, writer: asyncio.StreamWriter, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 413: "Payload Too Large",
                  503: "Service Unavailable"}.get(status, "Error")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()

    async def handle(self, method: str, path: str, body: bytes, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must close (a stream cut short)."""
        if method == "GET" and path == "/health":
            ready = time.monotonic() - self.started >= self.args.startup_delay
            await self.send(writer, 200 if ready else 503, {"status": "ok" if ready else "loading model"})
            return True
        if method == "GET" and path == "/stats":
            await self.send(writer, 200, self.stats.__dict__)
            return True
        if method == "GET" and path == "/v1/models":
            await self.send(writer, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}]})
            return True
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            await self.send(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})
            return True
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            await self.send(writer, 400, {"error": {"message": "the body is not JSON", "type": "invalid_request"}})
            return True
        if not isinstance(request, dict):
            await self.send(writer, 400, {"error": {"message": "expected a JSON object", "type": "invalid_request"}})
            return True
        stats = self.stats
        stats.requests += 1
        stats.paths[path] = stats.paths.get(path, 0) + 1
        stats.last = request
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if path == "/v1/embeddings":
                return await self.embeddings(request, writer)
            return await self.complete(path, request, reader, writer)
        finally:
            stats.in_flight -= 1

    async def embeddings(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        inputs = request.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs if isinstance(inputs, list) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            await self.send(writer, 400, {"error": {"message": "input must be a string or a list of strings",
                                                    "type": "invalid_request"}})
            return True
        await asyncio.sleep(float(request.get("fake_delay_s", self.args.delay)))
        vectors = [embedding(t, self.args.dimensions) for t in texts]
        encoded: list[Any] = vectors
        if request.get("encoding_format") == "base64":  # what the OpenAI SDK asks for: float32, little-endian
            encoded = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        tokens = sum(len(t.split()) for t in texts)
        await self.send(writer, 200, {"object": "list", "data": data, "model": self.model,
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return True

    async def complete(self, path: str, request: dict[str, Any], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        chat = path == "/v1/chat/completions"
        count = int(request.get("max_tokens") or request.get("max_completion_tokens") or self.args.tokens)
        pieces = reply(self.model, count)
        created = int(time.time())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{self.stats.requests}"
        kind = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3 + len(pieces)}
        if not request.get("stream"):
            await asyncio.sleep(float(request.get("fake_delay_s", self.args.delay)))
            text = "".join(pieces)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            await self.send(writer, 200, {"id": ident, "object": kind, "created": created, "model": self.model,
                                          "choices": [choice], "usage": usage})
            return True
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        delay = float(request.get("fake_chunk_delay_s", self.args.chunk_delay))
        gone = asyncio.ensure_future(reader.read(1))  # the client sends nothing more: EOF means it went away
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        try:
            for index, piece in enumerate(pieces):
                if index and delay:
                    await asyncio.wait([gone], timeout=delay)
                if gone.done():
                    self.stats.cancelled += 1
                    return False
                last = index == len(pieces) - 1
                delta: dict[str, Any] = ({"role": "assistant", "content": piece} if index == 0 else {"content": piece})
                chunk_choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
                chunk_choice.update({"delta": delta} if chat else {"text": piece})
                chunk: dict[str, Any] = {"id": ident, "object": f"{kind}.chunk", "created": created,
                                         "model": self.model, "choices": [chunk_choice]}
                if last and include_usage:
                    chunk["usage"] = usage
                await self.chunk(writer, b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.stats.chunks_sent += 1
            await _cancel(gone)  # before the end: a client that got it may send its next request at once
            await self.chunk(writer, b"data: [DONE]\n\n")
            await self.chunk(writer, b"")
            self.stats.completed_streams += 1
            return True
        except (ConnectionError, OSError):
            self.stats.cancelled += 1
            return False
        finally:
            await _cancel(gone)

    @staticmethod
    async def chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
        await task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reconciler.testing.fake_openai")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="fake-model", help="the model it serves (what {model} fills in)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens in a reply without max_tokens")
    parser.add_argument("--delay", type=float, default=0.0, metavar="S", help="before a non-streamed answer")
    parser.add_argument("--chunk-delay", type=float, default=0.0, metavar="S", help="between streamed chunks")
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="S", help="/health is 503 until then")
    parser.add_argument("--dimensions", type=int, default=8, help="length of an embedding")
    parser.add_argument("--stats-file", default=None, help="append the final /stats to this file at exit")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    fake = FakeOpenAI(args)
    server = await asyncio.start_server(fake.connection, args.host, args.port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake openai ({args.model}) listening on {args.host}:{args.port} pid {os.getpid()}", flush=True)
    await stop.wait()
    server.close()  # not waiting for kept-alive connections: asyncio.run cancels their handlers
    if args.stats_file:
        with open(args.stats_file, "a") as out:
            out.write(json.dumps({"pid": os.getpid(), "model": args.model, **fake.stats.__dict__}) + "\n")


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
