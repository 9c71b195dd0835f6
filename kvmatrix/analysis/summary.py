"""Pure summaries of result cells, per experiment, plus settings parity and provenance.

Input is the list of cell documents from ``load_dirs`` (``kvmatrix.runners.results.load_cells``
without duplicates). Nothing here draws or writes; ``report`` and ``figures``
consume these values through ``build_evidence``.

- invalidation cells -> ``Row`` (hit vs miss, bootstrap CIs, Mann-Whitney U, roofline floor)
- recompute_scan cells -> ``ScanPoint`` per kept/recomputed split
- batch_sweep cells -> ``SweepPoint`` per (backend, n_batch)
- slot_eviction cells -> ``SlotRow`` per slot count (per-slot context, fits, conditions)
- every trial -> ``TrialPoint`` (recomputed tokens vs TTFT), outliers, device state;
  invalidation order -> warm-up ``Cascade``
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from kvmatrix.analysis import roofline
from kvmatrix.analysis.stats import Comparison, Summary, compare, summarize, tukey
from kvmatrix.runners.results import STAT_FIELDS, describe, load_cells

CONDITION_NAMES = {"cache_hit": "hit", "cache_miss": "miss"}


@dataclass
class Row:
    """One ok invalidation cell as the report and the figures see it."""

    cell_id: str
    phase: str
    series: str  # backend label, unique per (phase, config)
    a: int | None
    b: int | None
    hit: dict  # the condition's stats{} (see condition_stats)
    miss: dict
    degradation_pct: float | None  # as recorded: (mean miss - mean hit) / mean hit
    max_output_tokens: int | None = None
    unverified: int = 0  # measured trials with cache_verified false
    warmups: tuple[int, int] = (0, 0)  # warm-up trials (hit, miss)
    trials: dict[str, list[dict]] = field(default_factory=dict, repr=False)  # "hit"/"miss" -> measured trials
    cell: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def config(self) -> str:
        return f"{_s(self.a)}/{_s(self.b)}"

    @property
    def name(self) -> str:
        """Phase and backend label, as figures name a series."""
        return f"{self.phase} {self.series}"

    @property
    def order(self) -> list[str]:
        return list(self.cell.get("order") or [])

    def values(self, cond: str, metric: str = "ttft_ms") -> list:
        return [t.get(metric) for t in self.trials.get(cond, [])]

    def summary(self, cond: str, metric: str = "ttft_ms") -> Summary:
        """Summary (median with bootstrap CI, ...) of a metric over the measured trials of hit/miss."""
        key = ("summary", cond, metric)
        if key not in self._memo:
            self._memo[key] = summarize(self.values(cond, metric))
        return self._memo[key]

    def comparison(self, metric: str = "ttft_ms") -> Comparison:
        """Miss versus hit: difference of medians, relative change, Mann-Whitney U."""
        key = ("compare", metric)
        if key not in self._memo:
            self._memo[key] = compare(self.values("hit", metric), self.values("miss", metric))
        return self._memo[key]

    @property
    def floor(self) -> tuple[roofline.Floor | None, str]:
        """Roofline floor of the miss's recomputed tokens (medians over the measured miss trials)."""
        if "floor" not in self._memo:
            self._memo["floor"] = condition_floor(self.cell, self.trials.get("miss", []))
        return self._memo["floor"]

    @property
    def floor_ratio(self) -> float | None:
        """Miss TTFT median / roofline floor."""
        return ratio(self.summary("miss").median, self.floor[0])


def ratio(achieved_ms: float | None, fl: roofline.Floor | None) -> float | None:
    if achieved_ms is None or fl is None or fl.ms <= 0:
        return None
    return achieved_ms / fl.ms


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def trial_tokens(t: dict, allow_expected: bool = True) -> tuple[int, int] | None:
    """(recomputed, cached) tokens of a timed query: prompt - cached.

    The engine's cached count; with ``allow_expected`` the expected count when the
    engine reported none. None when the prompt size or both counts are missing.
    """
    prompt = t.get("prompt_tokens")
    cached = t.get("cached_tokens")
    if cached is None and allow_expected:
        cached = t.get("expected_cached_tokens")
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt <= 0 or not isinstance(cached, int):
        return None
    return max(0, prompt - cached), cached


def condition_floor(cell: dict, trials: list[dict]) -> tuple[roofline.Floor | None, str]:
    """Roofline floor for the median recomputed/cached tokens of ``trials``."""
    toks = [tt for t in trials if (tt := trial_tokens(t)) is not None]
    if not toks:
        return None, "no prompt/cached token counts"
    return roofline.floor(cell, _median([r for r, _ in toks]), _median([c for _, c in toks]))


