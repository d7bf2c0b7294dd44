"""Programs and helpers for demos and end-to-end tests (stdlib only, fast start-up).

- ``python -m reconciler.testing.service``     a configurable fake GPU service
- ``python -m reconciler.testing.fake_ollama`` enough of Ollama's API to adopt and evict
- :mod:`.ports`                                 free ports, spawning, waiting, cleanup
- ``python -m reconciler.testing.llama``       llama.cpp's llama-server, built once into a cache, and tiny
                                                GGUF models for it (the models need the gguf test extra)
"""
