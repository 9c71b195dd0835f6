"""Keep the GPU busy during settle pauses (``ExperimentSpec.keep_warm``, CLI ``--keep-warm``).

An idle GPU lowers its clocks within tens of milliseconds; the first request
after a settle pause then runs (partly) at the idle clock and its TTFT is
inflated. With keep-warm the settle pause is spent in a loop of device work
instead of ``time.sleep``: ``cuMemsetD32`` over a small buffer, then
``cuMemcpyDtoD`` of it, then ``cuCtxSynchronize``, until the pause ends. The
loop runs in the calling thread and returns only after its last synchronize,
so nothing of it is in flight when the timed request is sent.

Dependency-free: the CUDA driver API through ctypes on ``libcuda.so.1`` (the
driver's own library, present wherever an NVIDIA GPU runs); the primary
context of device 0 is retained, so an in-process engine on the same device
shares it instead of getting a second context.

On a CPU run (no driver, or the engine offloads no layer) keep-warm is a
documented no-op: the pause stays a plain sleep, because spinning CPU cores
would take them from the engine. ``open_keep_warm`` says why it is inactive.

Measured on an H100 80GB HBM3 (driver 580.159, persistence mode on): with no
CUDA context the SM clock idles at 345-405 MHz; as soon as a process holds a
context (every engine does, and so does keep-warm) it stays at 1980 MHz through
idle pauses of 2 s, so NVML's SM clock shows no drop there, with or without
keep-warm. What keep-warm changed: power during the pause (~120 W asleep vs
~310 W busy) and the first device operation after it (a 64 MiB memset took a
median 85 us after a sleep and 33 us after a keep-warm pause of 50, 500 or
2000 ms) - tens of microseconds against TTFTs of milliseconds. GPUs that lower
clocks within the active state (consumer boards, other drivers) gain more.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

CUDA_SUCCESS = 0
DEFAULT_MIB = 64  # ~20 us per memset on an H100: fine-grained enough to stop on time


class CudaError(RuntimeError):
    pass


@dataclass
class Counters:
    settles: int = 0
    iterations: int = 0
    busy_s: float = 0.0


class CudaKeepWarm:
    """Device work on CUDA device ``index`` for the length of each settle pause."""

    def __init__(self, lib, index: int = 0, mib: int = DEFAULT_MIB):
        self.lib = lib
        self.index = index
        self.nbytes = mib << 20
        self.dev = ctypes.c_int()
        self.ctx = ctypes.c_void_p()
        self.buf = ctypes.c_uint64()
        self.counters = Counters()
        self._check(lib.cuInit(0), "cuInit")
        self._check(lib.cuDeviceGet(ctypes.byref(self.dev), index), "cuDeviceGet")
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), self.dev), "cuDevicePrimaryCtxRetain")
        self._current()
        try:
            self._check(lib.cuMemAlloc_v2(ctypes.byref(self.buf), ctypes.c_size_t(self.nbytes)), "cuMemAlloc")
        except CudaError:
            self._release_ctx()
            raise

    @classmethod
    def open(cls, index: int = 0, mib: int = DEFAULT_MIB) -> CudaKeepWarm:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaError(f"no NVIDIA driver library (libcuda.so.1): {exc}") from None
        return cls(lib, index, mib)

    def _check(self, rc: int, what: str) -> None:
        if rc != CUDA_SUCCESS:
            name = ctypes.c_char_p()
            if hasattr(self.lib, "cuGetErrorName") and self.lib.cuGetErrorName(rc, ctypes.byref(name)) == 0 \
                    and name.value:
                raise CudaError(f"{what} failed: {name.value.decode()} ({rc})")
            raise CudaError(f"{what} failed: CUresult {rc}")

    def _current(self) -> None:
        # contexts are current per thread: the settle may run on another thread than open()
        self._check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def busy_for(self, seconds: float) -> None:
        """Device work until ``seconds`` have passed; returns after the last synchronize."""
        lib, n_words = self.lib, self.nbytes // 8  # memset/copy the buffer's first half
        half = ctypes.c_uint64(self.buf.value + self.nbytes // 2)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        self._current()
        it = 0
        while time.perf_counter() < deadline:
            self._check(lib.cuMemsetD32_v2(self.buf, ctypes.c_uint(it & 0xFFFFFFFF), ctypes.c_size_t(n_words)),
                        "cuMemsetD32")
            self._check(lib.cuMemcpyDtoD_v2(half, self.buf, ctypes.c_size_t(self.nbytes // 2)), "cuMemcpyDtoD")
            self._check(lib.cuCtxSynchronize(), "cuCtxSynchronize")
            it += 1
        self.counters.settles += 1
        self.counters.iterations += it
        self.counters.busy_s += time.perf_counter() - t0

    def describe(self) -> dict:
        return {"method": f"cuMemsetD32 + cuMemcpyDtoD + cuCtxSynchronize loop, CUDA device {self.index}, "
                          f"{self.nbytes >> 20} MiB buffer",
                "settles": self.counters.settles, "iterations": self.counters.iterations,
                "busy_s": round(self.counters.busy_s, 3)}

    def _release_ctx(self) -> None:
        release = getattr(self.lib, "cuDevicePrimaryCtxRelease_v2", None) or self.lib.cuDevicePrimaryCtxRelease
        release(self.dev)

    def close(self) -> None:
        if self.buf.value:
            self._current()
            self.lib.cuMemFree_v2(self.buf)
            self.buf = ctypes.c_uint64()
            self._release_ctx()


@dataclass
class KeepWarmState:
    """What the result records: requested, active, and how (or why not)."""

    requested: bool
    warmer: CudaKeepWarm | None = None
    reason: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.warmer is not None

    def to_dict(self) -> dict:
        d = {"requested": self.requested, "active": self.active}
        if self.warmer is not None:
            d.update(self.warmer.describe())
        if self.reason:
            d["reason"] = self.reason
        return d


def open_keep_warm(requested: bool, n_gpu_layers: int, index: int = 0) -> KeepWarmState:
    """The keep-warm of a cell: active only when requested, the engine offloads layers, and CUDA opens."""
    if not requested:
        return KeepWarmState(False)
    if n_gpu_layers == 0:
        return KeepWarmState(True, reason="engine runs on the CPU (n_gpu_layers=0): settles stay plain sleeps, "
                                          "no cores are taken from the engine")
    try:
        return KeepWarmState(True, CudaKeepWarm.open(index))
    except CudaError as exc:
        return KeepWarmState(True, reason=f"{exc}; settles stay plain sleeps")


def settle(state: KeepWarmState, seconds: float) -> None:
    """The settle pause: device work with an active keep-warm, else a sleep."""
    if seconds <= 0:
        return
    if state.warmer is not None:
        state.warmer.busy_for(seconds)
    else:
        time.sleep(seconds)
