"""Ollama's ``POST /api/pull`` through the gateway: which service pulls, and the answer when none needs to.

Ollama clients (``ollama pull``, Open WebUI's model manager, the ``ollama``
Python package) pull a model before they use it. Through the gateway:

* **A model an Ollama serves** (listed by its ``/api/tags``, or named in its
  ``models:``) is pulled by that Ollama: the request is passed through and
  its progress lines (NDJSON: ``pulling manifest``, ``pulling <digest>``
  with ``total`` and ``completed``, …, ``success``) are relayed as they
  come, like any streamed answer. The Ollama is started first when it is
  on demand, and held (an implicit lease, a place in its gate) until the
  pull ends or the client goes away — which stops the download, as it does
  with Ollama itself.
* **A name nobody serves yet** is what a pull is usually for. With one
  Ollama service in the profile, that Ollama pulls it; once its next health
  probe lists the model (the gateway wakes the loop when a pull ends), the
  model is routable. With several, the gateway cannot guess: a 404 in
  Ollama's shape names them, and says to list the model in one's
  ``models:``. With none, a 404 says that nothing here pulls.
* **A model of an OpenAI-only server** (``llama-server``, vLLM) is provided
  by the profile — a file its launch names, or a model the server loads
  itself — so there is nothing to download: the answer is Ollama's for a
  model already present, ``{"status": "success"}`` (one NDJSON line when
  streamed, the default; one JSON object with ``"stream": false``), and
  nothing is started. This is the choice the gateway makes so that a
  client's "pull, then chat" works against any model it lists; a client
  that needs to know where the model comes from reads ``/api/tags``
  (``details.family`` is the service).

:func:`pull_target` decides; :func:`provided` is the answer for the last
case.
"""

from __future__ import annotations

import json

from reconciler.core.profile import Profile
from reconciler.core.served import routable, speaks
from reconciler.gateway.protocols import Answer
from reconciler.gateway.routing import Routes, Target


def pull_target(routes: Routes, profile: Profile, name: str) -> Target | str:
    """The service that answers a pull of ``name``, or why none does (a 404's words)."""
    target = routes.resolve(name)
    if target is not None:
        return target
    ollamas = sorted(service for service, spec in profile.services.items()
                     if routable(spec) and speaks(spec) == "ollama")
    if len(ollamas) == 1:
        spec = profile.services[ollamas[0]]
        return Target(name, name, ollamas[0], spec, "ollama", spec.base_url or "")
    if not ollamas:
        return (f"model {name!r} is not served here, and no Ollama service in profile {profile.name!r} could pull "
                f"it{_close(routes, name)}; a model a llama-server or vLLM serves is named in its `models:`")
    return (f"model {name!r} is not served here, and {len(ollamas)} Ollama services could pull it "
            f"({', '.join(ollamas)}){_close(routes, name)}: name it in one's `models:` in the profile, so the gateway "
            "knows which, or pull it on that Ollama directly")


def _close(routes: Routes, name: str) -> str:
    close = routes.suggest(name)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def provided(stream: bool) -> Answer:
    """Ollama's answer to a pull of a model that is already there: ``success``, streamed or not."""
    line = json.dumps({"status": "success"}).encode()
    if stream:
        return Answer(200, line + b"\n", b"application/x-ndjson")
    return Answer(200, line)


__all__ = ["provided", "pull_target"]