@dataclass
class Unverified:
    """One measured trial whose cached-token count did not check out."""

    cell_id: str
    condition: str  # "cache_hit" | "cache_miss"
    trial: int
    cached_tokens: int | None
    expected_cached_tokens: int | None
    cache_granularity: int | None = None


@dataclass
class Parity:
    """Effective settings that differ across ok cells, and requested-vs-effective mismatches."""

    keys: list[str] = field(default_factory=list)  # differing keys, sorted
    table: dict[str, dict] = field(default_factory=dict)  # cell_id -> {key: value}
    compared: int = 0  # keys reported by at least two cells
    mismatches: list[tuple[str, str]] = field(default_factory=list)  # (cell_id, text)


def _s(v) -> str:
    return "?" if v is None else str(v)


def finite(v) -> float | None:
    """v when it is a finite number, else None."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def is_ok(cell: dict) -> bool:
    return cell.get("status") == "ok"


def phase_key(phase) -> tuple:
    """Sort "1" < "2" < "3a" < "3b" < "10"; unknown phases last."""
    m = re.fullmatch(r"(\d+)(.*)", str(phase or ""))
    return (int(m.group(1)), m.group(2)) if m else (math.inf, str(phase))


def config_key(a: int | None, b: int | None) -> tuple:
    """Largest context A first, as the default configs run (512/256, 384/384, 256/512)."""
    return (-(a or 0), b or 0)


def stat(stats: dict, metric: str, key: str = "median") -> float | None:
    """One summary value of a condition's stats, or None when absent or not finite."""
    return finite((stats.get(metric) or {}).get(key))


def _stats(cell: dict, condition: str) -> dict:
    return (cell.get(condition) or {}).get("stats") or {}


def _trials(cell: dict, condition: str) -> list[dict]:
    return (cell.get(condition) or {}).get("trials") or []


def _base_label(cell: dict) -> str:
    return str(cell.get("label") or cell.get("backend") or "?")


def series_labels(cells: list[dict]) -> dict[int, str]:
    """Row label per cell (by index): ``label`` or backend, disambiguated when two
    cells of one phase and config would share it (by run, else by cell id)."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cells):
        cfg = c.get("config") or {}
        key = (c.get("phase"), _base_label(c), cfg.get("context_size_a"), cfg.get("context_size_b"))
        groups.setdefault(key, []).append(i)
    labels = {}
    for idxs in groups.values():
        runs = {cells[i].get("run") for i in idxs}
        for i in idxs:
            base = _base_label(cells[i])
            if len(idxs) == 1:
                labels[i] = base
            elif len(runs) == len(idxs):
                labels[i] = f"{base} ({cells[i].get('run')})"
            else:
                labels[i] = f"{base} [{cells[i].get('cell_id')}]"
    return labels


def unverified_trials(cell: dict) -> list[Unverified]:
    """Measured (non-warm-up) trials of a cell, any experiment, with cache_verified false."""
    out = []
    for cond, trials in trial_blocks(cell):
        for t in measured(trials):
            if not t.get("cache_verified", False):
                out.append(Unverified(
                    cell_id=str(cell.get("cell_id")), condition=cond, trial=t.get("trial"),
                    cached_tokens=t.get("cached_tokens"),
                    expected_cached_tokens=t.get("expected_cached_tokens"),
                    cache_granularity=t.get("cache_granularity"),
                ))
    return out


def verified_count(cell: dict) -> tuple[int, int]:
    """(verified, measured) trials over all of a cell's blocks."""
    ts = [t for _, trials in trial_blocks(cell) for t in measured(trials)]
    return sum(1 for t in ts if t.get("cache_verified")), len(ts)


def _warmups(cell: dict, condition: str) -> int:
    return sum(1 for t in _trials(cell, condition) if t.get("warmup"))


def build_rows(cells: list[dict]) -> list[Row]:
    """Rows for the ok invalidation cells, ordered by phase, backend label, then config."""
    ok = [c for c in cells if is_ok(c) and experiment_of(c) == "invalidation"]
    labels = series_labels(ok)
    rows = []
    for i, c in enumerate(ok):
        cfg = c.get("config") or {}
        rows.append(Row(
            cell_id=str(c.get("cell_id")), phase=str(c.get("phase") or "?"), series=labels[i],
            a=cfg.get("context_size_a"), b=cfg.get("context_size_b"),
            hit=condition_stats(c, "cache_hit"), miss=condition_stats(c, "cache_miss"),
            degradation_pct=finite(c.get("ttft_degradation_pct")),
            max_output_tokens=cfg.get("max_output_tokens"),
            unverified=len(unverified_trials(c)),
            warmups=(_warmups(c, "cache_hit"), _warmups(c, "cache_miss")),
            trials={CONDITION_NAMES[k]: measured(_trials(c, k)) for k in CONDITION_NAMES},
            cell=c,
        ))
    rows.sort(key=lambda r: (phase_key(r.phase), r.series, config_key(r.a, r.b)))
    return rows


