"""Pure summaries of result cells, per experiment, plus settings parity and provenance.

Input is the list of cell documents from ``load_dirs`` (``kvmatrix.runners.results.load_cells``
without duplicates). Nothing here draws or writes; ``report`` and ``figures``
consume these values through ``build_evidence``.

- invalidation cells -> ``Row`` (hit vs miss, bootstrap CIs, Mann-Whitney U, roofline floor)
- recompute_scan cells -> ``ScanPoint`` per kept/recomputed split
- batch_sweep cells -> ``SweepPoint`` per (backend, n_batch)
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
from kvmatrix.runners.results import load_cells

CONDITION_NAMES = {"cache_hit": "hit", "cache_miss": "miss"}


@dataclass
class Row:
    """One ok cell as the report and the figures see it."""

    cell_id: str
    phase: str
    series: str  # backend label, unique per (phase, config)
    a: int | None
    b: int | None
    hit: dict  # the condition's stats{}
    miss: dict
    degradation_pct: float | None
    max_output_tokens: int | None = None
    unverified: int = 0  # measured trials with cache_verified false
    warmups: tuple[int, int] = (0, 0)  # warm-up trials (hit, miss)

    @property
    def config(self) -> str:
        return f"{_s(self.a)}/{_s(self.b)}"

    @property
    def name(self) -> str:
        """Phase and backend label, as figures name a series."""
        return f"{self.phase} {self.series}"


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
    """Measured (non-warm-up) trials of a cell with cache_verified false."""
    out = []
    for cond in ("cache_hit", "cache_miss"):
        for t in _trials(cell, cond):
            if not t.get("warmup") and not t.get("cache_verified", False):
                out.append(Unverified(
                    cell_id=str(cell.get("cell_id")), condition=cond, trial=t.get("trial"),
                    cached_tokens=t.get("cached_tokens"),
                    expected_cached_tokens=t.get("expected_cached_tokens"),
                    cache_granularity=t.get("cache_granularity"),
                ))
    return out


def _warmups(cell: dict, condition: str) -> int:
    return sum(1 for t in _trials(cell, condition) if t.get("warmup"))


def build_rows(cells: list[dict]) -> list[Row]:
    """Rows for the ok cells, ordered by phase, backend label, then config."""
    ok = [c for c in cells if is_ok(c)]
    labels = series_labels(ok)
    rows = []
    for i, c in enumerate(ok):
        cfg = c.get("config") or {}
        rows.append(Row(
            cell_id=str(c.get("cell_id")), phase=str(c.get("phase") or "?"), series=labels[i],
            a=cfg.get("context_size_a"), b=cfg.get("context_size_b"),
            hit=_stats(c, "cache_hit"), miss=_stats(c, "cache_miss"),
            degradation_pct=finite(c.get("ttft_degradation_pct")),
            max_output_tokens=cfg.get("max_output_tokens"),
            unverified=len(unverified_trials(c)),
            warmups=(_warmups(c, "cache_hit"), _warmups(c, "cache_miss")),
        ))
    rows.sort(key=lambda r: (phase_key(r.phase), r.series, config_key(r.a, r.b)))
    return rows


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
    return {
        "cell": cell.get("cell_id"),
        "backend": cell.get("backend"),
        "engine": engine,
        "build flags": shorten(flags, 48),
        "model": (cell.get("model") or {}).get("name"),
        "sha256": sha[:12] or None,
        "host": host_text(prov.get("host")),
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
