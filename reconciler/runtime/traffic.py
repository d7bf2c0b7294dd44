"""What the gateway's requests did, per model: counts, waits, latencies, and what they caused.

The model gateway (:mod:`reconciler.gateway`) serves beside the HTTP API in one
process; the status document, ``reconciler status``, the dashboard and
``/metrics`` show its traffic. Neither layer imports the other, so the
numbers live here, one :class:`Traffic` per runtime (:attr:`Runtime.traffic
<reconciler.runtime.Runtime.traffic>`): the gateway writes, the API reads.

Per model (the name the upstream knows it by) and service:

* ``requests`` answered, ``errors`` among them (a status of 400 or more,
  the gateway's or the upstream's), ``disconnected`` (the client went away);
* ``in_flight`` (holding their implicit lease, being proxied) and ``queued``
  (waiting for the service: a free ``max_concurrent`` slot, a start, a
  model switch);
* time to first byte (from the request's arrival to the first byte of the
  answer sent on) and total time, as counts and sums (Prometheus summaries)
  and over the last :data:`RECENT` requests (p50, p99 in the status);
* ``caused``: how many starts, model switches and evictions its requests'
  demands caused (:mod:`reconciler.gateway.causes` finds them in the plans);
* ``proxied`` (cluster mode): requests this node's gateway was asked for and
  placed on another node's gateway, by that node, counted here when that node's
  answer began. Everything above counts only requests served *here* — a proxied
  request is counted there, in full, and here only as proxied — so that adding
  up the nodes' ``requests`` gives each request once. Keyed by the model and
  service as the serving node knows them.

Everything here is plain counting in the event loop's thread: no lock, no
I/O, no clock of its own (the callers measure).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RECENT = 512  # requests per model whose latencies make the status document's percentiles
CAUSES = ("start", "switch", "evict")


def percentile(samples: deque[float] | list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1, nearest rank) of ``samples``; None when empty."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Latency:
    """Seconds: a count and a sum since start, and the most recent samples."""

    count: int = 0
    total_s: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.recent.append(seconds)

    def quantile(self, q: float) -> float | None:
        return percentile(self.recent, q)


@dataclass
class ModelTraffic:
    """One model's requests through the gateway."""

    model: str
    service: str
    requests: int = 0
    errors: int = 0
    disconnected: int = 0
    in_flight: int = 0
    queued: int = 0
    ttfb: Latency = field(default_factory=Latency)
    total: Latency = field(default_factory=Latency)
    caused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSES, 0))
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status → requests answered with it
    proxied: dict[str, int] = field(default_factory=dict)  # node → requests placed on its gateway from here

    def answered(self, status: int, seconds: float) -> None:
        self.requests += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 400:
            self.errors += 1
        self.total.observe(seconds)


class Traffic:
    """Every model's :class:`ModelTraffic`, by (model, service)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelTraffic] = {}

    def of(self, model: str, service: str) -> ModelTraffic:
        key = (model, service)
        found = self._models.get(key)
        if found is None:
            found = self._models[key] = ModelTraffic(model, service)
        return found

    def models(self) -> list[ModelTraffic]:
        """Every model that had a request, by service then model."""
        return [self._models[key] for key in sorted(self._models, key=lambda k: (k[1], k[0]))]


__all__ = ["CAUSES", "RECENT", "Latency", "ModelTraffic", "Traffic", "percentile"]