def condition_stats(cell: dict, condition: str) -> dict:
    """The condition's stats{}: recomputed from its measured trials where it has any (the runner's
    ``describe`` on the same values), the recorded stats otherwise; counts as recorded."""
    out = dict(_stats(cell, condition))
    ms = measured(_trials(cell, condition))
    if ms:
        for f in STAT_FIELDS:
            out[f] = describe([t.get(f) for t in ms])
    return out


def measured(trials: list[dict]) -> list[dict]:
    """The trials that count (warm-up trials excluded)."""
    return [t for t in trials if isinstance(t, dict) and not t.get("warmup")]


def experiment_of(cell: dict) -> str:
    """The cell's experiment: its ``experiment`` field, else inferred from its blocks."""
    exp = cell.get("experiment")
    if exp:
        return str(exp)
    if "scan" in cell:
        return "recompute_scan"
    if "sweep" in cell:
        return "batch_sweep"
    if "slot_eviction" in cell:
        return "slot_eviction"
    return "invalidation"


def trial_blocks(cell: dict) -> list[tuple[str, list[dict]]]:
    """(condition name, trials) of every trial block in a cell, whatever the experiment: hit and
    miss first, then any other top-level ``{trials[], stats{}}`` block (slot_eviction's conditions),
    then the recompute scan's points."""
    out = [(cond, _trials(cell, cond)) for cond in CONDITION_NAMES if cell.get(cond)]
    out += [(k, v["trials"]) for k, v in cell.items()
            if k not in CONDITION_NAMES and isinstance(v, dict) and isinstance(v.get("trials"), list)
            and isinstance(v.get("stats"), dict)]
    for p in cell.get("scan") or []:
        if isinstance(p, dict):
            out.append((f"scan kept={p.get('kept_tokens')}", p.get("trials") or []))
    return out


class NoCellsError(ValueError):
    """No result cell JSON in the given folders; str(e) is the one-line message."""


def load_required(dirs: list[str | Path]) -> list[dict]:
    """``load_dirs``, raising NoCellsError (one line) when there is no cell at all."""
    cells = load_dirs(dirs)
    if not cells:
        shown = " ".join(str(d) for d in dirs) or "."
        raise NoCellsError(
            f"no result cells in {shown}; run nox -s phase3a first or pass the folder that holds the *.json"
        )
    return cells


def load_dirs(dirs: list[str | Path]) -> list[dict]:
    """Cells of all folders, each file once even if a folder is named twice."""
    seen, cells = set(), []
    for cell in load_cells([Path(d) for d in dirs]):
        key = str(Path(cell["_path"]).resolve())
        if key not in seen:
            seen.add(key)
            cells.append(cell)
    return cells


# ---------------------------------------------------------------- series names


def _model_name(c: dict) -> str | None:
    m = c.get("model") or {}
    return m.get("name") and f"{m.get('name')}{'/' + m['quant'] if m.get('quant') else ''}"


SERIES_ATTRS = {
    "phase": lambda c: c.get("phase") and f"phase {c.get('phase')}",
    "model": _model_name,
    "config": lambda c: "{}/{}".format(*(((c.get("config") or {}).get(k)) for k in ("context_size_a", "context_size_b")))
    if (c.get("config") or {}).get("context_size_a") is not None else None,
    "run": lambda c: c.get("run") and f"run {c.get('run')}",
    "cell": lambda c: c.get("cell_id"),
    "settings": lambda c: _settings_text(c),
}


def _settings_text(cell: dict) -> str | None:
    """The runtime settings that change TTFT between otherwise equal cells (flash attention, RAM cache)."""
    req = (cell.get("runtime") or {}).get("requested") or {}
    if not req:
        return None
    parts = [f"FA {'on' if req.get('flash_attn') else 'off'}"]
    if req.get("cache_ram_mib"):
        parts.append(f"cache-ram {req['cache_ram_mib']}")
    return ", ".join(parts)


