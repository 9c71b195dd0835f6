"""The summary model: one ``SummaryRow`` per cell x condition, the ONE table every headline output reads.

The report's findings block and headline table, the summary figure, ``summary.csv`` / ``summary.jsonl``,
``report.html`` and ``compare`` are all drawn from ``build(cells)``; none of them recomputes a headline number.
Versioned (``SUMMARY_VERSION``, written into every exported row): a consumer of the exports checks it.

A row holds

* the settings that DEFINE the cell (``match_key``: experiment, interface, API path / build, model, A/B/Q,
  output tokens, condition, the experiment's axis value, the requested runtime settings other than threads)
  and the facts that only say WHERE it ran (``release``, ``runtime_kind``, ``device``, ``host``, ``run``);
  ``compare`` matches cells of two runs by ``match_key`` and reports the rest, so runs of two hosts or two
  releases compare cell by cell;
* the headline numbers of the condition's measured trials: TTFT median [CI], p95, n, verified / unverified
  trials (the engine's own counters against the expectation), the harness overhead (harness - reference
  client on the same requests, paired per trial);
* on the miss row of a cell with both hit and miss: miss - hit (difference of medians [CI], % [CI],
  Mann-Whitney p, Cliff's delta) and the cost per recomputed token (least squares over the cell's verified
  trials);
* ``values`` (the measured TTFTs) for the two-run deltas of ``compare``; never exported.

Every experiment of the catalogue contributes: the trial-protocol experiments one row per trial block
(``CellDoc.trial_blocks``: hit, miss, slot_eviction's conditions, the recompute scan's points), the
repeated-prefix benchmark one row per (workload, prefix length, concurrency, reuse mix) of a cell.
A failed cell is one row with ``status`` "failed" and its error, so a gate can see it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from kvmatrix.analysis.labels import config_key, interface_title, phase_key, version_text
from kvmatrix.analysis.load import as_docs
from kvmatrix.analysis.stats import compare, linear_fit, summarize
from kvmatrix.analysis.trials import trial_tokens
from kvmatrix.runners.document import HIT_MISS, CellDoc, measured

SUMMARY_VERSION = 1

#: requested runtime settings that depend on the host, not on the experiment (not part of the match key)
HOST_SETTINGS = ("n_threads", "n_threads_batch")
#: the experiment's own axis, as ``axis`` names it
AXIS_SETTING = {"batch_sweep": "n_batch", "slot_eviction": "n_parallel"}


@dataclass
class SummaryRow:
    """One cell x condition. Numbers in milliseconds unless the name says otherwise; None = not measured."""

    @property
    def key(self) -> tuple[str, str]:
        """The cell this row is of: (run, cell id); one cell id can be in several runs of one report (the same
        cell on two models or hosts, each in its own folder)."""
        return self.run, self.cell_id

    # identity and where it ran
    cell_id: str
    run: str
    experiment: str
    status: str  # "ok" | "failed"
    phase: str
    backend: str
    interface: str  # the catalogue's title of the interface
    series: str  # the report's series label (backend[/variant][ [build]][ @tag])
    api: str  # the label without its run tag (@...): the API path / build that defines the series
    model: str
    a: int | None
    b: int | None
    q: int | None
    max_output_tokens: int | None
    condition: str
    axis: str  # the experiment's axis value ("n_batch=64", "n_parallel=2", "kept=128"), "" when none
    settings: dict  # requested runtime settings (RuntimeSpec) that define the cell
    release: str  # engine release text (vLLM version / llama.cpp commit, build variant)
    runtime_kind: str  # host | docker
    device: str  # GPU name or "cpu"
    host: str
    # the condition's measured trials
    n: int = 0
    ttft_ms: float | None = None  # median
    ttft_ci_lo: float | None = None
    ttft_ci_hi: float | None = None
    ttft_p95_ms: float | None = None
    verified: int | None = None  # trials the engine's counters confirm
    unverified: int | None = None  # trials the engine's counters contradict
    harness_overhead_ms: float | None = None  # median of harness - reference, paired per trial
    harness_overhead_ci_lo: float | None = None
    harness_overhead_ci_hi: float | None = None
    # miss versus hit (on the miss row of a cell with both)
    miss_minus_hit_ms: float | None = None
    miss_minus_hit_ci_lo: float | None = None
    miss_minus_hit_ci_hi: float | None = None
    miss_minus_hit_pct: float | None = None
    miss_minus_hit_pct_ci_lo: float | None = None
    miss_minus_hit_pct_ci_hi: float | None = None
    p_value: float | None = None
    p_method: str | None = None
    cliffs_delta: float | None = None
    us_per_recomputed_token: float | None = None
    error: str | None = None
    values: list[float] = field(default_factory=list, repr=False)

    @property
    def config(self) -> str:
        return f"{'?' if self.a is None else self.a}/{'?' if self.b is None else self.b}"

    @property
    def match_key(self) -> tuple:
        """What defines the cell and condition, independent of host, release, runtime and run name."""
        settings = tuple(sorted((k, repr(v)) for k, v in self.settings.items() if k not in HOST_SETTINGS))
        return (self.experiment, self.phase, self.api, self.model, self.a, self.b, self.q,
                self.max_output_tokens, self.condition, self.axis, settings)

    @property
    def where(self) -> str:
        """Release, runtime and device in one text (what a match key leaves out)."""
        return ", ".join(x for x in (self.release, self.runtime_kind, self.device) if x)

    def export(self) -> dict:
        """The row as the exports write it: every field but ``values``, settings flattened, the version first."""
        d = {"summary_version": SUMMARY_VERSION}
        for k, v in asdict(self).items():
            if k == "values":
                continue
            if k == "settings":
                d.update({f"setting_{s}": sv for s, sv in sorted(v.items())})
            else:
                d[k] = v
        return d


def build(cells) -> list[SummaryRow]:
    """Every cell's rows, in cell order (consumers order them with ``sort_key``)."""
    rows: list[SummaryRow] = []
    for cell in as_docs(cells):
        if not cell.ok:
            rows.append(_row(cell, condition="", error=str(cell.error or cell.status or "failed")))
        elif cell.experiment == "prefix_reuse":
            rows += _prefix_rows(cell)
        else:
            rows += _trial_rows(cell)
    return rows


