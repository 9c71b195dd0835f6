"""The cell document, typed: what the runner writes and what analysis reads (``results.SCHEMA_VERSION``).

Stdlib only (dataclasses). One ``CellDoc`` per ``<cell-id>.json``; the schema itself is described in
``kvmatrix.runners.results``. Reading::

    doc = CellDoc.from_dict(json.loads(path.read_text()))
    doc.experiment, doc.ok, doc.runtime.effective, doc.trials("cache_hit"), doc.trial_blocks()

Writing (the runner, ``run_cell.cell_document`` and ``run_cell._run_on``)::

    doc = CellDoc(cell_id=..., run=..., phase=..., backend=..., label=..., experiment=spec.name,
                  model=Model.from_dict(cell.model), timestamp=..., status="running",
                  config=Config(context_size_a=..., ...), runtime=Runtime(requested=runtime.to_dict()),
                  provenance=Provenance.from_dict({...}))
    doc.runtime.effective = effective                          # filled step by step, as a dict would be
    doc.set_condition("cache_hit", condition_block(trials))   # one {trials[], stats{}} block per condition
    doc.update(result)                                          # the experiment's other keys
    doc.write(out_dir / f"{doc.cell_id}.json")                  # atomic, as results.write_json_atomic

Round trip: ``CellDoc.from_dict(d).to_dict() == d`` for every schema-1 document (tests check every committed
file), in the source's key order, by the rules of ``kvmatrix.runners.record`` (unknown keys kept in each
record's ``extra``, absent keys stay absent, odd shapes written back as they were, keys set later written
after the others in the order they were set, as a dict would). The document adds:

* a top-level ``{trials[], stats{}}`` block (``cache_hit``, ``cache_miss``, slot_eviction's ``other_slot``
  ...) is a ``Condition`` in ``conditions``, written where it was read or set (in a fresh document's
  layout: before ``ttft_degradation_pct``);
* ``_path`` (added by ``results.load_cells``) becomes ``CellDoc.path`` and is never written.

The experiment's name is the document's ``experiment`` field, which the runner writes from the cell spec's
``ExperimentSpec.name``. Only a document without one (written before the field existed, or a hand-made
one) gets a name from ``infer_experiment`` below, the one place that guesses; the guess is never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kvmatrix.runners.record import Record
from kvmatrix.runners.record import record_field as _field
from kvmatrix.runners.results import SCHEMA_VERSION, write_json_atomic

#: the two conditions of the trial protocol; any other top-level trial block is an experiment's own
HIT_MISS = ("cache_hit", "cache_miss")

_NONE = object()


# ---------------------------------------------------------------- the parts of a cell


@dataclass(kw_only=True)
class Model(Record):
    """The generated model the cell ran (``models.store``)."""

    name: str | None = _field()
    quant: str | None = _field()
    params: int | None = _field()
    sha256: str | None = _field()
    gguf: str | None = _field(optional=True)
    hf_dir: str | None = _field(optional=True)
    file: str | None = _field(optional=True)
    n_layers: int | None = _field(optional=True)
    hidden_size: int | None = _field(optional=True)

    @property
    def title(self) -> str | None:
        """``name`` or ``name/quant``; None without a name."""
        return self.name and f"{self.name}{'/' + self.quant if self.quant else ''}"


@dataclass(kw_only=True)
class Config(Record):
    """The A/B/Q config and the trial counts (``ExperimentSpec``)."""

    context_size_a: int | None = _field()
    context_size_b: int | None = _field()
    query_tokens: int | None = _field()
    max_output_tokens: int | None = _field()
    num_trials: int | None = _field()
    warmup_trials: int | None = _field()
    settle_ms: float | None = _field()
    keep_warm: bool | None = _field(optional=True)


@dataclass(kw_only=True)
class Runtime(Record):
    """Settings: requested (``RuntimeSpec.to_dict()``), what the engine reported, and what differs."""

    requested: dict = _field("dict")
    effective: dict = _field("dict")
    mismatches: list = _field("list")
    unverified: list = _field("list")
    rendered: dict | None = _field(optional=True)  # the adapter's argv / kwargs / env
    release_gaps: dict | None = _field(optional=True)  # what the release lacks -> what kvmatrix does instead
    accepted_deviations: dict | list | None = _field(optional=True)

    def value(self, key: str):
        """The effective value of a setting, else the requested one."""
        return self.effective.get(key, self.requested.get(key))


@dataclass(kw_only=True)
class Provenance(Record):
    """Where the numbers come from; engine-specific keys beyond these stay in ``extra``."""

    runtime_kind: str | None = _field(optional=True)  # "host" | "docker"
    host: Any = _field(optional=True)
    gpu: Any = _field(optional=True)
    engine_version: str | None = _field(optional=True)
    llama_cpp_commit: str | None = _field(optional=True)
    llama_cpp_python_version: str | None = _field(optional=True)
    llama_cpp_source: str | None = _field(optional=True)
    engine_build_info: str | None = _field(optional=True)
    build_variant: str | None = _field(optional=True)
    build_flags: Any = _field(optional=True)
    build_cuda: bool | None = _field(optional=True)
    system_info: str | None = _field(optional=True)
    vllm_version: str | None = _field(optional=True)
    vllm_flag_table_row: str | None = _field(optional=True)
    container: dict | None = _field(optional=True)
    runner_git: dict | None = _field(optional=True)
    model_manifest: dict | None = _field(optional=True)
    cpu_peak_gflops: float | None = _field(optional=True)
    cpu_peak_gbps: float | None = _field(optional=True)


@dataclass(kw_only=True)
class Timing(Record):
    engine_start_s: float | None = _field(optional=True)
    engine_starts: dict | None = _field(optional=True)  # group[], index, starts_in_group, reused, ...
    cell_wall_s: float | None = _field(optional=True)


@dataclass(kw_only=True)
class Condition(Record):
    """One ``{trials[], stats{}}`` block: a condition's trials (``results.Trial`` as dicts, warm-ups included)
    and the runner's summary statistics over its measured trials (``results.condition_block``)."""

    trials: list = _field("list")
    stats: dict = _field("dict")

    @property
    def warmups(self) -> int:
        return sum(1 for t in self.trials if isinstance(t, dict) and t.get("warmup"))

    @property
    def empty(self) -> bool:
        """The block is ``{}``."""
        return not self.to_dict()


