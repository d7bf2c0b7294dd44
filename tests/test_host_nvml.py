"""NvmlBackend against a fake pynvml that speaks the same function names."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest

from reconciler.errors import GpuBackendError
from reconciler.host.gpu import NoGpuBackend, open_gpu_backend
from reconciler.host.nvml import NvmlBackend

MIB = 1024 * 1024
LIBRARY_NOT_FOUND, NOT_SUPPORTED, FUNCTION_NOT_FOUND = 12, 3, 13


class FakeNVMLError(Exception):
    def __init__(self, value: int):
        self.value = value
        super().__init__(f"NVML error {value}")


def fake_pynvml(devices, *, versions=("_v3", "_v2", ""), broken=(), memory_v2=True, init_error=None):
    """A pynvml stand-in: ``versions`` exist, ``broken`` ones raise FUNCTION_NOT_FOUND."""
    mod = ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError
    mod.calls = []
    mod.shutdowns = 0

    def init():
        if init_error is not None:
            raise FakeNVMLError(init_error)

    def shutdown():
        mod.shutdowns += 1

    def memory(handle, version=None):
        mod.calls.append(("memory", version))
        if version is not None and not memory_v2:
            raise FakeNVMLError(FUNCTION_NOT_FOUND)
        d = devices[handle]
        return SimpleNamespace(total=d["total"], used=d["used"], free=d["free"])

    def processes_fn(kind, suffix):
        def listing(handle):
            mod.calls.append((kind, suffix))
            if suffix in broken:
                raise FakeNVMLError(FUNCTION_NOT_FOUND)
            entries = devices[handle].get(kind, [])
            if entries == NOT_SUPPORTED:
                raise FakeNVMLError(NOT_SUPPORTED)
            return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in entries]
        return listing

    mod.nvmlInit = init
    mod.nvmlShutdown = shutdown
    mod.nvmlDeviceGetCount = lambda: len(devices)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetUUID = lambda h: devices[h]["uuid"]
    mod.nvmlDeviceGetName = lambda h: devices[h]["name"]
    mod.nvmlDeviceGetMemoryInfo = memory
    if memory_v2 is not None:
        mod.nvmlMemory_v2 = 0x02000028
    for suffix in versions:
        setattr(mod, f"nvmlDeviceGetComputeRunningProcesses{suffix}", processes_fn("compute", suffix))
        setattr(mod, f"nvmlDeviceGetGraphicsRunningProcesses{suffix}", processes_fn("graphics", suffix))
    return mod


def device(uuid="GPU-0", total_mb=8192, used_mb=0, compute=(), graphics=()):
    return {
        "uuid": uuid.encode(),  # older bindings return bytes
        "name": "NVIDIA RTX 4000",
        "total": total_mb * MIB,
        "used": used_mb * MIB,
        "free": (total_mb - used_mb) * MIB,
        "compute": compute if isinstance(compute, int) else list(compute),
        "graphics": list(graphics),
    }


def test_reads_devices_memory_and_processes():
    mod = fake_pynvml([
        device("GPU-a", 8192, 5900, compute=[(4242, 5800 * MIB)]),
        device("GPU-b", 24576, 10, compute=[(7, MIB // 2)], graphics=[(7, MIB), (9, 3 * MIB)]),
    ])
    gpus = NvmlBackend(module=mod).read()
    assert [g.index for g in gpus] == [0, 1]
    assert (gpus[0].uuid, gpus[0].name, gpus[0].total_mb, gpus[0].used_mb, gpus[0].free_mb) == (
        "GPU-a", "NVIDIA RTX 4000", 8192, 5900, 2292,
    )
    assert [(p.pid, p.used_mb) for p in gpus[0].processes] == [(4242, 5800)]
    # compute and graphics entries of one pid are one allocation; half a MiB rounds up
    assert [(p.pid, p.used_mb) for p in gpus[1].processes] == [(7, 1), (9, 3)]
    assert ("memory", mod.nvmlMemory_v2) in mod.calls
    assert ("compute", "_v2") not in mod.calls


def test_falls_back_to_older_process_and_memory_functions():
    mod = fake_pynvml([device(compute=[(1, 100 * MIB)])], broken=("_v3",), memory_v2=False)
    gpus = NvmlBackend(module=mod).read()
    assert [(p.pid, p.used_mb) for p in gpus[0].processes] == [(1, 100)]
    assert mod.calls[:3] == [("memory", mod.nvmlMemory_v2), ("memory", None), ("compute", "_v3")]
    assert ("compute", "_v2") in mod.calls


def test_binding_without_versioned_functions():
    mod = fake_pynvml([device(used_mb=300, compute=[(5, 300 * MIB)])], versions=("",), memory_v2=None)
    gpus = NvmlBackend(module=mod).read()
    assert gpus[0].used_mb == 300 and [p.pid for p in gpus[0].processes] == [5]
    assert mod.calls == [("memory", None), ("compute", ""), ("graphics", "")]


def test_unknown_process_memory_keeps_the_pid():
    gpus = NvmlBackend(module=fake_pynvml([device(compute=[(77, None)])])).read()
    assert [(p.pid, p.used_mb) for p in gpus[0].processes] == [(77, 0)]


def test_unsupported_process_listing_still_reports_memory():
    gpus = NvmlBackend(module=fake_pynvml([device(used_mb=1000, compute=NOT_SUPPORTED)])).read()
    assert gpus[0].used_mb == 1000 and gpus[0].processes == []


def test_every_process_function_failing_is_a_backend_error():
    mod = fake_pynvml([device()], broken=("_v3", "_v2", ""))
    with pytest.raises(GpuBackendError, match="NVML reading failed"):
        NvmlBackend(module=mod).read()


def test_library_missing_is_a_backend_error_not_an_nvml_error():
    with pytest.raises(GpuBackendError, match=r"NVML is not available.*--gpu sim"):
        NvmlBackend(module=fake_pynvml([], init_error=LIBRARY_NOT_FOUND))


def test_bindings_missing_is_a_backend_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml → ImportError
    with pytest.raises(GpuBackendError, match="nvidia-ml-py"):
        NvmlBackend()


def test_reading_failure_is_a_backend_error():
    mod = fake_pynvml([device()])

    def broken_count():
        raise FakeNVMLError(15)  # GPU is lost

    mod.nvmlDeviceGetCount = broken_count
    with pytest.raises(GpuBackendError, match="NVML reading failed: NVML error 15"):
        NvmlBackend(module=mod).read()


def test_close_shuts_nvml_down_once():
    mod = fake_pynvml([device()])
    backend = NvmlBackend(module=mod)
    backend.close()
    backend.close()
    assert mod.shutdowns == 1
    with pytest.raises(GpuBackendError, match="closed"):
        backend.read()


def test_open_nvml_never_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error=LIBRARY_NOT_FOUND))
    with pytest.raises(GpuBackendError):
        open_gpu_backend("nvml")
    auto = open_gpu_backend("auto")
    assert isinstance(auto, NoGpuBackend) and auto.read() == []
    assert "NVML is not available" in auto.reason


def test_open_auto_uses_nvml_when_it_works(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([device("GPU-x")]))
    backend = open_gpu_backend("auto")
    assert backend.name == "nvml" and backend.read()[0].uuid == "GPU-x"


@pytest.mark.parametrize("spec", ["cuda", "sim:lots", "nvml:0", ""])
def test_bad_spec_says_what_to_write(spec):
    with pytest.raises(GpuBackendError, match="sim:8192"):
        open_gpu_backend(spec)
