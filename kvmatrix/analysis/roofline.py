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

from kvmatrix.analysis import fmt
from kvmatrix.analysis.load import as_doc
from kvmatrix.runners.document import CellDoc

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


def gpu_name(cell: CellDoc | dict) -> str | None:
    """The GPU name in the provenance (``gpu.name``, a list of GPUs, a string, or ``host.gpu``)."""
    prov = as_doc(cell).provenance
    for g in (prov.gpu, prov.get("gpu_name"), (prov.host or {}).get("gpu")
              if isinstance(prov.host, dict) else None):
        if isinstance(g, list) and g:
            g = g[0]
        if isinstance(g, dict):
            g = g.get("name")
        if isinstance(g, str) and g.strip():
            return g.strip()
    return None


def runs_on_gpu(cell: CellDoc | dict) -> bool:
    cell = as_doc(cell)
    if gpu_name(cell) is None:
        return False
    if cell.runtime.value("n_gpu_layers") == 0 or cell.provenance.build_cuda is False:
        return False
    return True


def cpu_threads(cell: CellDoc | dict) -> int | None:
    cell = as_doc(cell)
    host = cell.provenance.host if isinstance(cell.provenance.host, dict) else {}
    cpus = _num(host.get("cpus"))
    threads = _num(cell.runtime.value("n_threads_batch")) or _num(cell.runtime.value("n_threads"))
    if threads and cpus:
        return int(min(threads, cpus))
    return int(threads or cpus) if (threads or cpus) else None


def device_peak(cell: CellDoc | dict) -> tuple[DevicePeak | None, str]:
    """The cell's device peak, or None and the reason."""
    cell = as_doc(cell)
    prov = cell.provenance
    if runs_on_gpu(cell):
        name = gpu_name(cell)
        for pattern, peak in GPU_PEAKS:
            if re.search(pattern, name, re.IGNORECASE):
                return peak, ""
        return None, f"GPU {name!r} is not in the peak table"
    cores = cpu_threads(cell)
    flops, bw = _num(prov.cpu_peak_gflops), _num(prov.cpu_peak_gbps)
    if flops is None and cores is None:
        return None, "no CPU count or measured CPU peak in the provenance"
    lanes = 16
    sysinfo = str(prov.system_info or "")
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


def model_shape(cell: CellDoc | dict) -> tuple[ModelShape | None, str]:
    """Parameters, layers, hidden size and weight format of the cell's model, or None and why."""
    cell = as_doc(cell)
    model = cell.model
    params = _num(model.params)
    if params is None:
        return None, "model.params not recorded"
    preset = (cell.provenance.model_manifest or {}).get("preset") or {}
    layers = _num(model.n_layers) or _num(model.get("num_layers")) or _num(preset.get("num_layers"))
    hidden = _num(model.hidden_size) or _num(preset.get("hidden_size"))
    notes = []
    quant = model.quant or model.get("dtype") or cell.runtime.value("dtype")
    if not quant:
        m = re.search(r"(f32|f16|bf16|q8_0|q4_0)", str(model.file or model.gguf or ""), re.IGNORECASE)
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


def floor(cell: CellDoc | dict, recomputed: float, cached: float = 0.0) -> tuple[Floor | None, str]:
    """Roofline floor of prefilling ``recomputed`` tokens after ``cached`` on the cell's device."""
    cell = as_doc(cell)
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


def ratio(achieved_ms: float | None, fl: Floor | None) -> float | None:
    """Achieved time / floor; None without either."""
    if achieved_ms is None or fl is None or fl.ms <= 0:
        return None
    return achieved_ms / fl.ms


def floor_text(fl: tuple[Floor | None, str]) -> str:
    """A floor in ms for a table, * when the device peak is an estimate."""
    f = fl[0]
    return fmt.NA if f is None else f"{f.ms:.2f}" + ("*" if f.device.source == "estimate" else "")


# ---------------------------------------------------------------- the report section


