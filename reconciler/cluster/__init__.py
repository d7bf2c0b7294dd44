"""Cluster mode (DESIGN §8): nodes that share state through etcd.

``reconciler serve --node NAME --etcd URL[,URL…]`` joins a cluster; without
``--etcd`` nothing here is imported. Layers: this package sits between the API
(which places and forwards lease requests through it) and the runtime (which
it reads through its public interface — the store, the last pass, the event
bus — and never drives: nothing here starts or stops a service).

* :mod:`.etcd` — the etcd v3 client (JSON gateway over httpx) and its errors;
* :mod:`.placement` — what a node offers for a service, and the ranking of nodes;
* :mod:`.confirming` — placement confirmations against etcd, grouped (one call answers all waiting);
* :mod:`.node` — membership (one etcd lease per node), publishing, placement.
"""