def measured(trials: list) -> list[dict]:
    """The trials that count (warm-up trials excluded)."""
    return [t for t in trials if isinstance(t, dict) and not t.get("warmup")]


@dataclass(kw_only=True)
class Calibration(Record):
    """The timing control (runners/calibration.py)."""

    enabled: bool | None = _field()
    reference_client: str | None = _field(optional=True)
    token_id_path: bool | None = _field(optional=True)
    method: str | None = _field(optional=True)
    reason: str | None = _field(optional=True)
    conditions: dict | None = _field(optional=True)


@dataclass(kw_only=True)
class KeepWarm(Record):
    requested: bool | None = _field()
    active: bool | None = _field()
    method: str | None = _field(optional=True)
    reason: str | None = _field(optional=True)
    settles: int | None = _field(optional=True)
    iterations: int | None = _field(optional=True)
    busy_s: float | None = _field(optional=True)


@dataclass(kw_only=True)
class Workload(Record):
    a_tokens: int | None = _field(optional=True)
    b_tokens: int | None = _field(optional=True)
    q_tokens: int | None = _field(optional=True)
    seed: int | None = _field(optional=True)
    kept_counts: list | None = _field(optional=True)
    words: Any = _field(optional=True)
    q_text: str | None = _field(optional=True)


# ---------------------------------------------------------------- what one experiment adds


@dataclass(kw_only=True)
class ScanPoint(Record):
    """recompute_scan: one kept/recomputed split."""

    kept_tokens: int | None = _field()
    recomputed_tokens: int | None = _field()
    trials: list = _field("list")
    stats: dict = _field("dict")


@dataclass(kw_only=True)
class Sweep(Record):
    """batch_sweep: the n_batch / n_ubatch of the cell."""

    n_batch: int | None = _field()
    n_ubatch: int | None = _field()


@dataclass(kw_only=True)
class Slots(Record):
    """slot_eviction: the requested slot count and total context."""

    n_parallel: int | None = _field()
    n_ctx_total: int | None = _field()


@dataclass(kw_only=True)
class SlotEviction(Record):
    """slot_eviction: per-slot context read back, prompt sizes, what fits, conditions, refusals."""

    n_parallel: int | None = _field()
    slot_ctx: list = _field("list")
    prompts: dict = _field("dict")
    fits: dict = _field("dict")
    conditions: dict = _field("dict")
    refused: list = _field("list")
    slots_at_end: list | None = _field(optional=True)