def series_names(cells: list[dict], attrs: tuple[str, ...]) -> list[str]:
    """A series name per cell: its label, plus the attributes (of ``attrs``, in order) that
    differ between cells of the same label. Cells with equal attributes share a series."""
    ident = [tuple(SERIES_ATTRS[a](c) for a in attrs) for c in cells]
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(cells):
        groups.setdefault(_base_label(c), []).append(i)
    names = [""] * len(cells)
    for base, idxs in groups.items():
        differing = [k for k in range(len(attrs)) if len({ident[i][k] for i in idxs}) > 1]
        for i in idxs:
            extra = [str(ident[i][k]) for k in differing if ident[i][k] is not None]
            names[i] = f"{base} ({', '.join(extra)})" if extra else base
    return names


def version_text(cell: dict) -> str:
    """Engine version and build variant from the provenance, e.g. ``llama.cpp 0c1e570, cuda``.

    ``engine_version`` when the runner records one; else vLLM's version for vLLM backends, the
    llama.cpp commit (and the bindings' version for llama-cpp-python) for the others.
    """
    prov = cell.get("provenance") or {}
    backend = str(cell.get("backend") or "")
    parts = []
    if prov.get("engine_version"):
        parts.append(str(prov["engine_version"]))
    elif backend.startswith("vllm"):
        if prov.get("vllm_version"):
            parts.append(f"vLLM {prov['vllm_version']}")
    else:
        if prov.get("llama_cpp_commit"):
            parts.append(f"llama.cpp {prov['llama_cpp_commit']}")
        if backend.startswith("llamacpp_python") and prov.get("llama_cpp_python_version"):
            parts.append(f"bindings {prov['llama_cpp_python_version']}")
    if prov.get("build_variant"):
        parts.append(str(prov["build_variant"]))
    return ", ".join(parts)


# ---------------------------------------------------------------- recompute_scan


class _MeasuredTrials:
    """TTFT summary, verified count and roofline floor of a point's measured trials
    (for dataclasses with ``trials``, ``cell`` and a ``_memo`` dict)."""

    @property
    def summary(self) -> Summary:
        if "summary" not in self._memo:
            self._memo["summary"] = summarize([t.get("ttft_ms") for t in self.trials])
        return self._memo["summary"]

    @property
    def verified(self) -> str:
        return f"{sum(1 for t in self.trials if t.get('cache_verified'))}/{len(self.trials)}"

    @property
    def floor(self) -> tuple[roofline.Floor | None, str]:
        if "floor" not in self._memo:
            self._memo["floor"] = condition_floor(self.cell, self.trials)
        return self._memo["floor"]


@dataclass
class ScanPoint(_MeasuredTrials):
    """One kept/recomputed split of a recompute_scan cell."""

    cell_id: str
    series: str
    kept: int | None
    recomputed: int | None
    trials: list[dict] = field(repr=False)  # measured
    cell: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)



def build_scan(cells: list[dict]) -> list[ScanPoint]:
    ok = [c for c in cells if is_ok(c) and experiment_of(c) == "recompute_scan"]
    names = series_names(ok, ("phase", "model", "config", "run", "cell"))
    out = []
    for c, name in zip(ok, names, strict=True):
        for p in c.get("scan") or []:
            if not isinstance(p, dict):
                continue
            out.append(ScanPoint(str(c.get("cell_id")), name, p.get("kept_tokens"), p.get("recomputed_tokens"),
                                 measured(p.get("trials") or []), c))
    out.sort(key=lambda p: (p.series, p.recomputed if p.recomputed is not None else math.inf))
    return out


# ---------------------------------------------------------------- batch_sweep


@dataclass
class SweepPoint(_MeasuredTrials):
    """The cache-miss TTFT of one batch_sweep cell (one backend at one n_batch)."""

    cell_id: str
    series: str
    n_batch: int | None
    n_ubatch: int | None
    trials: list[dict] = field(repr=False)  # measured miss trials
    cell: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)



def _batch(cell: dict, key: str) -> int | None:
    """n_batch / n_ubatch as the engine reported it, else requested, else the sweep's value."""
    rt = cell.get("runtime") or {}
    for src in ((rt.get("effective") or {}), (rt.get("requested") or {}), (cell.get("sweep") or {})):
        v = src.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def build_sweep(cells: list[dict]) -> list[SweepPoint]:
    ok = [c for c in cells if is_ok(c) and experiment_of(c) == "batch_sweep"]
    names = series_names(ok, ("phase", "model", "config", "run"))
    out = [SweepPoint(str(c.get("cell_id")), name, _batch(c, "n_batch"), _batch(c, "n_ubatch"),
                      measured(_trials(c, "cache_miss")), c)
           for c, name in zip(ok, names, strict=True)]
    out.sort(key=lambda p: (p.series, p.n_batch if p.n_batch is not None else math.inf))
    return out


