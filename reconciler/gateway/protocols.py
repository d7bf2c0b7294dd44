"""The two protocols' shapes that are not about a model: errors, durations, the small answers.

An OpenAI client reads an error as ``{"error": {"message", "type", "param",
"code"}}``; an Ollama client as ``{"error": "message"}``. Every answer the
gateway makes itself — an unknown model (404, with close names), a full
queue (429, with ``Retry-After``), a model that could not be served in time
(503, with the plan's reason), a bad body (400), a missing token (401) — is
one :class:`Answer` in the shape of the protocol the client spoke
(:func:`error`).

Ollama's ``keep_alive`` is a number of seconds or a Go duration
(``"5m"``, ``"1h30m"``, ``"-1"``): :func:`parse_duration`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

Protocol = Literal["openai", "ollama"]

#: The Ollama version ``GET /api/version`` reports when no Ollama upstream runs to ask: a release whose
#: API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``, ``/api/ps``) is the one spoken here.
OLLAMA_VERSION = "0.6.8"

_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
    413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
    502: "upstream_error", 503: "service_unavailable", 504: "timeout",
}
_OPENAI_CODES = {404: "model_not_found", 429: "queue_full", 503: "model_unavailable", 401: "invalid_api_key"}


@dataclass(frozen=True)
class Answer:
    """A whole answer the gateway makes itself: status, headers, body."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def start(self) -> dict[str, object]:
        """The ASGI ``http.response.start`` message."""
        return {"type": "http.response.start", "status": self.status, "headers": [
            (b"content-type", self.content_type), (b"content-length", str(len(self.body)).encode()),
            *self.headers]}


def json_answer(body: object, status: int = 200) -> Answer:
    return Answer(status, json.dumps(body, separators=(",", ":")).encode())


def error(protocol: Protocol, status: int, message: str, *, param: str | None = None,
          retry_after_s: float | None = None) -> Answer:
    """An error in ``protocol``'s own shape (with ``Retry-After`` when given)."""
    if protocol == "ollama":
        body: object = {"error": message}
    else:
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"), "param": param,
                          "code": _OPENAI_CODES.get(status)}}
    headers = [(b"retry-after", str(max(1, round(retry_after_s))).encode())] if retry_after_s is not None else []
    answer = json_answer(body, status)
    return Answer(answer.status, answer.body, headers=headers)


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(value: object) -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number (seconds), or a Go duration (``"5m"``, ``"1h30m"``,
    ``"-1s"``); negative = forever. None when absent; ValueError saying what is accepted when unreadable."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"keep_alive {value!r}: expected seconds or a duration like \"5m\"")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION.findall(body)
        if parts and "".join(n + u for n, u in parts) == body:
            return sign * sum(float(n) * _UNITS[u] for n, u in parts)
    raise ValueError(f"keep_alive {value!r}: expected seconds (300, -1) or a duration like \"5m\" or \"1h30m\"")


__all__ = ["OLLAMA_VERSION", "Answer", "Protocol", "error", "json_answer", "parse_duration"]