SECTION_HEAD = (
    "## Roofline floor\n\n"
    "The least time the cell's device could take to prefill the tokens a query recomputes "
    "(r = prompt − cached tokens, c = cached tokens; medians over the condition's measured trials):\n\n"
    "- FLOPs = 2 · params · r + 4 · n_layers · hidden · r · (c + (r + 1) / 2) — every weight once per token, "
    "plus causal attention (QKᵀ and A·V, 2 · hidden · p FLOPs each for a token at position p, per layer);\n"
    "- bytes = params · bytes per weight (f32 4, f16/bf16 2, q8_0 1.0625, q4_0 0.5625), weights read once, "
    "KV-cache traffic ignored;\n"
    "- floor = max(FLOPs / peak FLOP/s, bytes / peak bandwidth).\n\n"
    "Peaks: GPU by name (dense fp16/bf16 tensor-core peak and HBM bandwidth from the data sheets: "
    + ", ".join(f"{p.name} {p.flops / 1e12:.0f} TFLOP/s, {p.bandwidth / 1e12:.2f} TB/s" for _, p in GPU_PEAKS)
    + "). CPU runs use `provenance.cpu_peak_gflops` / `cpu_peak_gbps` when the runner measured them, else "
    f"an **estimate** (marked *): {CPU_GFLOPS_PER_CORE:.0f} GFLOP/s per prompt-processing thread "
    "(3.5 GHz × 2 FMA × 16 fp32 lanes × 2; half without AVX-512) and "
    f"{CPU_GBPS_PER_CORE:.0f} GB/s per thread. The estimate errs fast, so the floor errs low. "
    "2 · params · r counts the embedding and output matrices for every token, which an engine computing "
    "logits for the last token only does not do: for models whose embeddings are a large share of the "
    "parameters the floor is slightly high.\n\n"
)


def sections(ev, figures) -> list[str]:
    """The "Roofline floor" section: the floor of every invalidation miss, scan point and sweep point."""
    rows, missing, below = [], [], []
    entries = [(r.cell_id, "miss", r.floor, r.summary("miss").median) for r in ev.rows]
    entries += [(p.cell_id, f"scan kept={p.kept}", p.floor, p.summary.median) for p in ev.scan]
    entries += [(p.cell_id, "miss", p.floor, p.summary.median) for p in ev.sweep]
    for cid, cond, (f, why), achieved in entries:
        if f is None:
            missing.append(f"{cid} ({cond}): {why}")
            continue
        dev = f.device
        rows.append({
            "Cell": cid, "Query": cond,
            "Device (peak)": f"{dev.name}{' *' if dev.source == 'estimate' else ''} "
                             f"({dev.flops / 1e12:.3g} TFLOP/s, {dev.bandwidth / 1e9:.4g} GB/s)",
            "Model": f"{fmt.params_text(f.shape.params)} params, {f.shape.quant}",
            "Recomputed / cached (tok)": f"{f.recomputed:.0f} / {f.cached:.0f}",
            "GFLOP (of which attention)": f"{fmt.num(f.flops / 1e9)} ({fmt.num(f.attention_flops / 1e9)})",
            "MB read": fmt.num(f.bytes / 1e6),
            "Compute / memory time (ms)": f"{fmt.num(f.compute_ms)} / {fmt.num(f.memory_ms)}",
            "Floor (ms)": f"{fmt.num(f.ms)} ({f.bound})",
            "Achieved median (ms)": fmt.ms(achieved), "Achieved / floor": fmt.ratio_text(ratio(achieved, f)),
            "Notes": "; ".join(n for n in f.notes if "estimated" not in n) or fmt.NA,
        })
        if (q := ratio(achieved, f)) is not None and q < 1:
            below.append(f"{cid} ({cond})")
    text = SECTION_HEAD + (fmt.table(rows) if rows else "No floor could be computed.")
    if below:
        text += ("\n\n**Faster than the floor** (achieved / floor < 1), so the floor's inputs are wrong for: "
                 + "; ".join(below) + ". Check the model shape and the device peak (an estimated CPU peak "
                 "can be low for a wide-vector or many-core CPU: have the runner record `cpu_peak_gflops`).")
    if missing:
        text += "\n\nNo floor: " + "; ".join(missing) + "."
    return [text]