# ---------------------------------------------------------------- slot_eviction


#: slot_eviction's conditions in run order, with the words the report and figure use
SLOT_CONDITIONS = {
    "cache_hit": "[A,B] → [A,B,Q] on slot 0",
    "cache_miss": "[A,B] → [B,Q] on slot 0",
    "other_slot": "[A,B] on slot 0 → [A,B,Q] on slot 1",
    "server_hit": "[A,B] → [A,B,Q], server's slots",
    "server_miss": "[A,B] → [B,Q], server's slots",
    "alternate": "[A,B], [A',B'] → [A,B,Q], server's slots",
}


@dataclass
class SlotCondition:
    """One condition of a slot_eviction cell: its measured trials and refusals."""

    name: str
    trials: list[dict]  # measured
    refused: list[dict]  # refusals of measured trials (warm-up trials excluded)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def summary(self, metric: str = "ttft_ms") -> Summary:
        if metric not in self._memo:
            self._memo[metric] = summarize([t.get(metric) for t in self.trials])
        return self._memo[metric]

    def median(self, key: str) -> float | None:
        return _median([v for t in self.trials if (v := finite(t.get(key))) is not None])

    @property
    def verified(self) -> tuple[int, int]:
        return sum(1 for t in self.trials if t.get("cache_verified")), len(self.trials)

    @property
    def cached_share(self) -> float | None:
        """Median of the engine's cache_n / prompt tokens of the timed query, 0..1."""
        return _median([c / t["prompt_tokens"] for t in self.trials
                        if isinstance(c := t.get("cached_tokens"), int) and (t.get("prompt_tokens") or 0) > 0])

    def slots(self, key: str = "id_slot") -> list[int]:
        """The slots that served the condition's requests (``id_slot``, ``warmup_id_slot``, ``rewarm_id_slot``)."""
        return sorted({t[key] for t in self.trials if isinstance(t.get(key), int)})


@dataclass
class SlotRow:
    """One ok slot_eviction cell: one slot count at one total context."""

    cell_id: str
    series: str
    a: int | None
    b: int | None
    n_parallel: int | None
    slot_ctx: int | None  # per-slot context as the engine reports it (/slots, else /props)
    n_ctx_total: int | None
    kv_unified: bool | None
    prompts: dict[str, int]  # "[A,B]", "[A,B,Q]", "[B,Q]", "[A',B']" -> engine-tokenized length
    fits: dict[str, bool]
    conditions: dict[str, SlotCondition]
    cell: dict = field(default_factory=dict, repr=False)

    @property
    def config(self) -> str:
        return f"{_s(self.a)}/{_s(self.b)}"

    @property
    def verified(self) -> tuple[int, int]:
        pairs = [c.verified for c in self.conditions.values()]
        return sum(v for v, _ in pairs), sum(n for _, n in pairs)

    @property
    def refused(self) -> int:
        return sum(len(c.refused) for c in self.conditions.values())


def build_slots(cells: list[dict]) -> list[SlotRow]:
    """Rows of the ok slot_eviction cells, by series, config, then slot count."""
    ok = [c for c in cells if is_ok(c) and experiment_of(c) == "slot_eviction"]
    names = series_names(ok, ("phase", "model", "settings", "run"))
    out = []
    for c, name in zip(ok, names, strict=True):
        se = c.get("slot_eviction") or {}
        eff = (c.get("runtime") or {}).get("effective") or {}
        req = (c.get("runtime") or {}).get("requested") or {}
        slot_ctx = [v for v in se.get("slot_ctx") or [] if isinstance(v, int)]
        refused = [r for r in se.get("refused") or [] if isinstance(r, dict) and not r.get("warmup")]
        cfg = c.get("config") or {}
        conds = {k: SlotCondition(k, measured(_trials(c, k)), [r for r in refused if r.get("condition") == k])
                 for k in SLOT_CONDITIONS if k in c or any(r.get("condition") == k for r in refused)}
        out.append(SlotRow(
            cell_id=str(c.get("cell_id")), series=name, a=cfg.get("context_size_a"), b=cfg.get("context_size_b"),
            n_parallel=se.get("n_parallel") or eff.get("n_parallel") or req.get("n_parallel"),
            slot_ctx=min(slot_ctx) if slot_ctx else eff.get("n_ctx_per_slot"),
            n_ctx_total=eff.get("n_ctx") or req.get("n_ctx"), kv_unified=eff.get("kv_unified"),
            prompts=dict(se.get("prompts") or {}), fits=dict(se.get("fits") or {}), conditions=conds, cell=c,
        ))
    out.sort(key=lambda r: (r.series, config_key(r.a, r.b), r.n_parallel or 0))
    return out