@dataclass(kw_only=True)
class Prefix(Record):
    """prefix_reuse: the benchmark's settings."""

    mode: str | None = _field()  # "no_prefix_cache" | "with_prefix_cache"
    prefix_caching: bool | None = _field(optional=True)
    cache_granularity: int | None = _field(optional=True)
    max_output_tokens: int | None = _field(optional=True)
    regimes: list | None = _field(optional=True)
    concurrency: list | None = _field(optional=True)
    reuse_mixes: list | None = _field(optional=True)
    variants: int | None = _field(optional=True)


@dataclass(kw_only=True)
class PromptSet(Record):
    path: str | None = _field()
    sha256: str | None = _field(optional=True)
    source: str | None = _field(optional=True)
    lines: int | None = _field(optional=True)


@dataclass(kw_only=True)
class HostLoad(Record):
    """prefix_reuse: the host's load while the cell ran (client and server share it)."""

    cpus: int | None = _field(optional=True)
    loadavg_1m_start: float | None = _field(optional=True)
    loadavg_1m_end: float | None = _field(optional=True)


@dataclass(kw_only=True)
class Memory(Record):
    """prefix_reuse: the server's memory read-outs after the start and after the runs."""

    after_start: dict = _field("dict")
    after_runs: dict = _field("dict")


# ---------------------------------------------------------------- the cell


