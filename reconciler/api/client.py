"""A small client of the native API, for ``reconciler status``, ``lease`` and ``why``.

The server is ``--url``, else ``$RECONCILER_URL``, else ``http://127.0.0.1:7700``.
The token (every call needs it when the server has one: ``reconciler/api/auth.py``)
comes from the first of: ``--token-file FILE``, ``$RECONCILER_TOKEN_FILE``
(a file, like the server's ``--token-file``: the same file can serve both),
``$RECONCILER_TOKEN`` (the token itself, for a CI job's secret). A file
that cannot be read, or is empty, is an error naming it, never a silent
call without the token. Every failure is an :class:`ApiError` (a
:class:`~reconciler.errors.ReconcilerError`, so the CLI prints it as one
line): no server there, or the server's ``detail`` — a 401 adds how to give
the token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from reconciler.errors import ReconcilerError

DEFAULT_URL = "http://127.0.0.1:7700"
URL_ENV = "RECONCILER_URL"
TOKEN_ENV = "RECONCILER_TOKEN"
TOKEN_FILE_ENV = "RECONCILER_TOKEN_FILE"
TOKEN_HINT = f"give the server's token: --token-file FILE, or ${TOKEN_FILE_ENV} (a file) or ${TOKEN_ENV}"


class ApiError(ReconcilerError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def load_token(token_file: str | None) -> str | None:
    """The token from ``--token-file``, else ``$RECONCILER_TOKEN_FILE``, else ``$RECONCILER_TOKEN``; None if
    none is given. ApiError naming the file when a given file cannot be read or holds no token."""
    if token_file:
        return _read_token(token_file, "--token-file")
    from_env = os.environ.get(TOKEN_FILE_ENV)
    if from_env:
        return _read_token(from_env, f"${TOKEN_FILE_ENV}")
    return os.environ.get(TOKEN_ENV, "").strip() or None


def _read_token(path: str, source: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ApiError(f"{source} {path}: cannot read the token: {reason}") from None
    if not token:
        raise ApiError(f"{source} {path} is empty; put the server's token in it (the one its --token-file holds)")
    return token


def describe(detail: Any) -> str:
    """A ``detail`` in one line: a string as it is, a validation list as ``loc: msg; …``."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = 10.0):
        self.url = (url or default_url()).rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, json: Any = None, timeout_s: float | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=json,
                                          timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.TimeoutException:
            raise ApiError(f"{self.url}{path}: no answer in time") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"no reconciler API at {self.url} ({exc}); start one with `reconciler serve`, "
                           f"or point --url / ${URL_ENV} at it") from None
        if response.is_success:
            return response.json()
        try:
            detail = describe(response.json().get("detail"))
        except ValueError:
            detail = response.text[:200] or response.reason_phrase
        if response.status_code == 401:
            detail = f"{detail} — {TOKEN_HINT}"
        raise ApiError(f"{method} {path}: {response.status_code} {detail}", status=response.status_code)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, *, timeout_s: float | None = None) -> Any:
        return self.request("POST", path, json=body, timeout_s=timeout_s)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)
