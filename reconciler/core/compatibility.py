"""Can this running instance serve this request now? (DESIGN §3, "Compatibility")

Like Ollama's scheduler deciding whether a loaded runner can take a request
(``GetRunner``): a running, healthy instance of the service serves a request

* when the model matches — or the request names none, or the service's
  launch does not use ``{model}`` at all (:func:`model_bound`: then the model
  is the service's business, not ours);
* when one of its lease slots is free — ``max_concurrent`` when the service is
  ``shared``, else one (:func:`capacity`);
* on the GPU asked for, when one is (for a service spanning several GPUs:
  when it is one of them);
* and, for an Ollama, when it has pulled the model (its ``/api/tags`` lists
  it; a name without a tag means ``:latest``) — Ollama would answer 404.

The planner asks these questions while it grants demands
(:mod:`.granting`), and the leasing service asks :func:`can_serve_now` on its
fast path, between passes, so the two can never disagree about what
"compatible" means.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from reconciler.core.profile import Service, is_ollama
from reconciler.core.templates import find_placeholders


def model_bound(spec: Service) -> bool:
    """Whether the launch spec uses ``{model}``: only then does a demand's model matter."""
    managed = spec.managed
    if managed is None:
        return False
    template = managed.args_template if managed.type == "process" else managed.command_template
    return any("model" in find_placeholders(t) for t in (template, *managed.env.values()))


def capacity(spec: Service) -> int:
    """Leases one instance may hold at once: ``max_concurrent`` when shared, else one."""
    return spec.max_concurrent if spec.shared else 1


def model_matches(spec: Service, serving: str | None, wanted: str | None) -> bool:
    """Whether an instance serving ``serving`` serves a request for ``wanted``."""
    return not model_bound(spec) or wanted is None or wanted == serving


def slot_free(spec: Service, held: int) -> bool:
    """Whether an instance holding ``held`` leases may take one more."""
    return held < capacity(spec)


def gpu_matches(placed: int | Sequence[int] | None, wanted: int | None) -> bool:
    """Whether an instance on GPU ``placed`` (or on every GPU of ``placed``, for one spanning several) serves
    a request for GPU ``wanted`` (None: any): when ``wanted`` is one of its GPUs."""
    if wanted is None or placed is None:
        return True
    if isinstance(placed, int):
        return placed == wanted
    return not placed or wanted in placed


def ollama_has(installed: list[str], model: str) -> bool:
    """Whether an Ollama listing ``installed`` has ``model`` (a name without a tag means ``:latest``)."""
    return model in installed or (":" not in model and f"{model}:latest" in installed)


def pulled(spec: Service, installed: list[str] | None, model: str | None) -> bool:
    """Whether an Ollama has ``model`` (unknown lists, other services and no model: yes)."""
    return model is None or installed is None or not is_ollama(spec) or ollama_has(installed, model)


class Mismatch(Enum):
    """Why a running instance cannot serve a request now."""

    MODEL = "it serves another model"
    NOT_PULLED = "it is an Ollama that has not pulled the model"
    FULL = "every lease slot is held"
    GPU = "it runs on another GPU"


def can_serve_now(
    spec: Service, *, serving: str | None, placed: int | Sequence[int] | None, held: int, model: str | None,
    gpu: int | None,
    installed: list[str] | None = None,
) -> Mismatch | None:
    """None when a healthy running instance (serving ``serving`` on GPU ``placed``, holding
    ``held`` leases; an Ollama with ``installed`` models) serves a request for ``model`` on ``gpu``
    now; else the first reason it does not."""
    if not pulled(spec, installed, model):
        return Mismatch.NOT_PULLED
    if not model_matches(spec, serving, model):
        return Mismatch.MODEL
    if not slot_free(spec, held):
        return Mismatch.FULL
    if not gpu_matches(placed, gpu):
        return Mismatch.GPU
    return None
