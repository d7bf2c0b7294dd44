"""Ollama's API spoken to a server that knows only OpenAI's: requests one way, answers and streams back.

An Ollama client (``/api/chat``, ``/api/generate``, ``/api/embed``) may name a
model that a ``llama-server`` or a vLLM serves; those speak OpenAI's API
only. This module turns the request into OpenAI's and the answer back into
Ollama's — pure functions over parsed JSON, nothing else:

* ``/api/chat`` → ``/v1/chat/completions``: ``messages`` (an Ollama
  message's ``images`` become ``image_url`` parts, its ``tool_calls`` OpenAI's
  with JSON-string arguments), ``options`` (``temperature``, ``top_p``,
  ``top_k``, ``min_p``, ``seed``, ``stop``, ``num_predict`` → ``max_tokens``,
  ``presence_penalty``, ``frequency_penalty``, ``repeat_penalty``),
  ``format`` (``"json"`` → a JSON object response format, a schema → a JSON
  schema one), ``tools``;
* ``/api/generate`` → ``/v1/chat/completions`` with the ``system`` and the
  ``prompt`` as messages (Ollama applies the model's template; so does the
  server's chat endpoint), or ``/v1/completions`` with the prompt as it is
  when ``raw`` is true;
* ``/api/embed`` (and the older ``/api/embeddings``) → ``/v1/embeddings``.

Streams: OpenAI's server-sent events come in as ``data: {chunk}`` lines and go
out as Ollama's NDJSON, one line per chunk that carries text
(:class:`StreamTranslator`), then the ``"done": true`` line with the reason
and the token counts (asked for with ``stream_options.include_usage``). A
stream that ends without ``[DONE]`` ends with an ``{"error": …}`` line, as
Ollama's own do. Durations Ollama reports in nanoseconds are the gateway's
own measure (``total_duration``); what it cannot know (load and eval split)
is 0.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

Json = dict[str, Any]

#: Ollama option → OpenAI request field (llama-server and vLLM also read top_k, min_p, repeat_penalty).
OPTIONS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
    "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
}
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}


def now_iso() -> str:
    """Ollama's ``created_at``: RFC 3339 with nanoseconds' worth of digits, UTC."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _options(body: Json, out: Json) -> None:
    options = body.get("options")
    if isinstance(options, dict):
        for key, target in OPTIONS.items():
            if options.get(key) is not None:
                out[target] = options[key]
        predict = options.get("num_predict")
        if isinstance(predict, int) and predict >= 0:
            out["max_tokens"] = predict
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}


def _message(message: Any) -> Json:
    if not isinstance(message, dict):
        return {"role": "user", "content": str(message)}
    out: Json = {"role": message.get("role", "user"), "content": message.get("content") or ""}
    images = message.get("images")
    if isinstance(images, list) and images:
        parts: list[Json] = [{"type": "text", "text": out["content"]}] if out["content"] else []
        parts += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
                  for image in images if isinstance(image, str)]
        out["content"] = parts
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        out["tool_calls"] = [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": (c.get("function") or {}).get("name", ""),
                          "arguments": json.dumps((c.get("function") or {}).get("arguments") or {})}}
            for i, c in enumerate(calls) if isinstance(c, dict)]
    if message.get("tool_name"):
        out["name"] = message["tool_name"]
    return out


def chat_request(body: Json, model: str, stream: bool) -> Json:
    """``/api/chat``'s body as ``/v1/chat/completions``' (``model``: the name the upstream knows)."""
    messages = body.get("messages")
    out: Json = {"model": model, "messages": [_message(m) for m in messages] if isinstance(messages, list) else [],
                 "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    _options(body, out)
    if isinstance(body.get("tools"), list):
        out["tools"] = body["tools"]
    return out


def generate_request(body: Json, model: str, stream: bool) -> tuple[str, Json]:
    """``/api/generate``'s body as (path, OpenAI body): chat unless ``raw``, then plain completions."""
    prompt = body.get("prompt") or ""
    if body.get("raw"):
        out: Json = {"model": model, "prompt": prompt, "stream": stream}
        if isinstance(body.get("suffix"), str):
            out["suffix"] = body["suffix"]
        path = "/v1/completions"
    else:
        messages: list[Json] = []
        if isinstance(body.get("system"), str) and body["system"]:
            messages.append({"role": "system", "content": body["system"]})
        messages.append(_message({"role": "user", "content": prompt, "images": body.get("images")}))
        out = {"model": model, "messages": messages, "stream": stream}
        path = "/v1/chat/completions"
    if stream:
        out["stream_options"] = {"include_usage": True}
    _options(body, out)
    return path, out


def embed_request(body: Json, model: str) -> Json:
    """``/api/embed`` (``input``) or ``/api/embeddings`` (``prompt``) as ``/v1/embeddings``."""
    text = body.get("input", body.get("prompt", ""))
    out: Json = {"model": model, "input": text, "encoding_format": "float"}
    if isinstance(body.get("dimensions"), int):
        out["dimensions"] = body["dimensions"]
    return out


def embed_answer(answer: Json, model: str, legacy: bool, started_ns: int) -> Json:
    """``/v1/embeddings``' answer as ``/api/embed``'s (or, ``legacy``, ``/api/embeddings``' one vector)."""
    data = sorted((d for d in answer.get("data") or [] if isinstance(d, dict)), key=lambda d: d.get("index", 0))
    vectors = [d.get("embedding") for d in data]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    usage = answer.get("usage") or {}
    return {"model": model, "embeddings": vectors, "total_duration": time.monotonic_ns() - started_ns,
            "load_duration": 0, "prompt_eval_count": usage.get("prompt_tokens", 0)}


def _tool_calls(calls: Any) -> list[Json]:
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") or {} if isinstance(call, dict) else {}
        arguments: Any = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments else {}
            except ValueError:
                arguments = {"_raw": arguments}
        out.append({"function": {"name": function.get("name", ""), "arguments": arguments or {}}})
    return out


def _final(model: str, kind: str, reason: str | None, usage: Json, started_ns: int) -> Json:
    line: Json = {"model": model, "created_at": now_iso()}
    line.update({"message": {"role": "assistant", "content": ""}} if kind == "chat" else {"response": ""})
    line.update({
        "done": True, "done_reason": DONE_REASONS.get(reason or "stop", reason or "stop"),
        "total_duration": time.monotonic_ns() - started_ns, "load_duration": 0,
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0), "prompt_eval_duration": 0,
        "eval_count": int(usage.get("completion_tokens") or 0), "eval_duration": 0,
    })
    return line