# ---------------------------------------------------------------- every trial: recomputed tokens vs TTFT


@dataclass(frozen=True)
class TrialPoint:
    series: str
    source: str  # "hit" | "miss" | "scan"
    recomputed: int
    ttft_ms: float
    cell_id: str


def recompute_points(cells: list[dict]) -> tuple[list[TrialPoint], int]:
    """(points, trials left out) over the measured trials of invalidation (hit and miss) and
    recompute_scan cells, one series per backend, model and TTFT-relevant settings; a trial
    without an engine-reported cached count, or whose count was not verified, is left out."""
    ok = [c for c in cells if is_ok(c) and experiment_of(c) in ("invalidation", "recompute_scan")]
    names = series_names(ok, ("phase", "model", "settings"))
    points, skipped = [], 0
    for c, name in zip(ok, names, strict=True):
        for cond, trials in trial_blocks(c):
            source = CONDITION_NAMES.get(cond, "scan")
            for t in measured(trials):
                toks = trial_tokens(t, allow_expected=False)
                y = finite(t.get("ttft_ms"))
                if toks is None or y is None or t.get("cache_verified") is False:
                    skipped += 1
                    continue
                points.append(TrialPoint(name, source, toks[0], y, str(c.get("cell_id"))))
    return points, skipped


# ---------------------------------------------------------------- warm-up cascade


@dataclass
class Cascade:
    """Warm-ups of an invalidation cell split by the condition of the query that preceded them."""

    row: Row
    after: dict[str, list[dict]]  # "hit"/"miss" -> trials whose warm-up followed that condition
    excluded: int  # the first query (cold) and warm-up trials

    def summary(self, prev: str) -> Summary:
        return summarize([t.get("warmup_time_ms") for t in self.after.get(prev, [])])

    def tokens(self, prev: str) -> tuple[float | None, float | None] | None:
        """(median cached, median recomputed) tokens of those warm-ups; None when not recorded.
        Recomputed is None when only the cached count was recorded."""
        trials = [t for t in self.after.get(prev, []) if isinstance(t.get("warmup_cached_tokens"), int)]
        if not trials:
            return None
        cached = _median([t["warmup_cached_tokens"] for t in trials])
        rec = [t["warmup_prompt_tokens"] - t["warmup_cached_tokens"] for t in trials
               if isinstance(t.get("warmup_prompt_tokens"), int)]
        return cached, _median(rec)


def parse_order(entry: str) -> tuple[str, int | None, bool] | None:
    """"cache_hit:3w" -> ("cache_hit", 3, True)."""
    m = re.fullmatch(r"([A-Za-z0-9_=.-]+):(\d+)(w?)", str(entry))
    if not m:
        return None
    return m.group(1), int(m.group(2)), bool(m.group(3))


def cascade(row: Row) -> tuple[Cascade | None, str]:
    """Attribute each measured trial's warm-up to the condition of the query run just before it."""
    order = [parse_order(e) for e in row.order]
    if not order or any(o is None for o in order):
        return None, "no trial order recorded" if not order else "trial order not understood"
    index = {}
    for cond in CONDITION_NAMES:
        for t in _trials(row.cell, cond):
            index[(cond, t.get("trial"), bool(t.get("warmup")))] = t
    after: dict[str, list[dict]] = {"hit": [], "miss": []}
    excluded = 0
    for prev, cur in zip([None, *order[:-1]], order, strict=True):
        t = index.get(cur)
        if prev is None or cur[2] or t is None or prev[0] not in CONDITION_NAMES:
            excluded += 1
            continue
        if finite(t.get("warmup_time_ms")) is not None:
            after[CONDITION_NAMES[prev[0]]].append(t)
    if not after["hit"] and not after["miss"]:
        return None, "no warm-up times"
    return Cascade(row, after, excluded), ""


