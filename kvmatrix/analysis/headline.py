"""The report's first screen: "## Summary", generated from the summary model (``kvmatrix.analysis.summary``).

Nothing in it is hand-written or hard-coded: every number is read from the cells.

1. one finding per interface and model (invalidation cells): hit and miss TTFT, what a miss costs (miss − hit
   in ms [95% CI] per A/B config, with the %), the cost per recomputed token (least squares over the verified
   trials, pooled over the configs), the verified trials, and the harness overhead on a hit (harness −
   reference client on the same requests, the calibration control);
2. one line per other experiment the cells hold, and what failed or could not be verified;
3. the ONE summary figure (``fig0_summary``), then the narrow headline table (8 columns, one row per cell);
4. where the full tables are: the appendix and the exported files (summary.csv / .jsonl, trials.csv).
"""

from __future__ import annotations

from kvmatrix import catalog
from kvmatrix.analysis.fmt import NA, fmt_p, md_table, ms, val_ci
from kvmatrix.analysis.summary import SummaryRow, headline, overhead, recompute_fit
from kvmatrix.runners.document import HIT_MISS, measured

#: the exports every report folder gets beside report.md (kvmatrix.analysis.export)
EXPORTS = ("summary.csv", "summary.jsonl", "trials.csv")
#: the headline table's columns (at most 8: the wide tables are in the appendix and the exports)
HEADERS = ["Interface", "Model", "A/B", "Hit TTFT (ms)", "Miss TTFT (ms)", "Miss − hit (ms) [95% CI] (%)",
           "p · Cliff's δ", "Verified"]
SUMMARY_FIGURE = "fig0_summary"


def _range(vals: list[float | None]) -> str:
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return NA
    return ms(vals[0]) if len(vals) == 1 or ms(vals[0]) == ms(vals[-1]) else f"{ms(vals[0])}–{ms(vals[-1])}"


def _cost(miss: SummaryRow, unit: str = "") -> str:
    text = val_ci(miss.miss_minus_hit_ms, _ci(miss), sign=True) + unit
    if miss.miss_minus_hit_pct is not None:
        text += f" ({miss.miss_minus_hit_pct:+.0f}%)"
    return text


def _ci(r: SummaryRow) -> tuple[float, float] | None:
    lo, hi = r.miss_minus_hit_ci_lo, r.miss_minus_hit_ci_hi
    return None if lo is None or hi is None else (lo, hi)


def _verified(rows: list[SummaryRow]) -> tuple[int, int]:
    return sum(r.verified or 0 for r in rows), sum(r.n for r in rows)


def findings(ev) -> list[str]:
    """One bullet per interface x model (x release / runtime tag) of the invalidation cells."""
    pairs = headline(ev.summary)
    groups: dict[tuple, list[tuple[SummaryRow, SummaryRow]]] = {}
    for hit, miss in pairs:
        groups.setdefault((miss.model, miss.phase, miss.series), []).append((hit, miss))
    cells = {(str(c.run or ""), str(c.cell_id)): c for c in ev.cells}
    out = []
    for (model, phase, series), ps in groups.items():
        hits = [h for h, _ in ps]
        misses = [m for _, m in ps]
        costs = "; ".join(f"{m.config}: {_cost(m, ' ms')}" for m in misses)
        trials = [t for _, m in ps for k in HIT_MISS for t in measured(cells[m.key].trials(k))]
        fit = recompute_fit(trials)
        per_token = (f"; {fit.slope * 1000:.0f} µs per recomputed token (least squares over {fit.n} verified "
                     f"trials, R² {fit.r2:.2f})") if fit is not None and fit.r2 is not None else ""
        ok, n = _verified(hits + misses)
        over = overhead([t for h in hits for t in measured(cells[h.key].trials("cache_hit"))])
        over_text = (f"; harness overhead on a hit {val_ci(over.median, over.ci, 2, sign=True)} ms"
                     if over is not None else "; no calibration control in these cells")
        title = catalog.phase_title(phase) if phase in catalog.phase_ids() else phase
        out.append(f"- **{phase} {title} · {series} · {model}**: hit {_range([h.ttft_ms for h in hits])} ms, "
                   f"miss {_range([m.ttft_ms for m in misses])} ms; a miss costs {costs}{per_token}; "
                   f"{ok}/{n} trials verified{over_text}.")
    return out


def others(ev) -> list[str]:
    """One line per other experiment, and what failed / is unverified / is invalid."""
    rows = ev.summary
    out = []
    for exp in catalog.EXPERIMENTS:
        if exp.name == "invalidation":
            continue
        rs = [r for r in rows if r.experiment == exp.name and r.status == "ok"]
        if not rs:
            continue
        n_cells = len({r.key for r in rs})
        ok, n = _verified(rs)
        measured_rows = [r for r in rs if r.ttft_ms is not None]
        span = _range([r.ttft_ms for r in measured_rows])
        out.append(f"- **{exp.name}**: {n_cells} cell{'s' if n_cells != 1 else ''}, {len(measured_rows)} "
                   f"conditions measured (median TTFT {span} ms), {ok}/{n} verified; see its section.")
    failed = sorted({r.cell_id for r in rows if r.status != "ok"})
    if failed:
        out.append(f"- **{len(failed)} failed cell{'s' if len(failed) != 1 else ''}**: {', '.join(failed)} "
                   "(see Failed cells).")
    unverified = sum(r.unverified or 0 for r in rows)
    if unverified:
        out.append(f"- **{unverified} measured trial{'s' if unverified != 1 else ''} unverified** (the engine's "
                   "cached-token count disagrees with the expectation): see Unverified trials.")
    return out


def table(ev) -> str:
    body = []
    for hit, miss in headline(ev.summary):
        ok, n = _verified([hit, miss])
        p = NA if miss.p_value is None else fmt_p(miss.p_value)
        delta = NA if miss.cliffs_delta is None else f"{miss.cliffs_delta:+.2f}"
        body.append([f"{miss.phase} {miss.series}", miss.model, miss.config,
                     val_ci(hit.ttft_ms, _pair(hit)), val_ci(miss.ttft_ms, _pair(miss)), _cost(miss),
                     f"{p} · {delta}", f"{ok}/{n}"])
    return md_table(HEADERS, body) if body else ""


def _pair(r: SummaryRow) -> tuple[float, float] | None:
    return None if r.ttft_ci_lo is None or r.ttft_ci_hi is None else (r.ttft_ci_lo, r.ttft_ci_hi)


def sections(ev, figures) -> list[str]:
    total = len({r.key for r in ev.summary})
    ok = sum(1 for c in ev.cells if c.ok)
    ok_trials, n_trials = _verified([r for r in ev.summary if r.status == "ok"])
    parts = ["## Summary",
             f"Generated from the {total} cells of this report ({ok} ok): medians over the measured trials with "
             f"95% CIs; {ok_trials}/{n_trials} measured trials verified by the engines' own cached-token "
             "counters."]
    lines = findings(ev) + others(ev)
    if lines:
        parts.append("\n".join(lines))
    fig = next((f for f in figures if f.name == SUMMARY_FIGURE and f.path is not None), None)
    if fig is not None:
        parts.append(f"![{fig.title}](figures/{fig.path.name})\n\n*{fig.title}* — {fig.caption}")
    tab = table(ev)
    if tab:
        parts.append(tab)
    parts.append("Full tables: the Appendix, and beside this report " + ", ".join(f"[`{e}`]({e})" for e in EXPORTS)
                 + " (one row per cell x condition / per trial; the cell files' schema: `docs/schema/"
                 "cell.schema.json`).")
    return ["\n\n".join(parts)]
