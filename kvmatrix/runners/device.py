"""GPU state through NVML (ctypes on libnvidia-ml; no extra package), and host facts.

``Nvml.open()`` returns None where there is no NVIDIA driver (CPU hosts), so
callers simply skip device sampling. A sample is taken right after each
timed request, outside the timed region.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time

NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2
NVML_TEMPERATURE_GPU = 0


class Nvml:
    def __init__(self, lib, handle):
        self.lib = lib
        self.handle = handle

    @classmethod
    def open(cls, index: int = 0) -> Nvml | None:
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return None
        if lib.nvmlInit_v2() != 0:
            return None
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
            return None
        return cls(lib, handle)

    def _uint(self, fn, *args) -> int | None:
        out = ctypes.c_uint()
        return out.value if fn(self.handle, *args, ctypes.byref(out)) == 0 else None

    def sample(self) -> dict:
        power = self._uint(self.lib.nvmlDeviceGetPowerUsage)
        return {
            "t": time.time(),
            "sm_clock_mhz": self._uint(self.lib.nvmlDeviceGetClockInfo, NVML_CLOCK_SM),
            "mem_clock_mhz": self._uint(self.lib.nvmlDeviceGetClockInfo, NVML_CLOCK_MEM),
            "power_w": power / 1000.0 if power is not None else None,
            "temp_c": self._uint(self.lib.nvmlDeviceGetTemperature, NVML_TEMPERATURE_GPU),
        }

    def describe(self) -> dict:
        name = ctypes.create_string_buffer(96)
        driver = ctypes.create_string_buffer(96)
        cuda = ctypes.c_int()
        mem = (ctypes.c_ulonglong * 3)()
        info = {}
        if self.lib.nvmlDeviceGetName(self.handle, name, 96) == 0:
            info["name"] = name.value.decode()
        if self.lib.nvmlSystemGetDriverVersion(driver, 96) == 0:
            info["driver"] = driver.value.decode()
        if self.lib.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(cuda)) == 0:
            info["cuda_driver"] = f"{cuda.value // 1000}.{cuda.value % 1000 // 10}"
        if self.lib.nvmlDeviceGetMemoryInfo(self.handle, mem) == 0:
            info["memory_total_mib"] = mem[0] // (1 << 20)
        sm_max = self._uint(self.lib.nvmlDeviceGetMaxClockInfo, NVML_CLOCK_SM)
        if sm_max:
            info["sm_clock_max_mhz"] = sm_max
        return info


def host_facts() -> dict:
    """CPU model and count of the machine the runner runs on."""
    model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"hostname": platform.node(), "cpu": model, "cpus": os.cpu_count(), "machine": platform.machine(),
            "kernel": platform.release()}
