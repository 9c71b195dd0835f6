"""Roofline floor: the least time the cell's device could take to prefill the recomputed tokens.

For ``r`` recomputed tokens after ``c`` cached ones, with ``P`` parameters,
``L`` layers and hidden size ``H``::

    FLOPs  = 2·P·r                          (every weight: one multiply-add per token)
           + 4·L·H · Σ_{p=c+1}^{c+r} p      (causal attention: QKᵀ and A·V, 2·H·p FLOPs each
           = 2·P·r + 4·L·H·r·(c + (r+1)/2)   for a token at position p, in every layer)
    bytes  = P · bytes_per_weight           (the weights read once; KV-cache traffic ignored)
    floor  = max(FLOPs / peak_FLOP/s, bytes / peak_B/s)

``2·P·r`` counts the embedding and output matrices for every token like the
user-facing "2 × params" rule; an engine that computes logits for the last
token only does less, so for models whose embeddings are a large share of P
(the tiny generated ones) the floor is a slight overestimate. Without
``n_layers``/``hidden_size`` the attention term is left out (and the floor
says so). Bytes per weight: f32 4, f16/bf16 2, q8_0 34/32 (32 int8 + one f16
scale per block), q4_0 18/32.

Peaks: GPUs by name from ``GPU_PEAKS`` (dense fp16/bf16 tensor-core FLOP/s,
HBM bandwidth, vendor data sheets). A CPU run (no GPU in the provenance, GPU
layers 0, or a llama.cpp build without CUDA) uses ``provenance.cpu_peak_gflops``
/ ``provenance.cpu_peak_gbps`` when the runner measured them, otherwise an
ESTIMATE from the number of threads the engine used for prompt processing
(``n_threads_batch``, else ``n_threads``, capped at the host's cpus): per core
``CPU_GFLOPS_PER_CORE`` (3.5 GHz × 2 FMA units × 16 fp32 lanes × 2 FLOPs, an
AVX-512 core; half that when the engine reports AVX2 but not AVX-512) and
``CPU_GBPS_PER_CORE`` of memory bandwidth. The estimate errs high (a fast
core), so the floor errs low, as a floor should.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BYTES_PER_WEIGHT = {"f32": 4.0, "fp32": 4.0, "float32": 4.0, "f16": 2.0, "fp16": 2.0, "float16": 2.0,
                    "bf16": 2.0, "bfloat16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
DEFAULT_QUANT = "f16"


@dataclass(frozen=True)
class DevicePeak:
    name: str
    flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    source: str  # "table" | "measured" | "estimate"


#: (pattern on the GPU name, peak); first match wins, so specific names come first.
GPU_PEAKS: list[tuple[str, DevicePeak]] = [
    (r"H200", DevicePeak("H200", 989e12, 4.8e12, "table")),
    (r"H100.*NVL", DevicePeak("H100 NVL", 835e12, 3.9e12, "table")),
    (r"H100.*PCI", DevicePeak("H100 PCIe", 756e12, 2.0e12, "table")),
    (r"H100", DevicePeak("H100 SXM", 989e12, 3.35e12, "table")),
    (r"A100.*40\s*GB", DevicePeak("A100 40GB", 312e12, 1.555e12, "table")),
    (r"A100", DevicePeak("A100 80GB", 312e12, 2.0e12, "table")),
    (r"\bL4\b", DevicePeak("L4", 121e12, 0.3e12, "table")),
]

CPU_GFLOPS_PER_CORE = 3.5 * 2 * 16 * 2  # 224 GFLOP/s: AVX-512, 2 FMA units, 3.5 GHz
CPU_GBPS_PER_CORE = 20.0


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


def gpu_name(cell: dict) -> str | None:
    """The GPU name in the provenance (``gpu.name``, a list of GPUs, a string, or ``host.gpu``)."""
    prov = cell.get("provenance") or {}
    for g in (prov.get("gpu"), prov.get("gpu_name"), (prov.get("host") or {}).get("gpu")
              if isinstance(prov.get("host"), dict) else None):
        if isinstance(g, list) and g:
            g = g[0]
        if isinstance(g, dict):
            g = g.get("name")
        if isinstance(g, str) and g.strip():
            return g.strip()
    return None


def _runtime(cell: dict, key: str):
    rt = cell.get("runtime") or {}
    eff, req = rt.get("effective") or {}, rt.get("requested") or {}
    return eff.get(key, req.get(key))


def runs_on_gpu(cell: dict) -> bool:
    prov = cell.get("provenance") or {}
    if gpu_name(cell) is None:
        return False
    if _runtime(cell, "n_gpu_layers") == 0 or prov.get("build_cuda") is False:
        return False
    return True


def cpu_threads(cell: dict) -> int | None:
    prov = cell.get("provenance") or {}
    host = prov.get("host") if isinstance(prov.get("host"), dict) else {}
    cpus = _num(host.get("cpus"))
    threads = _num(_runtime(cell, "n_threads_batch")) or _num(_runtime(cell, "n_threads"))
    if threads and cpus:
        return int(min(threads, cpus))
    return int(threads or cpus) if (threads or cpus) else None


def device_peak(cell: dict) -> tuple[DevicePeak | None, str]:
    """The cell's device peak, or None and the reason."""
    prov = cell.get("provenance") or {}
    if runs_on_gpu(cell):
        name = gpu_name(cell)
        for pattern, peak in GPU_PEAKS:
            if re.search(pattern, name, re.IGNORECASE):
                return peak, ""
        return None, f"GPU {name!r} is not in the peak table"
    cores = cpu_threads(cell)
    flops, bw = _num(prov.get("cpu_peak_gflops")), _num(prov.get("cpu_peak_gbps"))
    if flops is None and cores is None:
        return None, "no CPU count or measured CPU peak in the provenance"
    lanes = 16
    sysinfo = str(prov.get("system_info") or "")
    if "AVX2 = 1" in sysinfo and "AVX512 = 1" not in sysinfo:
        lanes = 8
    est = flops is None or bw is None
    gflops = flops if flops is not None else cores * CPU_GFLOPS_PER_CORE * lanes / 16
    gbps = bw if bw is not None else (cores or 1) * CPU_GBPS_PER_CORE
    what = f"CPU, {cores} thread{'s' if cores != 1 else ''}" if cores else "CPU"
    return DevicePeak(what, gflops * 1e9, gbps * 1e9, "estimate" if est else "measured"), ""