@dataclass(kw_only=True)
class CellDoc(Record):
    """One cell's result. Fields are declared in the order the runner writes them."""

    schema_version: int = _field(default=SCHEMA_VERSION)
    cell_id: str | None = _field()
    run: str | None = _field()
    phase: str | None = _field()  # the interface's id (kvmatrix.catalog): 1, 2, 3a, 3b, 1t, 3t
    backend: str | None = _field()  # the adapter's registry name
    label: str | None = _field()  # how the report names the series (backend[/variant][ [build]][ @tag])
    experiment: str | None = _field()  # the catalogue's experiment name (ExperimentSpec.name)
    model: Model = _field(Model)
    timestamp: str | None = _field()
    status: str | None = _field()  # "ok" | "failed" | "running" (only while it runs)
    error: str | None = _field()
    config: Config = _field(Config)
    runtime: Runtime = _field(Runtime)
    provenance: Provenance = _field(Provenance)
    timing: Timing = _field(Timing)
    #: optional: not in the files written so far; for a runner that records what it was handed
    experiment_spec: dict | None = _field(optional=True)  # ExperimentSpec.to_dict()
    engine: dict | None = _field(optional=True)  # CellSpec.engine (label, variant, python, vllm{...})
    sweep: Sweep | None = _field(Sweep, optional=True)
    slots: Slots | None = _field(Slots, optional=True)
    log_file: str | None = _field(optional=True)
    log_tail: str | None = _field(optional=True)
    traceback: str | None = _field(optional=True)
    # (the conditions' {trials[], stats{}} blocks are written here)
    ttft_degradation_pct: float | None = _field(optional=True)
    order: list | None = _field(optional=True)  # run order: "cache_hit:3w" = trial 3 of cache_hit, warm-up
    scan: list | None = _field(("records", ScanPoint), optional=True)
    slot_eviction: SlotEviction | None = _field(SlotEviction, optional=True)
    workload: Workload | None = _field(Workload, optional=True)
    keep_warm: KeepWarm | None = _field(KeepWarm, optional=True)
    calibration: Calibration | None = _field(Calibration, optional=True)
    device_settle: Any = _field(optional=True)
    requests: list | None = _field(optional=True)  # prefix_reuse: one row per timed request
    warmups: list | None = _field(optional=True)
    groups: list | None = _field(optional=True)
    memory: Memory | None = _field(Memory, optional=True)
    host_load: HostLoad | None = _field(HostLoad, optional=True)
    prefix: Prefix | None = _field(Prefix, optional=True)
    prompt_set: PromptSet | None = _field(PromptSet, optional=True)
    #: every top-level {trials[], stats{}} block, by condition name, in the order written
    conditions: dict[str, Condition] = field(default_factory=dict, metadata={"local": True})
    #: the file it was read from (``_path`` of results.load_cells); never written
    path: str | None = field(default=None, compare=False, metadata={"local": True})
    _experiment_raw: Any = field(default=_NONE, repr=False, compare=False, metadata={"local": True})

    LOCAL: ClassVar[frozenset[str]] = Record.LOCAL | {"conditions", "path", "_experiment_raw"}

    @classmethod
    def from_dict(cls, d: dict) -> CellDoc:
        d = dict(d)
        path = d.pop("_path", None)
        doc = super().from_dict(d)
        object.__setattr__(doc, "path", path)
        if not (isinstance(doc.experiment, str) and doc.experiment):  # no name: the one guess, never written
            object.__setattr__(doc, "_experiment_raw", doc.experiment)
            object.__setattr__(doc, "experiment", infer_experiment(d))
        return doc

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "experiment" and self.__dict__.get("_ready"):  # assigned: no longer the guess
            object.__setattr__(self, "_experiment_raw", _NONE)

    @property
    def experiment_guessed(self) -> bool:
        """True when the document names no experiment and ``experiment`` is ``infer_experiment``'s guess."""
        return self._experiment_raw is not _NONE

    def _put_other(self, key: str, value) -> None:
        if is_condition(key, value):
            self.conditions[key] = Condition.from_dict(value)
        else:
            self.extra[key] = value

    def set_condition(self, name: str, block: dict | Condition) -> Condition:
        """Add (or replace) a condition's {trials[], stats{}} block, e.g. ``results.condition_block(trials)``."""
        if name in self.keys():
            raise ValueError(f"{name!r} is a document field, not a condition name")
        cond = block if isinstance(block, Condition) else Condition.from_dict(block)
        self.conditions[name] = cond
        self._mark(name)  # a new condition is written after the keys the document has
        return cond

    def _items(self) -> list[tuple[str, Any]]:
        items = super()._items()
        if self.experiment_guessed:  # write back what the source had (absent: nothing, as _absent says)
            items = [(k, self._experiment_raw if k == "experiment" else v) for k, v in items]
        conds = [(k, c.to_dict()) for k, c in self.conditions.items()]  # written before ttft_degradation_pct
        after = self.keys()[self.keys().index("ttft_degradation_pct"):]
        at = next((i for i, (k, _) in enumerate(items) if k in after), len(items))
        return items[:at] + conds + items[at:]

    def write(self, path: str | Path) -> Path:
        """Write the document atomically (results.write_json_atomic)."""
        return write_json_atomic(path, self.to_dict())

    # ---------------------------------------------------------------- reading

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __contains__(self, key: str) -> bool:
        return key in self.conditions or super().__contains__(key)

    def condition(self, name: str) -> Condition | None:
        return self.conditions.get(name)

    def has_condition(self, name: str) -> bool:
        """Whether the cell has a non-empty block of condition ``name``."""
        c = self.conditions.get(name)
        return c is not None and not c.empty

    def trials(self, name: str) -> list[dict]:
        """The trials of condition ``name`` (warm-ups included); [] when the cell has none."""
        c = self.conditions.get(name)
        return c.trials if c is not None else []

    def stats(self, name: str) -> dict:
        """The runner's stats{} of condition ``name``; {} when the cell has none."""
        c = self.conditions.get(name)
        return c.stats if c is not None else {}

    def trial_blocks(self) -> list[tuple[str, list[dict]]]:
        """(condition name, trials) of every trial block, whatever the experiment: hit and miss first, then
        the other conditions (slot_eviction's) in the order written, then the recompute scan's points."""
        out = [(k, self.conditions[k].trials) for k in HIT_MISS if self.has_condition(k)]
        out += [(k, c.trials) for k, c in self.conditions.items() if k not in HIT_MISS]
        for p in self.scan or []:
            if isinstance(p, ScanPoint):
                out.append((f"scan kept={p.kept_tokens}", p.trials))
        return out

    @property
    def series_label(self) -> str:
        """``label``, else the backend, else "?"."""
        return str(self.label or self.backend or "?")


def is_condition(key: str, value) -> bool:
    """A top-level key that holds a condition's trials: cache_hit / cache_miss (any object), or another
    object with a ``trials`` list and a ``stats`` object."""
    if not isinstance(value, dict):
        return False
    return key in HIT_MISS or (isinstance(value.get("trials"), list) and isinstance(value.get("stats"), dict))


def infer_experiment(d: dict) -> str:
    """The experiment of a document that does not name one, from the blocks only one experiment writes.

    The ONE place that guesses: documents written by the runner carry ``experiment`` (ExperimentSpec.name).
    """
    if "scan" in d:
        return "recompute_scan"
    if "sweep" in d:
        return "batch_sweep"
    if "slot_eviction" in d:
        return "slot_eviction"
    return "invalidation"

