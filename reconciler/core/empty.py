"""Default factories for the models' empty lists and dicts: ``Field(default_factory=new_list)``.

pydantic asks every default factory, when it builds a model, whether it takes
the data validated so far (``inspect.signature``). For the builtins ``list``
and ``dict`` that means parsing their text signature with :mod:`tokenize`
(compiling its regular expressions first): the 20 such fields of the profile,
snapshot and plan models cost ``reconciler plan`` 20 M instructions at start-up
(issue 10; ≈ 4 ms on two cores). A Python function's signature is read from
its code at once. The defaults, the JSON schemas and every message are the same.
"""

from __future__ import annotations

from typing import Any


def new_list() -> list[Any]:
    """A new empty list."""
    return []


def new_dict() -> dict[Any, Any]:
    """A new empty dict."""
    return {}