def _ident(cell: CellDoc) -> dict:
    prov = cell.provenance
    req = dict(cell.runtime.requested or {})
    label = str(cell.label or cell.backend or "?")
    gpu = prov.gpu
    device = (gpu.get("name") if isinstance(gpu, dict) else gpu) or "cpu"
    host = prov.host
    host = (host.get("hostname") or host.get("node") or "") if isinstance(host, dict) else (host or "")
    axis_key = AXIS_SETTING.get(str(cell.experiment))
    return dict(
        cell_id=str(cell.cell_id), run=str(cell.run or ""), experiment=str(cell.experiment),
        status="ok" if cell.ok else "failed", phase=str(cell.phase or "?"), backend=str(cell.backend or "?"),
        interface=interface_title(cell.backend), series=label, api=label.split(" @", 1)[0],
        model=str(cell.model.title or "?"), a=cell.config.context_size_a, b=cell.config.context_size_b,
        q=cell.config.query_tokens, max_output_tokens=cell.config.max_output_tokens,
        axis=f"{axis_key}={req.get(axis_key)}" if axis_key else "",
        settings=req, release=version_text(cell),
        runtime_kind=str(prov.runtime_kind or "host"), device=str(device), host=str(host),
    )


def _row(cell: CellDoc, axis: str | None = None, **values) -> SummaryRow:
    """The cell's identity plus ``values``; ``axis`` (a scan point's ``kept=N``) only where the experiment has
    no runtime axis of its own."""
    ident = _ident(cell)
    ident["axis"] = ident["axis"] or axis or ""
    return SummaryRow(**ident, **values)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def overhead(trials: list[dict]):
    """Harness minus reference client TTFT, paired per trial (the calibration control): a ``Summary``, or None
    when no trial went through the reference client."""
    pairs = [t["ttft_ms"] - t["reference_ttft_ms"] for t in trials
             if _number(t.get("ttft_ms")) and _number(t.get("reference_ttft_ms"))]
    return summarize(pairs) if pairs else None


