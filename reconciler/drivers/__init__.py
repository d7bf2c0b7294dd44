"""Drivers: actuate instances — local processes, Docker containers, adopted Ollama (DESIGN §6)."""

from reconciler.drivers.base import Driver, StartedContainer, StartedProcess, StopResult, Waiter
from reconciler.drivers.process import ProcessDriver, is_alive

__all__ = [
    "Driver",
    "ProcessDriver",
    "StartedContainer",
    "StartedProcess",
    "StopResult",
    "Waiter",
    "is_alive",
]