def order_text(order: list[str]) -> str:
    """The run order in words, e.g. "interleaved: 1 warm-up round (hit, miss), then hit, miss × 10"."""
    parsed = [parse_order(e) for e in order or []]
    if not parsed:
        return "not recorded"
    if any(p is None for p in parsed):
        return "as recorded: " + ", ".join(str(e) for e in order[:8]) + (", …" if len(order) > 8 else "")
    short = [CONDITION_NAMES.get(p[0], p[0]) for p in parsed]
    warm = [s for s, p in zip(short, parsed, strict=True) if p[2]]
    meas = [s for s, p in zip(short, parsed, strict=True) if not p[2]]
    n_warm = sum(1 for p in parsed if p[2])
    head = ", ".join(f"{s}:{p[1]}{'w' if p[2] else ''}" for s, p in zip(short[:4], parsed[:4], strict=True))
    sample = f" ({head}{', …' if len(order) > 4 else ''}; {len(order)} queries)"
    if any(p[2] for p in parsed[n_warm:]):  # warm-ups not all first
        return "as recorded" + sample
    cycle = list(dict.fromkeys(meas))
    k = len(cycle)
    if k > 1 and len(meas) % k == 0 and meas == cycle * (len(meas) // k):
        warm_cycle = list(dict.fromkeys(warm))
        if warm and warm == warm_cycle * (len(warm) // len(warm_cycle)):
            w = len(warm) // len(warm_cycle)
            wtxt = f"{w} warm-up round{'s' if w != 1 else ''} ({', '.join(warm_cycle)}), then "
        elif warm:
            wtxt = f"{len(warm)} warm-up queries, then "
        else:
            wtxt = ""
        return f"interleaved: {wtxt}{', '.join(cycle)} × {len(meas) // k}" + sample
    return ("blocked" if k > 1 else "one condition") + sample


# ---------------------------------------------------------------- outliers


@dataclass(frozen=True)
class Outlier:
    cell_id: str
    condition: str
    trial: int | None
    value: float
    low: float
    high: float


def outliers(cells: list[dict], metric: str = "ttft_ms") -> list[Outlier]:
    """Measured trials beyond the Tukey fences of their block (kept in every statistic)."""
    out = []
    for c in cells:
        if not is_ok(c):
            continue
        for cond, trials in trial_blocks(c):
            ms = measured(trials)
            fences = tukey([t.get(metric) for t in ms])
            if fences is None:
                continue
            for i in fences.flagged:
                out.append(Outlier(str(c.get("cell_id")), CONDITION_NAMES.get(cond, cond), ms[i].get("trial"),
                                   float(ms[i][metric]), fences.low, fences.high))
    return out


# ---------------------------------------------------------------- device state (NVML)

DEVICE_KEYS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c")
CLOCK_DROP = 0.9  # a timed request below 90 % of the cell's highest SM clock counts as throttled


@dataclass
class DeviceState:
    cell_id: str
    timed: list[tuple[str, int | None, dict]]  # (condition, trial, sample) per timed request
    settle: list[dict]
    keep_warm: dict | None = None  # the cell's keep_warm{requested, active, ...} when recorded

    def _vals(self, key: str, samples=None) -> list[float]:
        samples = samples if samples is not None else [s for _, _, s in self.timed] + self.settle
        return [v for s in samples if (v := finite(s.get(key))) is not None]

    @property
    def has_data(self) -> bool:
        return bool(self._vals("sm_clock_mhz") or self._vals("power_w") or self._vals("temp_c"))

    def range(self, key: str) -> tuple[float, float] | None:
        """(min, max) over the timed and the settle samples."""
        vals = self._vals(key)
        return (min(vals), max(vals)) if vals else None

    def settle_range(self, key: str) -> tuple[float, float] | None:
        """(min, max) over the settle samples only."""
        vals = self._vals(key, self.settle)
        return (min(vals), max(vals)) if vals else None

    @property
    def drops(self) -> list[tuple[str, int | None, float, float]]:
        """(condition, trial, SM clock, fraction of the cell's max) of throttled timed requests."""
        rng = self.range("sm_clock_mhz")
        if rng is None or rng[1] <= 0:
            return []
        out = []
        for cond, trial, s in self.timed:
            sm = finite(s.get("sm_clock_mhz"))
            if sm is not None and sm < CLOCK_DROP * rng[1]:
                out.append((cond, trial, sm, sm / rng[1]))
        return out


def _samples(v) -> list[dict]:
    if isinstance(v, dict):
        v = v.get("samples", [v])
    return [s for s in v or [] if isinstance(s, dict)]


def device_state(cell: dict) -> DeviceState:
    """NVML samples of a cell: ``device`` of each trial, ``device_settle`` of the cell and its trials."""
    timed, settle = [], _samples(cell.get("device_settle"))
    for cond, trials in trial_blocks(cell):
        for t in trials:
            if isinstance(t.get("device"), dict):
                timed.append((CONDITION_NAMES.get(cond, cond), t.get("trial"), t["device"]))
            settle.extend(_samples(t.get("device_settle")))
    kw = cell.get("keep_warm")
    return DeviceState(str(cell.get("cell_id")), timed, settle, kw if isinstance(kw, dict) else None)


# ---------------------------------------------------------------- everything


@dataclass
class Evidence:
    """What the report and the figures are drawn from."""

    cells: list[dict]
    rows: list[Row]
    scan: list[ScanPoint]
    sweep: list[SweepPoint]
    slots: list[SlotRow] = field(default_factory=list)


def build_evidence(cells: list[dict]) -> Evidence:
    return Evidence(cells, build_rows(cells), build_scan(cells), build_sweep(cells), build_slots(cells))


def _canon(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def settings_parity(cells: list[dict]) -> Parity:
    """Effective runtime keys whose values differ across ok cells.

    A key is compared among the cells that report it; engine-only keys that
    a single cell reports are not differences and are left out.
    """
    ok = sorted((c for c in cells if is_ok(c)), key=lambda c: (phase_key(c.get("phase")), str(c.get("cell_id"))))
    eff = {str(c.get("cell_id")): ((c.get("runtime") or {}).get("effective") or {}) for c in ok}
    all_keys = sorted({k for e in eff.values() for k in e})
    par = Parity()
    for k in all_keys:
        values = [e[k] for e in eff.values() if k in e]
        if len(values) < 2:
            continue
        par.compared += 1
        if len({_canon(v) for v in values}) > 1:
            par.keys.append(k)
    par.table = {cid: {k: e.get(k, None) for k in par.keys} for cid, e in eff.items()}
    for c in ok:
        for m in (c.get("runtime") or {}).get("mismatches") or []:
            par.mismatches.append((str(c.get("cell_id")), mismatch_text(m)))
    return par


def mismatch_text(m) -> str:
    """A requested-vs-effective mismatch as one line, whatever shape the runner wrote."""
    if isinstance(m, dict):
        key = m.get("key") or m.get("setting") or m.get("name")
        if key is not None and ("requested" in m or "effective" in m):
            return f"{key}: requested {_canon(m.get('requested'))}, effective {_canon(m.get('effective'))}"
        return _canon(m)
    return str(m)


ENGINE_VERSION_KEYS = (
    "llama_cpp_commit", "llama_cpp_python_version", "vllm_version", "engine_version", "version",
)


def provenance_row(cell: dict) -> dict:
    """Compact provenance of one cell: engine build, flags, model hash, host."""
    prov = cell.get("provenance") or {}
    engine = next((f"{k}={prov[k]}" for k in ENGINE_VERSION_KEYS if prov.get(k)), None)
    flags = prov.get("build_flags")
    if isinstance(flags, (list, tuple)):
        flags = " ".join(str(f) for f in flags)
    sha = (cell.get("model") or {}).get("sha256") or ""
    image = ((prov.get("container") or {}).get("image") or {})
    git = prov.get("runner_git") or {}
    return {
        "cell": cell.get("cell_id"),
        "backend": cell.get("backend"),
        "engine": engine,
        "runtime": prov.get("runtime_kind"),
        "image": f"{image['id'].removeprefix('sha256:')[:12]} ({image.get('tag')})" if image.get("id") else None,
        "runner git": (f"{git['sha'][:10]}{' dirty' if git.get('dirty') else ''}" if git.get("sha") else None),
        "build flags": shorten(flags, 48),
        "model": (cell.get("model") or {}).get("name"),
        "sha256": sha[:12] or None,
        "host": host_text(prov.get("host")),
        "device": roofline.gpu_name(cell) if roofline.runs_on_gpu(cell) else ("CPU" if prov else None),
    }


def host_text(host) -> str | None:
    """Host as a short string: hostname plus the accelerator or CPU if known."""
    if not host:
        return None
    if not isinstance(host, dict):
        return shorten(str(host), 40)
    parts = [host.get(k) for k in ("hostname", "node", "name") if host.get(k)][:1]
    parts += [host.get(k) for k in ("gpu", "accelerator", "cpu", "machine") if host.get(k)][:1]
    return shorten(" / ".join(str(p) for p in parts), 48) or shorten(_canon(host), 48)


def shorten(text, width: int) -> str | None:
    """Text cut to ``width`` characters with an ellipsis; None stays None."""
    if text is None or text == "":
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"
