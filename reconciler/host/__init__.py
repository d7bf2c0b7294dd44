"""The host side of observation: what the reconciler sees of the machine it runs on.

Each module holds one concept behind a small interface, so the pure core
(:mod:`reconciler.core`) never touches the host and tests can swap in fakes:

- :mod:`.gpu`        the ``GpuBackend`` protocol and ``open_gpu_backend(spec)`` (``--gpu``)
- :mod:`.nvml`       NVIDIA GPUs through NVML (nvidia-ml-py)
- :mod:`.sim`        simulated GPUs whose usage comes from process environments
- :mod:`.processes`  OS processes of interest: listeners, pids, create times (psutil)
- :mod:`.probes`     concurrent HTTP health probes over one shared client
- :mod:`.ollama_api` Ollama's HTTP API (loaded models, unloading)
- :mod:`.observer`   all of the above folded into one DESIGN §2 snapshot
"""