def recompute_fit(trials: list[dict]):
    """TTFT against recomputed tokens (prompt - the engine's cached count), least squares over the VERIFIED
    trials: ``Fit`` (slope in ms per token), or None with fewer than two distinct token counts."""
    pts = [(tt[0], t["ttft_ms"]) for t in trials if t.get("cache_verified") and _number(t.get("ttft_ms"))
           and (tt := trial_tokens(t, allow_expected=False)) is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    fit = linear_fit([x for x, _ in pts], [y for _, y in pts])
    return fit if fit is not None and math.isfinite(fit.slope) else None


def _ttft(trials: list[dict]) -> dict:
    """Median [CI], p95, n, verification and harness overhead of measured trials."""
    vals = [t.get("ttft_ms") for t in trials if _number(t.get("ttft_ms"))]
    s = summarize(vals)
    checked = [t.get("cache_verified") for t in trials if "cache_verified" in t]
    h = overhead(trials)
    return dict(
        n=s.n, ttft_ms=s.median, ttft_ci_lo=s.ci[0] if s.ci else None, ttft_ci_hi=s.ci[1] if s.ci else None,
        ttft_p95_ms=s.p95, verified=sum(1 for v in checked if v is True) if checked else None,
        unverified=sum(1 for v in checked if v is False) if checked else None,
        harness_overhead_ms=h.median if h else None,
        harness_overhead_ci_lo=h.ci[0] if h and h.ci else None, harness_overhead_ci_hi=h.ci[1] if h and h.ci else None,
        values=[float(v) for v in vals],
    )


def _miss_vs_hit(cell: CellDoc) -> dict:
    hit, miss = (measured(cell.trials(k)) for k in HIT_MISS)
    c = compare([t.get("ttft_ms") for t in hit], [t.get("ttft_ms") for t in miss])
    if c.diff is None:
        return {}
    test = c.test
    fit = recompute_fit(hit + miss)
    return dict(
        miss_minus_hit_ms=c.diff, miss_minus_hit_ci_lo=c.diff_ci[0] if c.diff_ci else None,
        miss_minus_hit_ci_hi=c.diff_ci[1] if c.diff_ci else None, miss_minus_hit_pct=c.rel_pct,
        miss_minus_hit_pct_ci_lo=c.rel_ci[0] if c.rel_ci else None,
        miss_minus_hit_pct_ci_hi=c.rel_ci[1] if c.rel_ci else None,
        p_value=c.p, p_method=test.method if test is not None else None,
        cliffs_delta=c.delta,
        us_per_recomputed_token=fit.slope * 1000 if fit is not None else None,
    )


def _trial_rows(cell: CellDoc) -> list[SummaryRow]:
    rows = []
    both = all(cell.has_condition(k) for k in HIT_MISS)
    for cond, trials in cell.trial_blocks():
        axis = cond.split(" ", 1)[1] if cond.startswith("scan ") else None
        values = _ttft(measured(trials))
        if both and cond == "cache_miss":
            values.update(_miss_vs_hit(cell))
        rows.append(_row(cell, condition="scan" if axis else cond, axis=axis, **values))
    return rows


def _prefix_rows(cell: CellDoc) -> list[SummaryRow]:
    """One row per (workload, prefix length, concurrency, reuse mix) group of the cell's timed requests."""
    groups: dict[tuple, list[dict]] = {}
    for r in cell.requests or []:
        key = (r.get("workload"), r.get("prefix_len_tokens"), r.get("concurrency"), r.get("reuse_pct"))
        groups.setdefault(key, []).append(r)
    caching = bool(cell.prefix is not None and cell.prefix.mode == "with_prefix_cache")
    rows = []
    for (workload, plen, conc, reuse), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        ok = [r for r in rs if r.get("ok")]
        trials = [{"ttft_ms": r["ttft_s"] * 1000} for r in ok if isinstance(r.get("ttft_s"), (int, float))]
        values = _ttft(trials)
        reuse_rs = [r for r in ok if r.get("shares_prefix")]
        if caching:  # a request sharing a prefix must hit; the engine's counter says whether it did
            values.update(verified=sum(1 for r in reuse_rs if r.get("cache_hit")),
                          unverified=sum(1 for r in reuse_rs if not r.get("cache_hit")))
        else:  # caching off: any cached token reported contradicts the setting
            values.update(verified=sum(1 for r in ok if not r.get("cached_tokens")),
                          unverified=sum(1 for r in ok if r.get("cached_tokens")))
        rows.append(_row(cell, condition=f"{workload} prefix={plen} c={conc} reuse={reuse}%", axis="",
                         error=f"{len(rs) - len(ok)} requests failed" if len(ok) < len(rs) else None, **values))
    return rows


def sort_key(r: SummaryRow) -> tuple:
    order = {"cache_hit": 0, "cache_miss": 1}
    return (r.experiment, phase_key(r.phase), r.api, r.model, config_key(r.a, r.b), r.axis,
            order.get(r.condition, 2), r.condition, r.series)


def headline(rows: list[SummaryRow]) -> list[tuple[SummaryRow, SummaryRow]]:
    """(hit, miss) row pairs of the ok invalidation cells: the report's headline table, in table order."""
    by_cell: dict[tuple[str, str], dict[str, SummaryRow]] = {}
    for r in rows:
        if r.experiment == "invalidation" and r.status == "ok" and r.condition in HIT_MISS:
            by_cell.setdefault(r.key, {})[r.condition] = r
    pairs = [(d["cache_hit"], d["cache_miss"]) for d in by_cell.values() if len(d) == 2]
    return sorted(pairs, key=lambda p: sort_key(p[1]))
