"""The model gateway: every OpenAI or Ollama client gets its model (DESIGN §7).

Applications speak the OpenAI API or Ollama's and name a ``model``. The
gateway is the one endpoint they point at (``reconciler serve --gateway
HOST:PORT``): it finds the service that serves the model, holds an implicit
lease through the runtime's leasing service for as long as the request runs —
which starts the service, switches an idle instance to that model, or evicts
less important idle services when needed, exactly as for any lease — and
proxies the request, streams included, to the instance.

    app.py        the ASGI app: routes, one request's path (gate → lease → relay), the read routes
    routing.py    model name → service (profile's ``models:``, an Ollama's live tags), close names
    gate.py       per service: max_concurrent in flight, a bounded FIFO queue, model-aware admission
    leases.py     implicit leases: the one place that calls the leasing service; keep_alive
    causes.py     which requests caused a start, a model switch, an eviction (read from the plans)
    translate.py  Ollama's API ↔ OpenAI's, requests, answers and streams
    upstream.py   one httpx connection pool per instance
    protocols.py  the protocols' error shapes, keep_alive durations
    server.py     the listener: uvicorn on the watch loop's event loop, a companion of the loop
    across.py     cluster mode (--etcd): a request placed across nodes, proxied to the chosen node's
                  gateway; the models of every live node listed

It sits beside :mod:`reconciler.api` (neither imports the other) above the
runtime; its per-model numbers go to :attr:`Runtime.traffic
<reconciler.runtime.Runtime.traffic>`, which the API shows.
"""
