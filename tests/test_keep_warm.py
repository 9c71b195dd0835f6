"""Keep-warm (runners/keep_warm.py): when it is active, what the settle loop asks of the CUDA driver, cleanup.

The driver is replaced by a recorder of the driver-API calls (the pure logic:
call order, stop at the deadline, counters, error paths). That the loop keeps
a real GPU busy was checked on an H100 (see the module docstring); on the CPU
test machines keep-warm must be, and is, a no-op.
"""

from __future__ import annotations

import ctypes
import time

import pytest

from kvmatrix.runners import keep_warm as kwm


class FakeDriver:
    """Records driver-API calls; fills out-parameters like libcuda; fails the calls named in ``fail``."""

    def __init__(self, fail: dict[str, int] | None = None):
        self.calls: list[str] = []
        self.fail = fail or {}
        self.freed: list[int] = []

    def _rc(self, name: str) -> int:
        self.calls.append(name)
        return self.fail.get(name, 0)

    def cuInit(self, flags):
        return self._rc("cuInit")

    def cuDeviceGet(self, dev, index):
        dev._obj.value = index
        return self._rc("cuDeviceGet")

    def cuDevicePrimaryCtxRetain(self, ctx, dev):
        ctx._obj.value = 0xC0
        return self._rc("cuDevicePrimaryCtxRetain")

    def cuDevicePrimaryCtxRelease_v2(self, dev):
        return self._rc("cuDevicePrimaryCtxRelease")

    def cuCtxSetCurrent(self, ctx):
        return self._rc("cuCtxSetCurrent")

    def cuMemAlloc_v2(self, ptr, size):
        ptr._obj.value = 0x1000
        return self._rc("cuMemAlloc")

    def cuMemFree_v2(self, ptr):
        self.freed.append(ptr.value)
        return self._rc("cuMemFree")

    def cuMemsetD32_v2(self, ptr, value, n):
        return self._rc("cuMemsetD32")

    def cuMemcpyDtoD_v2(self, dst, src, n):
        return self._rc("cuMemcpyDtoD")

    def cuCtxSynchronize(self):
        time.sleep(0.001)  # a real synchronize waits for the device work
        return self._rc("cuCtxSynchronize")

    def cuGetErrorName(self, rc, out):
        out._obj.value = b"CUDA_ERROR_OUT_OF_MEMORY"
        return 0


def test_not_requested_or_cpu_engine_is_inactive_and_says_why():
    assert kwm.open_keep_warm(False, -1).to_dict() == {"requested": False, "active": False}
    cpu = kwm.open_keep_warm(True, 0)
    assert not cpu.active and cpu.to_dict()["requested"] is True
    assert "n_gpu_layers=0" in cpu.reason and "plain sleeps" in cpu.reason


def test_without_a_driver_keep_warm_is_a_noop():
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has an NVIDIA driver")
    except OSError:
        pass
    state = kwm.open_keep_warm(True, -1)
    assert not state.active and "libcuda.so.1" in state.reason
    kwm.settle(state, 0.01)  # a plain sleep: nothing to call, nothing raised
    assert state.to_dict()["active"] is False


def test_settle_loop_does_device_work_until_the_deadline_and_ends_synchronized():
    drv = FakeDriver()
    warm = kwm.CudaKeepWarm(drv, index=0, mib=2)
    assert drv.calls == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "cuMemAlloc"]
    drv.calls.clear()
    state = kwm.KeepWarmState(True, warm)
    kwm.settle(state, 0.03)
    loop = drv.calls[1:]
    assert drv.calls[0] == "cuCtxSetCurrent"  # current in the settling thread
    assert loop and len(loop) % 3 == 0 and loop[-1] == "cuCtxSynchronize"  # nothing in flight afterwards
    assert loop[:3] == ["cuMemsetD32", "cuMemcpyDtoD", "cuCtxSynchronize"]
    d = state.to_dict()
    assert d["active"] and d["settles"] == 1 and d["iterations"] == len(loop) // 3
    assert "CUDA device 0, 2 MiB" in d["method"]
    kwm.settle(state, 0)  # no pause, no device work
    assert state.to_dict()["settles"] == 1
    warm.close()
    assert drv.freed == [0x1000] and drv.calls[-1] == "cuDevicePrimaryCtxRelease"
    warm.close()  # idempotent
    assert drv.freed == [0x1000]


def test_a_failed_allocation_releases_the_context_and_names_the_error():
    drv = FakeDriver(fail={"cuMemAlloc": 2})
    with pytest.raises(kwm.CudaError, match="cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY"):
        kwm.CudaKeepWarm(drv)
    assert drv.calls[-1] == "cuDevicePrimaryCtxRelease"


def test_a_failing_loop_call_raises_instead_of_sleeping_silently():
    drv = FakeDriver()
    warm = kwm.CudaKeepWarm(drv)
    drv.fail["cuMemcpyDtoD"] = 700
    with pytest.raises(kwm.CudaError, match="cuMemcpyDtoD failed"):
        warm.busy_for(0.01)