def complete_answer(answer: Json, model: str, kind: str, started_ns: int) -> Json:
    """A whole ``/v1/chat/completions`` (or ``/v1/completions``) answer as Ollama's ``kind`` (chat|generate)."""
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    text = message.get("content") if "message" in choice else choice.get("text")
    line = _final(model, kind, choice.get("finish_reason"), answer.get("usage") or {}, started_ns)
    if kind == "chat":
        line["message"] = {"role": "assistant", "content": text or ""}
        if message.get("tool_calls"):
            line["message"]["tool_calls"] = _tool_calls(message["tool_calls"])
    else:
        line["response"] = text or ""
    return line


def error_text(body: bytes, status: int) -> str:
    """An upstream's error answer in words (OpenAI's ``error.message``, else the body's start)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    text = body.decode(errors="replace").strip()[:300]
    return f"the model server answered {status}" + (f": {text}" if text else "")


class StreamTranslator:
    """OpenAI server-sent events in, Ollama NDJSON lines out (``kind``: chat or generate)."""

    def __init__(self, model: str, kind: str, started_ns: int):
        self.model = model
        self.kind = kind
        self.started_ns = started_ns
        self.reason: str | None = None
        self.usage: Json = {}
        self.done = False
        self._pending = b""
        self._calls: dict[int, Json] = {}  # streamed tool calls, by index, assembled until the end

    def feed(self, data: bytes) -> bytes:
        """Bytes of the event stream (any split) → the NDJSON lines they complete."""
        self._pending += data
        out = []
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            translated = self._line(line.strip())
            if translated is not None:
                out.append(translated)
        return b"".join(out)

    def _line(self, line: bytes) -> bytes | None:
        if not line.startswith(b"data:"):
            return None  # comments, event names, the blank separators
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return self.finish()
        try:
            chunk = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        if isinstance(chunk.get("error"), dict | str):
            self.done = True
            err = chunk["error"]
            return _ndjson({"error": err.get("message", str(err)) if isinstance(err, dict) else err})
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        if choice.get("finish_reason"):
            self.reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        text = delta.get("content") if "delta" in choice else choice.get("text")  # chat, or plain completions
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                slot = self._calls.setdefault(int(call.get("index", 0)), {"name": "", "arguments": ""})
                function = call.get("function") or {}
                slot["name"] += function.get("name") or ""
                slot["arguments"] += function.get("arguments") or ""
        if not text:
            return None
        line_out: Json = {"model": self.model, "created_at": now_iso()}
        line_out.update({"message": {"role": "assistant", "content": text}} if self.kind == "chat"
                        else {"response": text})
        line_out["done"] = False
        return _ndjson(line_out)

    def finish(self) -> bytes:
        """The ``"done": true`` line (once)."""
        if self.done:
            return b""
        self.done = True
        final = _final(self.model, self.kind, self.reason, self.usage, self.started_ns)
        if self._calls and self.kind == "chat":
            final["message"]["tool_calls"] = _tool_calls(
                [{"function": c} for _, c in sorted(self._calls.items())])
        return _ndjson(final)

    def cut_short(self, why: str) -> bytes:
        """The line that ends a stream the upstream broke off (an error, as Ollama's own streams end)."""
        if self.done:
            return b""
        self.done = True
        return _ndjson({"error": why})


def _ndjson(line: Json) -> bytes:
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


__all__ = ["StreamTranslator", "chat_request", "complete_answer", "embed_answer", "embed_request", "error_text",
           "generate_request", "now_iso"]