@dataclass(frozen=True)
class ModelShape:
    params: float
    n_layers: int | None
    hidden_size: int | None
    quant: str
    bytes_per_weight: float
    notes: tuple[str, ...] = ()


def model_shape(cell: dict) -> tuple[ModelShape | None, str]:
    """Parameters, layers, hidden size and weight format of the cell's model, or None and why."""
    model = cell.get("model") or {}
    params = _num(model.get("params"))
    if params is None:
        return None, "model.params not recorded"
    preset = ((cell.get("provenance") or {}).get("model_manifest") or {}).get("preset") or {}
    layers = _num(model.get("n_layers")) or _num(model.get("num_layers")) or _num(preset.get("num_layers"))
    hidden = _num(model.get("hidden_size")) or _num(preset.get("hidden_size"))
    notes = []
    quant = model.get("quant") or model.get("dtype") or _runtime(cell, "dtype")
    if not quant:
        m = re.search(r"(f32|f16|bf16|q8_0|q4_0)", str(model.get("file") or model.get("gguf") or ""), re.IGNORECASE)
        quant = m.group(1) if m else None
    quant = str(quant).lower() if quant else None
    if quant not in BYTES_PER_WEIGHT:
        notes.append(f"weight format {quant or 'unknown'}: assumed {DEFAULT_QUANT}")
        quant = DEFAULT_QUANT
    if not (layers and hidden):
        notes.append("no n_layers/hidden_size: attention FLOPs left out")
    return ModelShape(params, int(layers) if layers else None, int(hidden) if hidden else None,
                      quant, BYTES_PER_WEIGHT[quant], tuple(notes)), ""


def prefill_flops(shape: ModelShape, recomputed: float, cached: float = 0.0) -> tuple[float, float]:
    """(weight FLOPs, attention FLOPs) to prefill ``recomputed`` tokens after ``cached`` ones."""
    r, c = max(0.0, recomputed), max(0.0, cached)
    linear = 2 * shape.params * r
    attn = 0.0
    if shape.n_layers and shape.hidden_size:
        attn = 4 * shape.n_layers * shape.hidden_size * r * (c + (r + 1) / 2)
    return linear, attn


@dataclass(frozen=True)
class Floor:
    device: DevicePeak
    shape: ModelShape
    recomputed: float
    cached: float
    flops: float
    attention_flops: float
    bytes: float
    compute_ms: float
    memory_ms: float
    notes: tuple[str, ...] = field(default=())

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def floor(cell: dict, recomputed: float, cached: float = 0.0) -> tuple[Floor | None, str]:
    """Roofline floor of prefilling ``recomputed`` tokens after ``cached`` on the cell's device."""
    peak, why = device_peak(cell)
    if peak is None:
        return None, why
    shape, why = model_shape(cell)
    if shape is None:
        return None, why
    linear, attn = prefill_flops(shape, recomputed, cached)
    flops = linear + attn
    nbytes = shape.params * shape.bytes_per_weight
    notes = shape.notes + (("device peak estimated from the CPU count",) if peak.source == "estimate" else ())
    return Floor(peak, shape, recomputed, cached, flops, attn, nbytes,
                 flops / peak.flops * 1e3, nbytes / peak.bandwidth * 1e3, notes), ""
