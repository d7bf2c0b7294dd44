"""Which models each service serves: the gateway's routing table, as far as the profile says (DESIGN §7).

A client of the gateway names a ``model``; this module says which service
serves it and under which name the service knows it:

* a service with ``models:`` serves those names and their aliases (an alias
  is forwarded as its model's name, which is also what fills ``{model}``);
* a service without ``models:`` serves one model: its ``model`` — or, when
  its launch has no ``{model}`` and it names no ``model``, its own name (a
  whisper server is asked for by the service's name);
* an Ollama also serves whatever its ``/api/tags`` lists, read live by each
  health probe; the gateway adds those names (:func:`routing_table`'s
  ``live``) after the profile's own, so a name the profile gives to another
  service is never taken by an Ollama.

Only a service the gateway can reach is routable: one with a ``managed``
block and a port (an unmanaged slot is accounted, never proxied). Two
services claiming one name is a validation error (:func:`claims` gives every
claim with the profile path it comes from; :mod:`.checks` reports the
second). What a service speaks (:func:`speaks`): ``api:``, else ``ollama``
for an Ollama and ``openai`` for everything else.

Ollama's own naming applies to the names an Ollama lists: ``llama3.2`` asks
for ``llama3.2:latest`` (:func:`lookup`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

from reconciler.core.compatibility import model_bound
from reconciler.core.profile import NO_MODEL_SPEC, ModelSpec, Profile, Service, is_ollama

Api = Literal["openai", "ollama"]
ProfilePath = tuple[str | int, ...]


def speaks(spec: Service) -> Api:
    """The protocol a service answers in: its ``api``, else ``ollama`` for an Ollama, else ``openai``."""
    if spec.api is not None:
        return spec.api
    return "ollama" if is_ollama(spec) else "openai"


def routable(spec: Service) -> bool:
    """Whether the gateway can send requests to it: managed, with a port."""
    return spec.managed is not None and spec.probe_port is not None


def declared_models(name: str, spec: Service) -> dict[str, ModelSpec]:
    """The models the profile says ``name`` serves (see the module docstring); {} when none."""
    if spec.models is not None:
        return spec.model_specs
    if spec.model is not None:
        return {spec.model: NO_MODEL_SPEC}
    if not model_bound(spec):
        return {name: NO_MODEL_SPEC}
    return {}


class Claim(NamedTuple):
    """One name a service answers to, and where in the profile it comes from."""

    name: str
    service: str
    model: str  # what the name stands for: the model's own name (an alias's model)
    path: ProfilePath


def claims(name: str, spec: Service) -> list[Claim]:
    """Every name ``name`` answers to, in profile order, each with its path (for located errors)."""
    if not routable(spec):
        return []
    base: ProfilePath = ("services", name)
    if spec.models is None:
        return [Claim(model, name, model, base + (("model",) if spec.model is not None else ()))
                for model in declared_models(name, spec)]
    out: list[Claim] = []
    if isinstance(spec.models, list):  # a list may name one model twice (a mapping cannot)
        return [Claim(model, name, model, (*base, "models", index)) for index, model in enumerate(spec.models)]
    for model, entry in spec.model_specs.items():
        out.append(Claim(model, name, model, (*base, "models", model)))
        for position, alias in enumerate(entry.aliases):
            out.append(Claim(alias, name, model, (*base, "models", model, "aliases", position)))
    return out


class Route(NamedTuple):
    """Where a model name goes: the service, and the name its upstream knows the model by."""

    service: str
    model: str  # the model's own name: what the upstream is sent and {model} is filled with
    api: Api
    declared: bool  # named by the profile (False: listed live by an Ollama)


def routing_table(profile: Profile, live: Mapping[str, Sequence[str]] | None = None) -> dict[str, Route]:
    """Every routable name → its :class:`Route`: the profile's claims first (most important service first
    when a name were claimed twice, which validation forbids), then what each Ollama lists (``live``:
    service → names, from its last ``/api/tags``) for names nobody claims."""
    table: dict[str, Route] = {}
    order = sorted(profile.services.items(), key=lambda item: (item[1].priority, item[0]))
    for name, spec in order:
        for claim in claims(name, spec):
            table.setdefault(claim.name, Route(name, claim.model, speaks(spec), True))
    for name, spec in order:
        if not routable(spec) or not is_ollama(spec):
            continue
        for model in (live or {}).get(name, ()):
            table.setdefault(model, Route(name, model, speaks(spec), False))
    return table


def lookup(table: Mapping[str, Route], model: str) -> Route | None:
    """The route of ``model``, with Ollama's tag rule: no tag means ``:latest`` (and ``x:latest`` finds ``x``)."""
    route = table.get(model)
    if route is not None:
        return route
    if ":" not in model:
        return table.get(f"{model}:latest")
    if model.endswith(":latest"):
        return table.get(model.removesuffix(":latest"))
    return None


__all__ = ["Api", "Claim", "Route", "claims", "declared_models", "lookup", "routable", "routing_table", "speaks"]
