"""report.md's "Invalidation: cache hit vs cache miss" section (run order, the warm-up cascade, figures) and its
appendix: the wide main table and the statistics per condition (the report's first screen has the narrow
headline table, ``kvmatrix.analysis.headline``; every number is also in summary.csv)."""

from __future__ import annotations

from kvmatrix.analysis.experiments.invalidation.rows import Row, cascade, computation_ms
from kvmatrix.analysis.figure import FigureResult, embed
from kvmatrix.analysis.fmt import NA, med_ci, ms, p_text, pair, pct, ratio_text, table, val_ci
from kvmatrix.analysis.trials import order_lines, stat

MARK = "†"  # rows whose stats include unverified trials

MAIN_HEADERS = [
    "Phase", "Backend", "A/B (tok)", "Hit TTFT (ms) median [95% CI]", "Miss TTFT (ms) median [95% CI]",
    "Miss − hit (ms) [95% CI]", "Degradation (%) median [95% CI]", "p (Mann-Whitney)", "Cliff's δ",
    "Degradation mean (%)",
    "Miss / floor", "Non-stream TTFT hit / miss (ms)", "Overhead hit / miss (ms)", "Throughput hit (tok/s)",
    "Warm-up before hit / miss (ms)", "Verified hit", "Verified miss", "Trials (measured + warm-up)",
]
STATS_HEADERS = ["Phase", "Backend", "A/B (tok)", "Condition", "n", "Median [95% CI] (ms)", "Mean (ms)",
                 "Stdev (ms)", "CV (%)", "p95 (ms)", "Min (ms)", "Max (ms)"]


def verified(stats_: dict) -> str:
    n = stats_.get("n_trials")
    return NA if n is None else f"{stats_.get('verified_trials', 0)}/{n}"


def trial_counts(r: Row) -> str:
    """Measured + warm-up trials; one figure when hit and miss agree."""
    hit = f"{r.hit.get('n_trials', '?')} + {r.warmups[0]}"
    miss = f"{r.miss.get('n_trials', '?')} + {r.warmups[1]}"
    return hit if hit == miss else f"{hit} / {miss}"


def main_row(r: Row) -> list[str]:
    """One row of the main table."""
    c = r.comparison()
    deg = NA if r.degradation_pct is None else f"{r.degradation_pct:+.1f}"
    return [
        r.phase, f"{r.series} {MARK}" if r.unverified else r.series, r.config,
        med_ci(r.summary("hit")), med_ci(r.summary("miss")),
        val_ci(c.diff, c.diff_ci, sign=True), val_ci(c.rel_pct, c.rel_ci, sign=True),
        p_text(c), NA if c.delta is None else f"{c.delta:+.2f}", deg,
        ratio_text(r.floor_ratio),
        pair(stat(r.hit, "ttft_non_streaming_ms"), stat(r.miss, "ttft_non_streaming_ms")),
        pair(stat(r.hit, "overhead_ms"), stat(r.miss, "overhead_ms")),
        ms(stat(r.hit, "throughput")),
        pair(stat(r.hit, "warmup_time_ms"), stat(r.miss, "warmup_time_ms")),
        verified(r.hit), verified(r.miss), trial_counts(r),
    ]


def _stats_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        for cond in ("hit", "miss"):
            s = r.summary(cond)
            out.append([r.phase, r.series, r.config, cond, str(s.n), med_ci(s), ms(s.mean), ms(s.stdev),
                        pct(s.cv), ms(s.p95), ms(s.min), ms(s.max)])
    return out


