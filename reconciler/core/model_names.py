"""What a model name may be: the one rule, for the API now and the runtime later.

A lease request's ``model`` (and a cf-orch allocation's candidates) ends up in
a started process's argv through the profile's templates (``{model}``), and
may end up in a path there: ``--model /models/{model}``. The templates keep a
value to one argv element (:mod:`.templates`), but one element is enough to
do harm: ``../../../../etc/passwd`` is a path out of any models directory,
``--help`` or ``-rf`` is an option, a NUL byte or a newline breaks the
command or the log. So a model name is what real model names look like,
and nothing else:

- Ollama: ``llama3.2:3b``, ``library/llama3:latest``,
  ``hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M``;
- Hugging Face: ``Qwen/Qwen2.5-7B-Instruct-AWQ``, ``mistralai/Mixtral-8x7B-v0.1``;
- GGUF files: ``Meta-Llama-3-8B-Instruct.Q4_K_M.gguf``.

That is: 1 to :data:`MAX_MODEL_NAME` ASCII letters, digits and ``. _ : / + -``,
starting with a letter or digit (not ``/``, ``-`` or ``.``), and ``/``
separating non-empty segments none of which is ``.`` or ``..``. No spaces,
no control characters, no shell or glob characters, no ``@`` (digests and
revisions are not accepted). :data:`MODEL_NAME` is the rule as one regular
expression; :func:`check_model_name` says which part of it a name breaks.
A later feature that declares a service's models may check against that list
as well; it does not loosen this rule.
"""

from __future__ import annotations

import re

MAX_MODEL_NAME = 200
ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:/+-")
MODEL_NAME = re.compile(
    rf"(?!.{{{MAX_MODEL_NAME + 1}}})"  # at most MAX_MODEL_NAME characters
    r"(?!(?:.*/)?\.{1,2}(?:/|\Z))"  # no '.' or '..' segment
    r"[A-Za-z0-9][A-Za-z0-9._:+-]*(?:/[A-Za-z0-9._:+-]+)*\Z",
    re.ASCII,
)
RULE = (f"a model name is 1 to {MAX_MODEL_NAME} letters, digits and . _ : / + - (ASCII), starting with a letter "
        "or digit, with '/' between non-empty segments none of which is '.' or '..' "
        "(e.g. llama3.2:3b, Qwen/Qwen2.5-7B-Instruct, model.Q4_K_M.gguf)")


def check_model_name(name: str) -> str | None:
    """None when ``name`` is a valid model name; else why not, followed by the whole rule."""
    reason = _broken(name)
    if reason is None and not MODEL_NAME.match(name):  # the checks below and the regex say the same (tested)
        reason = "it does not match the rule"
    return None if reason is None else f"{reason}; {RULE}"


def _broken(name: str) -> str | None:
    if not name:
        return "it is empty"
    if len(name) > MAX_MODEL_NAME:
        return f"it has {len(name)} characters, at most {MAX_MODEL_NAME} are allowed"
    bad = next((c for c in name if c not in ALLOWED), None)
    if bad is not None:
        return f"it contains {bad!r}"
    if not name[0].isalnum():
        return f"it starts with {name[0]!r}: it must start with a letter or digit"
    segments = name.split("/")
    if any(not segment for segment in segments):
        return "it has an empty path segment ('//' or a trailing '/')"
    if any(segment in (".", "..") for segment in segments):
        return "it has a '.' or '..' path segment"
    return None
