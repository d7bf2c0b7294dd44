"""Every kind of event the reconciler publishes, declared once.

An event is a record of something that happened — a pass, an action, an
instance changing state, a lease, a profile edit — as ``{"id", "ts", "kind",
...data}``. It goes to the store's event log (a few, frequent and uneventful, are only
*shown*: passes that found nothing to do), to the event stream of the API (``GET
/v1/events``), to the dashboard, to ``watch``'s output and to the metrics.
Publishers and subscribers name a kind through :class:`EventKind`, never as a
bare string, so a kind that no one declares cannot be published, a listener
cannot wait for one that is never sent, and ``reconciler/api/README.md`` and
the dashboard's list are checked against this one (tests do).

"""

from __future__ import annotations

from enum import StrEnum


class EventKind(StrEnum):
    """The kinds of event: each member's value is its wire name, its ``doc`` what it says."""

    doc: str

    def __new__(cls, value: str, doc: str = "") -> EventKind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.doc = doc
        return member

    # the loop
    WATCH_STARTED = "watch.started", "The loop started: profile, path, GPU backend, state directory, pid."
    WATCH_STOPPED = "watch.stopped", "The loop stopped (a signal); the services keep running."
    WATCH_DEGRADED = "watch.degraded", "The profile cannot be watched for a while (its directory went away…); retried."
    API_STARTED = "api.started", "The HTTP API listens: its URL and whether it needs a token."
    GATEWAY_STARTED = "gateway.started", "The model gateway (OpenAI and Ollama APIs) listens: its URL and whether it needs a token."
    PROFILE_RELOADED = "profile.reloaded", "A saved edit of the profile is in force now."
    PROFILE_HELD = "profile.held", "A saved edit removes services; it applies once the file has been stable a while."
    PROFILE_REJECTED = "profile.rejected", "A saved edit is invalid (with its located diagnostics) or refused; the last good profile stays."
    # passes
    PASS_STARTED = "pass.started", "A pass begins (shown, never recorded)."
    PASS = "pass", "The runtime's account of one observe → plan → apply pass (recorded only when it acted)."
    PASS_FINISHED = "pass.finished", "The loop's account of one converge: outcomes, pending, stalled, duration."
    PASS_FAILED = "pass.failed", "A pass raised (the GPU or the store unreadable for a moment); retried later."
    # actions
    ACTION_STARTED = "action.started", "A plan action was dispatched: its id and reason."
    ACTION_FINISHED = "action.finished", "A plan action ended: done, failed, skipped or deferred, and in how long."
    # instances
    INSTANCE_LAUNCHED = "instance.launched", "A process or container of ours was launched (not yet healthy)."
    INSTANCE_HEALTHY = "instance.healthy", "A start became healthy: the instance is running."
    INSTANCE_FAILED = "instance.failed", "A start failed or a running instance failed its probes; it was stopped."
    INSTANCE_GONE = "instance.gone", "An instance is not running any more (found dead, or an adopted one stopped answering)."
    INSTANCE_STOPPED = "instance.stopped", "An instance of ours was stopped (or evicted)."
    INSTANCE_UNLOADED = "instance.unloaded", "An adopted Ollama's models were unloaded to free its memory; it keeps running."
    INSTANCE_ADOPTED = "instance.adopted", "A healthy listener became an instance without starting anything."
    INSTANCE_RELEASED = "instance.released", "An adopted instance whose service left the profile is forgotten; it keeps running."
    INSTANCE_FORGOTTEN = "instance.forgotten", "An instance could not be identified as ours; it is forgotten, never signalled."
    OPERATOR_REQUEST = "operator.request", "An operator asked for something: `stop`, `start`, `restart`, `reset` a service, or `down` (CLI or API)."
    BACKOFF = "backoff", "A service failed again: its failure count, next attempt, whether it is stalled."
    # crash recovery
    INTENT_RECOVERED = "intent.recovered", "An action a previous run left half done was resolved at start-up."
    INTENT_UNRESOLVED = "intent.unresolved", "Such an action cannot be checked now (the Docker daemon is down…); left open."
    INSTANCE_RECOVERED = "instance.recovered", "At start-up, a process of ours the inventory did not know (found by the marker in its environment) is an instance again."
    INSTANCE_STRAY = "instance.stray", "At start-up, a process of ours that cannot be an instance (its service has one): left running, never signalled."
    # the state store
    STORE_FAILED = "store.failed", "The state store cannot be read or written: which file, what to do (shown; it cannot be recorded). Passes are retried."
    STORE_RECOVERED = "store.recovered", "The state store works again after a failure."
    STORE_RESTORED = "store.restored", "state.db was deleted or replaced while running; the reconciler wrote its state back."
    # leases and demands
    DEMAND_ADDED = "demand.added", "A lease request waits for its service (a demand)."
    DEMAND_WITHDRAWN = "demand.withdrawn", "A demand was withdrawn: its caller gave up, went away, or a previous run left it."
    LEASE_GRANTED = "lease.granted", "A lease was granted (warm, by a pass, or a VRAM lease)."
    LEASE_RENEWED = "lease.renewed", "A lease's expiry moved."
    LEASE_RELEASED = "lease.released", "A lease ended because its holder (or an eviction) let it go."
    LEASE_EXPIRED = "lease.expired", "A lease ended because its time was up."
    # the model gateway
    GATEWAY_COLD = "gateway.cold", "A gateway request's model was not ready: what its wait caused (a start, a model switch, evictions), naming the model and the client."
    OLLAMA_PULL = "ollama.pull", "An Ollama pulls a model a lease asked for (pull: true): started, progress (shown, not recorded), done or failed."
    GATEWAY_REFUSED = "gateway.refused", "A gateway request could not be served within its wait: the model, the client and the plan's reason (answered 503)."
    CLUSTER_JOINED = "cluster.joined", "This node joined its cluster in etcd (at start-up, or again after etcd or its lease came back): its state is published."
    CLUSTER_DISCONNECTED = "cluster.disconnected", "etcd stopped answering this node: its services keep running, placement across nodes waits until etcd answers."
