"""JSON request bodies are Unicode text: a lone UTF-16 surrogate is a 422, never a 500.

JSON may escape any UTF-16 code unit, so ``"\\ud800"`` is valid JSON that
Python's parser turns into a string holding half a character. Such a string
cannot be written as UTF-8: not into SQLite, not into an event, not into the
422 that would echo it — each of those used to end in a 500 with a
traceback. Every route that takes a body (native ``/v1`` and cf-orch ``/api``,
through :class:`TextRoute`) therefore reads it first and refuses a lone
surrogate anywhere in it — in a value or in a key, also in a key the route
would ignore — with a 422 whose ``loc`` says where (``["body", "holder"]``,
``["body", "model_candidates", 0]``) and whose message says what to send
instead. A surrogate *pair* (``"\\ud83d\\ude00"``) is one character and fine.

A body that is not JSON at all is left to the route's own parsing (a 422 or
400 as before); a body over the size limit is refused before this reads it
(:mod:`.limits`). :class:`SafeJSONResponse` writes any string that still is
not text escaped (``\\udc80``), so that no answer can fail to be written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

SURROGATE = re.compile("[\ud800-\udfff]")
Path = tuple[str | int, ...]


def escaped(text: str) -> str:
    """``text`` with every code point UTF-8 cannot write as its ``\\uXXXX`` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate(value: Any) -> tuple[Path, str] | None:
    """Where the first string (or key) holding a lone surrogate is in a parsed JSON value, and that string."""
    for path, text in _strings(value):
        if SURROGATE.search(text):
            return path, text
    return None


def _strings(value: Any) -> Iterator[tuple[Path, str]]:
    """Every string and key of a parsed JSON value with its path, depth first (no recursion: json.loads
    already bounded the depth, but a stack of our own costs nothing)."""
    stack: list[tuple[Path, Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            yield path, item
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                yield (*path, escaped(key)), key
                children.append(((*path, key), child))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(((*path, i), child) for i, child in reversed(list(enumerate(item))))


def problem_at(path: Path, text: str) -> dict[str, Any]:
    bad = escaped(SURROGATE.findall(text)[0])
    return {
        "type": "string_unicode",
        "loc": ("body", *(escaped(p) if isinstance(p, str) else p for p in path)),
        "msg": f"a lone UTF-16 surrogate ({bad}) is half a character, not text: send UTF-8, and write a "
               "character beyond U+FFFF escaped as a surrogate pair (e.g. \\ud83d\\ude00)",
        "input": escaped(text) if len(text) <= 200 else escaped(text[:200]) + "…",
    }


async def refuse_lone_surrogates(request: Request) -> None:
    """Raise a 422 (RequestValidationError) when the request's JSON body holds a lone surrogate."""
    try:
        body = await request.json()  # cached on the request: the route reads this same parse
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply: the route's parsing says so
        return
    except ClientDisconnect:  # gone (or cut off for stalling) before the body came: nobody reads an answer
        raise HTTPException(400, "the client went away before its body arrived") from None
    found = lone_surrogate(body)
    if found is not None:
        raise RequestValidationError([problem_at(*found)])


class TextRoute(APIRoute):
    """A route whose JSON body is checked for lone surrogates before anything else reads it."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            await refuse_lone_surrogates(request)
            return await handler(request)

        return checked


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a string that is not text is written escaped rather than failing."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")
