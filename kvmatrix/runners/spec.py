"""The one source of runtime and experiment settings.

``RuntimeSpec`` holds every setting that must be identical across backends;
each adapter renders it to its engine's flags or kwargs and then reads back
what the engine really uses. ``ExperimentSpec`` holds the trial protocol.
``CellSpec`` is what the host hands the runner: one JSON file per cell.
Stdlib only: this module runs inside every backend environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from kvmatrix import catalog


class SpecError(ValueError):
    """Invalid settings; str(e) is a one-line message naming the fix."""


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask: a Slurm task's or a container's share)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    return len(allowed_cpus()) or 1


@dataclass(frozen=True)
class RuntimeSpec:
    """Settings every backend must run with, rendered per engine and verified.

    n_gpu_layers: -1 means "all layers" (resolved against the model's layer
    count when the engine reports it); 0 means CPU only.
    cache_ram_mib: llama-server's host-RAM prompt cache (``--cache-ram``);
    0 = off. Explicit because the server's default (on) turns a miss into a
    partial hit restored from host memory.
    """

    n_ctx: int = 2048
    n_batch: int = 2048
    n_ubatch: int = 512
    n_parallel: int = 1
    n_gpu_layers: int = 0
    flash_attn: bool = False
    cache_ram_mib: int = 0
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    n_threads: int = field(default_factory=default_threads)
    n_threads_batch: int = field(default_factory=default_threads)
    prefix_caching: bool = True
    seed: int = 1234
    temperature: float = 0.0

    def validate(self) -> None:
        if self.n_ctx < 16:
            raise SpecError(f"n_ctx={self.n_ctx} is too small; use at least 16")
        if not 1 <= self.n_ubatch <= self.n_batch:
            raise SpecError(
                f"n_ubatch={self.n_ubatch} must be between 1 and n_batch={self.n_batch}; lower n_ubatch"
            )
        if self.n_parallel < 1:
            raise SpecError(f"n_parallel={self.n_parallel} must be >= 1")
        if self.n_threads < 1 or self.n_threads_batch < 1:
            raise SpecError("n_threads and n_threads_batch must be >= 1")
        if self.cache_type_k not in {"f16", "f32", "q8_0", "bf16"} or self.cache_type_v not in {
            "f16", "f32", "q8_0", "bf16",
        }:
            raise SpecError("cache_type_k/v must be one of f16, f32, bf16, q8_0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RuntimeSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown runtime setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class ABConfig:
    """Sizes in tokens of context A, context B and the question Q."""

    a: int
    b: int
    q: int = 16

    @property
    def label(self) -> str:
        return f"{self.a}/{self.b}"

    @classmethod
    def parse(cls, text: str, q: int = 16) -> ABConfig:
        try:
            a_s, b_s = text.split("/")
            a, b = int(a_s), int(b_s)
        except ValueError:
            raise SpecError(f"malformed config {text!r}; write A/B token sizes such as 512/256") from None
        if a <= 0 or b <= 0:
            raise SpecError(f"config {text!r} needs positive sizes, such as 512/256")
        return cls(a, b, q)


DEFAULT_CONFIGS = (ABConfig(512, 256), ABConfig(384, 384), ABConfig(256, 512))

EXPERIMENT_NAMES = catalog.experiment_names()
#: llama-server rounds each slot's context up to a multiple of this (GGML_PAD(n_ctx / n_parallel, 256)
#: in current builds); slot_eviction asks for a total n_ctx that splits exactly, so requested = effective
SLOT_CTX_ALIGN = 256

# Tokens the chat template and the generated output add around A+B+Q; a
# config must leave this much room in the context.
TEMPLATE_MARGIN = 64
# prefix_reuse: prompt tokens beyond the shared prefix (BOS, "\nQ: <question>\nA:")
PREFIX_QUESTION_MARGIN = 48


@dataclass(frozen=True)
class ExperimentSpec:
    """The trial protocol of one experiment cell."""

    name: str = "invalidation"
    config: ABConfig = ABConfig(512, 256)
    num_trials: int = 10
    warmup_trials: int = 1
    settle_ms: int = 500
    max_output_tokens: int = 50
    seed: int = 1234
    scan_points: tuple[float, ...] | None = None  # recompute_scan: kept fractions of |A|+|B|
    # prefix_reuse (runners/experiments/prefix_reuse.py): shared-prefix regimes in tokens, distinct
    # questions per regime, client concurrency levels, shares of requests reusing the shared prefix,
    # and an optional prompt-set JSONL replacing the generated one
    prefix_regimes: tuple[int, ...] = (384, 1024)
    variants: int = 20
    concurrency: tuple[int, ...] = (1, 16)
    reuse_mixes: tuple[float, ...] = (1.0, 0.5, 0.0)
    prompts_file: str | None = None
    # keep the GPU busy during settle pauses so idle down-clocking does not inflate TTFT
    # (runners/keep_warm.py; a no-op on CPU runs)
    keep_warm: bool = False
    # the timing control: the same query through the backend's reference client, and as token ids
    # (runners/calibration.py); on by default, --no-calibration switches it off
    calibration: bool = True

    def validate(self, runtime: RuntimeSpec) -> None:
        if self.num_trials < 1:
            raise SpecError(f"--trials {self.num_trials}: need at least 1 measured trial")
        if self.warmup_trials < 0 or self.settle_ms < 0:
            raise SpecError("warmup trials and --settle-ms must be >= 0")
        if self.name not in EXPERIMENT_NAMES:
            raise SpecError(f"unknown experiment {self.name!r}; use one of {', '.join(EXPERIMENT_NAMES)}")
        if self.name == "prefix_reuse":
            self._validate_prefix(runtime)
            return
        if self.name == "slot_eviction":
            self._validate_slots(runtime)
            return
        need = self.config.a + self.config.b + self.config.q + self.max_output_tokens + TEMPLATE_MARGIN
        per_slot = runtime.n_ctx // runtime.n_parallel
        if need > per_slot:
            raise SpecError(
                f"config {self.config.label} needs {need} tokens (A+B+Q+{self.max_output_tokens} output"
                f"+{TEMPLATE_MARGIN} template) but the context per slot is {per_slot}; "
                f"use smaller A/B or a larger n_ctx"
            )

    def _validate_slots(self, runtime: RuntimeSpec) -> None:
        """slot_eviction: n_ctx is the TOTAL context that llama-server splits across n_parallel slots;
        [A,B,Q] must fit it whole (one slot), not the per-slot share: not fitting is what it measures."""
        need = self.config.a + self.config.b + self.config.q + TEMPLATE_MARGIN + 1
        if need > runtime.n_ctx:
            raise SpecError(
                f"config {self.config.label} needs {need} tokens (A+B+Q+{TEMPLATE_MARGIN} template+1 output) but the "
                f"total context is {runtime.n_ctx}; slot_eviction needs [A,B,Q] to fit one slot holding the whole "
                "context: use smaller A/B or a larger n_ctx"
            )
        align = SLOT_CTX_ALIGN * runtime.n_parallel
        if runtime.n_ctx % align:
            raise SpecError(
                f"n_ctx={runtime.n_ctx} does not split into {runtime.n_parallel} slots of a multiple of "
                f"{SLOT_CTX_ALIGN} tokens (llama-server rounds each slot's share up); use a multiple of {align}, "
                f"such as {-(-runtime.n_ctx // align) * align}"
            )

    def _validate_prefix(self, runtime: RuntimeSpec) -> None:
        if self.variants < 1:
            raise SpecError(f"--variants {self.variants}: need at least 1 question per prefix regime")
        if not self.concurrency or min(self.concurrency) < 1:
            raise SpecError(f"--concurrency {','.join(map(str, self.concurrency))}: every level must be >= 1")
        if not self.reuse_mixes or any(not 0.0 <= m <= 1.0 for m in self.reuse_mixes):
            raise SpecError("--reuse-mixes: give percentages between 0 and 100, such as 100,50,0")
        if not self.prefix_regimes or min(self.prefix_regimes) < 1:
            raise SpecError("prefix regimes must be positive token counts")
        per_slot = runtime.n_ctx // runtime.n_parallel
        need = max(self.prefix_regimes) + PREFIX_QUESTION_MARGIN + self.max_output_tokens
        if need > per_slot:
            raise SpecError(
                f"a {max(self.prefix_regimes)}-token prefix needs {need} tokens (prefix+{PREFIX_QUESTION_MARGIN} "
                f"question+{self.max_output_tokens} output) but the context per slot is {per_slot}; "
                "use a shorter prefix or a larger --n-ctx"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentSpec:
        data = dict(data)
        data["config"] = ABConfig(**data["config"])
        for key in ("scan_points", "prefix_regimes", "concurrency", "reuse_mixes"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class CellSpec:
    """Everything the runner needs for one cell; serialised as one JSON file."""

    cell_id: str
    run: str
    phase: str
    backend: str
    model: dict
    runtime: RuntimeSpec
    experiment: ExperimentSpec
    out_dir: str
    engine: dict = field(default_factory=dict)  # backend-specific: binary paths, variant, ...
    provenance: dict = field(default_factory=dict)  # host-known facts (build, model, host)

    def to_json(self) -> str:
        d = asdict(self)
        d["runtime"] = self.runtime.to_dict()
        d["experiment"] = self.experiment.to_dict()
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> CellSpec:
        d = json.loads(Path(path).read_text())
        d["runtime"] = RuntimeSpec.from_dict(d["runtime"])
        d["experiment"] = ExperimentSpec.from_dict(d["experiment"])
        return cls(**d)