def sections(ev, figures: list[FigureResult]) -> list[str]:
    rows = ev.rows
    head = "## Invalidation: cache hit vs cache miss\n\n"
    if not rows:
        return [head + "No ok invalidation cells: nothing to tabulate (see Failed cells).\n\n" +
                "\n\n".join(embed(figures, "invalidation"))]
    parts = [
        head + "The headline numbers are in the Summary; the full table (18 columns) and the statistics per "
        "condition are in the Appendix (\"Invalidation: the full table\") and in summary.csv.",
        order_lines([r.cell for r in rows]),
        _cascade_table(rows),
        *embed(figures, "invalidation"),
    ]
    sources = {}
    for r in rows:
        for cond in ("hit", "miss"):
            sources.setdefault(computation_ms(getattr(r, cond))[1], set()).add(r.name)
    if any(f.path and f.name == "three_panel" for f in figures) and "non-streaming" in sources:
        names = ", ".join(sorted(sources["non-streaming"]))
        parts.append(f"In the three-panel figure's panel (1), computation is the non-streaming TTFT for {names} "
                     "(no engine prompt time reported); elsewhere it is the engine's prompt time.")
    return ["\n\n".join(parts)]


def appendix(ev, figures: list[FigureResult]) -> list[str]:
    """The wide tables: one row per cell with every column, and the statistics of each condition."""
    rows = ev.rows
    if not rows:
        return []
    notes = [
        "TTFT columns are the streaming TTFT over measured trials: median with its 95% bootstrap CI. "
        "Miss − hit is the difference of the medians; degradation (median) is that difference over the hit "
        "median; p is the two-sided Mann-Whitney U test of miss vs hit TTFT, Cliff's δ its effect size (P(miss > hit) − P(miss < hit): +1 = every miss slower than every hit). Degradation mean is "
        "(mean miss − mean hit) / mean hit as recorded in each cell (the original experiments' definition). "
        "Miss / floor is the miss TTFT median over the roofline floor of the tokens the miss recomputes "
        "(see Roofline floor). Non-streaming TTFT is a 1-token non-streaming call; overhead = streaming − "
        "non-streaming TTFT. Rows are ordered by phase, backend, then config (largest A first).",
    ]
    flagged = [r for r in rows if r.unverified]
    if flagged:
        n = sum(r.unverified for r in flagged)
        notes.append(f"{MARK} The statistics of this row include {n} unverified trial(s) in total "
                     "(cached tokens did not match the expectation); they are listed under "
                     "Unverified trials, not dropped.")
    return ["\n\n".join([
        "### Invalidation: the full table\n\n" + table([main_row(r) for r in rows], MAIN_HEADERS),
        "\n\n".join(notes),
        "### Invalidation: statistics per condition (streaming TTFT)\n\n" + table(_stats_rows(rows), STATS_HEADERS),
    ])]


def _cascade_table(rows: list[Row]) -> str:
    head = ("### Warm-up cascade\n\nEach trial's warm-up [A,B] runs right after the previous query in run order, "
            "so it is attributed to that query's condition (the first query and warm-up trials are left out). "
            "After a miss the cache holds [B,Q] and the warm-up recomputes A and B; after a hit it reuses them.\n\n")
    out, skipped = [], []
    for r in rows:
        c, why = cascade(r)
        if c is None:
            skipped.append(f"{r.cell_id}: {why}")
            continue
        m, h = c.summary("miss"), c.summary("hit")
        row = {"Phase": r.phase, "Backend": r.series, "A/B (tok)": r.config,
               "After miss (ms) median [95% CI]": med_ci(m), "n after miss": str(m.n),
               "After hit (ms) median [95% CI]": med_ci(h), "n after hit": str(h.n),
               "Miss / hit": ratio_text(m.median / h.median if m.median and h.median else None)}
        tm, th = c.tokens("miss"), c.tokens("hit")
        if tm or th:
            row["Cached / recomputed tokens after miss"] = _tok(tm)
            row["Cached / recomputed tokens after hit"] = _tok(th)
        out.append(row)
    text = head + (table(out) if out else "No cell has a recorded trial order and warm-up times.")
    if out and not any("Cached / recomputed tokens after miss" in o for o in out):
        text += ("\n\nThe warm-up's cached token count is not recorded (trial fields `warmup_cached_tokens`, "
                 "`warmup_prompt_tokens`), so only its time is shown.")
    if skipped and out:
        text += "\n\nLeft out: " + "; ".join(skipped) + "."
    return text


def _tok(t) -> str:
    if not t:
        return NA
    cached, rec = t
    return f"{ms(cached, 0)} / {ms(rec, 0)}"
