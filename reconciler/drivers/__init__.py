"""Drivers: actuate instances — local processes, Docker containers, adopted Ollama (DESIGN §6)."""

from reconciler.drivers.base import Driver, StartedContainer, StartedProcess, StopResult, Waiter
from reconciler.drivers.docker import DockerDriver
from reconciler.drivers.ollama import OllamaDriver
from reconciler.drivers.process import ProcessDriver, is_alive

__all__ = [
    "DockerDriver",
    "Driver",
    "OllamaDriver",
    "ProcessDriver",
    "StartedContainer",
    "StartedProcess",
    "StopResult",
    "Waiter",
    "is_alive",
]
