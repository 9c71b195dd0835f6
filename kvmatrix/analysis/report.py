"""report.md and figures from one or more run folders of result cells.

Usage: ``python -m kvmatrix.analysis.report DIR [DIR...] [--out DIR]``
writes ``<out or first DIR>/report.md`` (atomically) and ``figures/*.png`` + ``*.svg``.
"""

from __future__ import annotations

import math
import sys
from datetime import UTC, datetime
from pathlib import Path

from tabulate import tabulate

from kvmatrix.analysis import attribution, calibration, roofline, stats, versions
from kvmatrix.analysis import findings as generated_findings
from kvmatrix.analysis.figures import FigureResult, computation_ms, make_figures
from kvmatrix.analysis.stats import Summary, fmt_p
from kvmatrix.analysis.summary import (
    CLOCK_DROP,
    SLOT_CONDITIONS,
    Evidence,
    NoCellsError,
    Row,
    SlotRow,
    build_evidence,
    cascade,
    device_state,
    experiment_of,
    is_ok,
    load_required,
    order_text,
    outliers,
    phase_key,
    provenance_row,
    recompute_points,
    settings_parity,
    stat,
    unverified_trials,
    verified_count,
)
from kvmatrix.cli_parser import ArgumentParser
from kvmatrix.runners.results import write_text_atomic

__all__ = ["NoCellsError", "main", "render", "write_report"]

MARK = "†"  # rows whose stats include unverified trials
NA = "—"


def write_report(dirs: list[Path], out: Path | None = None) -> Path:
    """Merge the cells of ``dirs``; write report.md and figures/ into ``out`` (default dirs[0])."""
    dirs = [Path(d) for d in dirs]
    cells = load_required(dirs)
    out = Path(out) if out is not None else dirs[0]
    ev = build_evidence(cells)
    figures = make_figures(ev, out / "figures")
    notes = out / "findings.md"  # a hand-written reading of these numbers, kept across regenerations
    findings = notes.read_text() if notes.is_file() else None
    return write_text_atomic(out / "report.md", render(ev, figures, findings))


def render(ev: Evidence, figures: list[FigureResult], findings: str | None = None) -> str:
    """The whole report.md text; ``findings`` (markdown) goes right after the header."""
    gpus = {str(((c.get("provenance") or {}).get("gpu") or {}).get("name")) for c in ev.cells
            if (c.get("provenance") or {}).get("gpu")}
    gpu = bool(gpus) and not all("H100" in g for g in gpus)  # the H100 claims, checked on other GPUs' cells
    parts = [
        _header(ev.cells),
        generated_findings.section(ev.cells, h100=gpu),
        *([findings] if findings else []),
        _figure_list(figures),
        _invalidation_section(ev, figures),
        calibration.section(ev.cells, _table, _embed(figures, "calibration")),
        versions.section(ev.rows, _table, _embed(figures, "versions")),
        attribution.section(ev.cells),
        _scan_section(ev, figures),
        _sweep_section(ev, figures),
        _slot_section(ev, figures),
        _roofline_section(ev),
        _outlier_section(ev.cells),
        _device_section(ev.cells),
        _unverified_section(ev.cells),
        _failed_section(ev.cells),
        _parity_section(ev.cells),
        _provenance_section(ev.cells),
    ]
    return "\n\n".join(p.rstrip() for p in parts if p.strip()) + "\n"


def _table(rows: list[list] | list[dict], headers="keys") -> str:
    return tabulate(rows, headers=headers, tablefmt="github", missingval=NA, disable_numparse=True)


def _header(cells: list[dict]) -> str:
    ok = sum(1 for c in cells if is_ok(c))
    runs = ", ".join(sorted({str(c.get("run")) for c in cells}))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    by_exp: dict[str, int] = {}
    for c in cells:
        if is_ok(c):
            by_exp[experiment_of(c)] = by_exp.get(experiment_of(c), 0) + 1
    exps = ", ".join(f"{k} {v}" for k, v in sorted(by_exp.items())) or "none"
    return (
        "# KV cache invalidation: cache hit vs cache miss TTFT\n\n"
        f"- Runs: {runs}\n"
        f"- Cells: {len(cells)} ({ok} ok, {len(cells) - ok} failed); ok cells per experiment: {exps}\n"
        f"- Generated: {now}\n"
        f"- Statistics: over measured trials (warm-up trials excluded). Medians with 95% percentile-bootstrap "
        f"CIs ({stats.N_BOOT:,} resamples, seed {stats.SEED}); p = two-sided Mann-Whitney U, miss vs hit "
        f"(exact null distribution when the smaller sample has ≤ {stats.EXACT_MAX_N} values and there are no ties, "
        "else the normal approximation with tie and continuity correction); CV = stdev / mean; outliers = "
        f"beyond Tukey fences ({stats.TUKEY_K} IQR), flagged under Outlier trials and never dropped."
    )


# ---------------------------------------------------------------- formatting


def ms(v: float | None, digits: int = 1) -> str:
    if v is None:
        return NA
    return f"{0.0 if round(v, digits) == 0 else v:.{digits}f}"  # no "-0.0"


def med_ci(s: Summary, digits: int = 1) -> str:
    """"median [lo, hi]" of a summary."""
    if s.median is None:
        return NA
    if s.ci is None:
        return ms(s.median, digits)
    return f"{s.median:.{digits}f} [{s.ci[0]:.{digits}f}, {s.ci[1]:.{digits}f}]"


def val_ci(v: float | None, ci: tuple[float, float] | None, digits: int = 1, sign: bool = False) -> str:
    if v is None:
        return NA
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f.format(v) + ("" if ci is None else f" [{f.format(ci[0])}, {f.format(ci[1])}]")


def pct(v: float | None) -> str:
    return NA if v is None else f"{v * 100:.1f}"


def pair(hit: float | None, miss: float | None) -> str:
    """"hit / miss" medians, one decimal."""
    return NA if hit is None and miss is None else f"{ms(hit)} / {ms(miss)}"


def verified(stats_: dict) -> str:
    n = stats_.get("n_trials")
    return NA if n is None else f"{stats_.get('verified_trials', 0)}/{n}"


def trial_counts(r: Row) -> str:
    """Measured + warm-up trials; one figure when hit and miss agree."""
    hit = f"{r.hit.get('n_trials', '?')} + {r.warmups[0]}"
    miss = f"{r.miss.get('n_trials', '?')} + {r.warmups[1]}"
    return hit if hit == miss else f"{hit} / {miss}"


def num(v: float | None, sig: int = 3) -> str:
    """``sig`` significant digits without exponent notation (1,660; 8.52; 0.0533)."""
    if v is None:
        return NA
    if v == 0:
        return "0"
    digits = max(0, sig - 1 - math.floor(math.log10(abs(v))))
    return f"{round(v, digits):,.{digits}f}"


def params_text(p: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if p >= div:
            return f"{p / div:.3g} {unit}"
    return f"{p:.0f}"


def ratio_text(v: float | None) -> str:
    return NA if v is None else f"{v:.1f}×"


def _embed(figures: list[FigureResult], section: str) -> list[str]:
    out = []
    for f in figures:
        if f.section != section:
            continue
        if f.path is None:
            out.append(f"*{f.title}*: skipped ({f.note}).")
        else:
            out.append(f"![{f.title}](figures/{f.path.name})\n\n*{f.title}* — {f.caption} "
                       f"([SVG](figures/{f.svg.name}))")
    return out


def _figure_list(figures: list[FigureResult]) -> str:
    lines = []
    for f in figures:
        if f.path is None:
            lines.append(f"- `{f.name}.png`, `.svg` — {f.title}: skipped ({f.note}).")
        else:
            lines.append(f"- [`{f.path.name}`](figures/{f.path.name}), [`{f.svg.name}`](figures/{f.svg.name}) — "
                         f"{f.title}")
    return ("## Figures\n\n" + "\n".join(lines) + "\n\nRegenerate them from these results alone: "
            "`python -m kvmatrix.analysis.figures DIR [DIR...]`.")


def _order_lines(cells: list[dict]) -> str:
    """The trial order, once when every cell ran the same, else per cell."""
    texts = {str(c.get("cell_id")): order_text(c.get("order") or []) for c in cells}
    if len(set(texts.values())) == 1:
        return f"Trial order (all {len(texts)} cells): {next(iter(texts.values()))}."
    return "Trial order per cell:\n\n" + _table([{"cell": k, "order": v} for k, v in sorted(texts.items())])


# ---------------------------------------------------------------- invalidation


MAIN_HEADERS = [
    "Phase", "Backend", "A/B (tok)", "Hit TTFT (ms) median [95% CI]", "Miss TTFT (ms) median [95% CI]",
    "Miss − hit (ms) [95% CI]", "Degradation (%) median [95% CI]", "p (Mann-Whitney)", "Degradation mean (%)",
    "Miss / floor", "Non-stream TTFT hit / miss (ms)", "Overhead hit / miss (ms)", "Throughput hit (tok/s)",
    "Warm-up before hit / miss (ms)", "Verified hit", "Verified miss", "Trials (measured + warm-up)",
]


def main_row(r: Row) -> list[str]:
    """One row of the main table."""
    c = r.comparison()
    deg = NA if r.degradation_pct is None else f"{r.degradation_pct:+.1f}"
    return [
        r.phase, f"{r.series} {MARK}" if r.unverified else r.series, r.config,
        med_ci(r.summary("hit")), med_ci(r.summary("miss")),
        val_ci(c.diff, c.diff_ci, sign=True), val_ci(c.rel_pct, c.rel_ci, sign=True),
        fmt_p(c.p) + (" (exact)" if c.test and c.test.method == "exact" else ""), deg,
        ratio_text(r.floor_ratio),
        pair(stat(r.hit, "ttft_non_streaming_ms"), stat(r.miss, "ttft_non_streaming_ms")),
        pair(stat(r.hit, "overhead_ms"), stat(r.miss, "overhead_ms")),
        ms(stat(r.hit, "throughput")),
        pair(stat(r.hit, "warmup_time_ms"), stat(r.miss, "warmup_time_ms")),
        verified(r.hit), verified(r.miss), trial_counts(r),
    ]


STATS_HEADERS = ["Phase", "Backend", "A/B (tok)", "Condition", "n", "Median [95% CI] (ms)", "Mean (ms)",
                 "Stdev (ms)", "CV (%)", "p95 (ms)", "Min (ms)", "Max (ms)"]


def _stats_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        for cond in ("hit", "miss"):
            s = r.summary(cond)
            out.append([r.phase, r.series, r.config, cond, str(s.n), med_ci(s), ms(s.mean), ms(s.stdev),
                        pct(s.cv), ms(s.p95), ms(s.min), ms(s.max)])
    return out


def _invalidation_section(ev: Evidence, figures: list[FigureResult]) -> str:
    rows = ev.rows
    head = "## Invalidation: cache hit vs cache miss\n\n"
    if not rows:
        return head + "No ok invalidation cells: nothing to tabulate (see Failed cells).\n\n" + \
            "\n\n".join(_embed(figures, "invalidation"))
    notes = [
        "TTFT columns are the streaming TTFT over measured trials: median with its 95% bootstrap CI. "
        "Miss − hit is the difference of the medians; degradation (median) is that difference over the hit "
        "median; p is the two-sided Mann-Whitney U test of miss vs hit TTFT. Degradation mean is "
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
    parts = [
        head + _order_lines([r.cell for r in rows]),
        _table([main_row(r) for r in rows], MAIN_HEADERS),
        "\n\n".join(notes),
        "### Statistics per condition (streaming TTFT)\n\n" + _table(_stats_rows(rows), STATS_HEADERS),
        _cascade_table(rows),
        *_embed(figures, "invalidation"),
    ]
    sources = {}
    for r in rows:
        for cond in ("hit", "miss"):
            sources.setdefault(computation_ms(getattr(r, cond))[1], set()).add(r.name)
    if any(f.path and f.name == "three_panel" for f in figures) and "non-streaming" in sources:
        names = ", ".join(sorted(sources["non-streaming"]))
        parts.append(f"In the three-panel figure's panel (1), computation is the non-streaming TTFT for {names} "
                     "(no engine prompt time reported); elsewhere it is the engine's prompt time.")
    return "\n\n".join(parts)


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
    text = head + (_table(out) if out else "No cell has a recorded trial order and warm-up times.")
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


# ---------------------------------------------------------------- recompute scan


def _floor_ms(fl) -> str:
    f = fl[0]
    return NA if f is None else f"{f.ms:.2f}" + ("*" if f.device.source == "estimate" else "")


def _scan_section(ev: Evidence, figures: list[FigureResult]) -> str:
    head = "## Recompute scan: TTFT vs recomputed tokens\n\n"
    parts = []
    if ev.scan:
        cells = list({p.cell_id: p.cell for p in ev.scan}.values())
        rows = [{
            "Backend": p.series, "Kept (tok)": _s(p.kept), "Recomputed (tok)": _s(p.recomputed), "n": str(p.summary.n),
            "TTFT (ms) median [95% CI]": med_ci(p.summary), "Mean (ms)": ms(p.summary.mean),
            "Stdev (ms)": ms(p.summary.stdev), "CV (%)": pct(p.summary.cv), "p95 (ms)": ms(p.summary.p95),
            "Floor (ms)": _floor_ms(p.floor),
            "TTFT / floor": ratio_text(_ratio(p.summary.median, p.floor[0])), "Verified": p.verified,
        } for p in ev.scan]
        parts += [head + _order_lines(cells), _table(rows)]
    else:
        parts.append(head + "No ok recompute_scan cells; the fit below uses the invalidation trials only.")
    points, skipped = recompute_points(ev.cells)
    if points:
        fits = []
        for name in dict.fromkeys(p.series for p in points):
            pts = [p for p in points if p.series == name]
            fit = stats.linear_fit([p.recomputed for p in pts], [p.ttft_ms for p in pts])
            fits.append({
                "Backend": name, "Trials": str(len(pts)),
                "From": ", ".join(f"{src} {sum(1 for p in pts if p.source == src)}"
                                  for src in ("hit", "miss", "scan") if any(p.source == src for p in pts)),
                "Slope (ms/token)": NA if fit is None else f"{fit.slope:.4g}",
                "Intercept (ms)": NA if fit is None else f"{fit.intercept:.3g}",
                "R²": NA if fit is None or fit.r2 is None else f"{fit.r2:.3f}",
            })
        parts.append("Least-squares fit of TTFT against recomputed tokens (prompt − engine-reported cached), "
                     "every measured, engine-verified trial; one line per backend, model and TTFT-relevant settings:\n\n" + _table(fits))
    if skipped:
        parts.append(f"{skipped} measured trial(s) left out of the fit: no engine-reported cached-token count, "
                     "no prompt size, or a cached count that failed verification (see Unverified trials).")
    parts += _embed(figures, "recompute_scan")
    return "\n\n".join(parts)


def _s(v) -> str:
    return NA if v is None else str(v)


def _ratio(v: float | None, f: roofline.Floor | None) -> float | None:
    return None if v is None or f is None or f.ms <= 0 else v / f.ms


# ---------------------------------------------------------------- batch sweep


def _sweep_section(ev: Evidence, figures: list[FigureResult]) -> str:
    head = "## Batch sweep: cache-miss TTFT vs n_batch\n\n"
    if not ev.sweep:
        return "\n\n".join([head + "No ok batch_sweep cells.", *_embed(figures, "batch_sweep")])
    refs = {}
    for p in ev.sweep:  # per series, the largest n_batch is the reference
        if p.n_batch is not None and (p.series not in refs or p.n_batch > refs[p.series].n_batch):
            refs[p.series] = p
    rows = []
    for p in ev.sweep:
        ref = refs.get(p.series)
        cmp_ = None
        if ref is not None and ref is not p:
            cmp_ = stats.compare([t.get("ttft_ms") for t in ref.trials], [t.get("ttft_ms") for t in p.trials])
        rows.append({
            "Backend": p.series, "n_batch": _s(p.n_batch), "n_ubatch": _s(p.n_ubatch), "n": str(p.summary.n),
            "Miss TTFT (ms) median [95% CI]": med_ci(p.summary), "Mean (ms)": ms(p.summary.mean),
            "Stdev (ms)": ms(p.summary.stdev), "CV (%)": pct(p.summary.cv), "p95 (ms)": ms(p.summary.p95),
            "vs largest n_batch (ms) [95% CI]": "reference" if ref is p else
            (NA if cmp_ is None else val_ci(cmp_.diff, cmp_.diff_ci, sign=True)),
            "p (Mann-Whitney)": NA if cmp_ is None else fmt_p(cmp_.p) + (
                " (exact)" if cmp_.test and cmp_.test.method == "exact" else ""),
            "Floor (ms)": _floor_ms(p.floor), "Miss / floor": ratio_text(_ratio(p.summary.median, p.floor[0])),
            "Verified": p.verified,
        })
    cells = [p.cell for p in ev.sweep]
    note = ("n_batch and n_ubatch are the engine's effective values (requested where the engine reports none). "
            "\"vs largest n_batch\" is the difference of medians to the same backend's largest n_batch, with its "
            "bootstrap CI and the Mann-Whitney p. The floor does not depend on n_batch: a gap to it that shrinks "
            "with n_batch is batching overhead. Floors marked * use an estimated CPU peak.")
    return "\n\n".join([head + _order_lines(cells), _table(rows), note, *_embed(figures, "batch_sweep")])


# ---------------------------------------------------------------- slot eviction


def _yes_no(v: bool | None) -> str:
    return NA if v is None else ("yes" if v else "no")


def _cached(c) -> str:
    """"cached / prompt" medians of the timed query (the engine's cache_n)."""
    if c is None or not c.trials:
        return NA
    return f"{ms(c.median('cached_tokens'), 0)} / {ms(c.median('prompt_tokens'), 0)}"


def refusal_text(c) -> str:
    """Why a condition's trials were refused: the prompt, its tokens and the slot's context."""
    if c is None or not c.refused:
        return ""
    r = c.refused[0]
    what = f"{r.get('prompt') or 'a prompt'}, {_s(r.get('prompt_tokens'))} tok ≥ slot {_s(r.get('n_ctx'))}"
    return f"refused {len(c.refused)}× ({what})"


def _ttft_or_refused(c) -> str:
    """Median TTFT with its CI; the refusals when none (or not all) of the trials could run."""
    if c is None:
        return NA
    if not c.trials:
        return refusal_text(c) or NA
    return med_ci(c.summary()) + (f"; {refusal_text(c)}" if c.refused else "")


def _slot_main_row(r: SlotRow) -> dict:
    hit, miss = r.conditions.get("cache_hit"), r.conditions.get("cache_miss")
    v, n = r.verified
    return {
        "Backend": r.series, "A/B (tok)": r.config, "N slots": _s(r.n_parallel),
        "Per-slot ctx (tok)": _s(r.slot_ctx), "[A,B,Q] (tok)": _s(r.prompts.get("[A,B,Q]")),
        "[A,B,Q] fits": _yes_no(r.fits.get("[A,B,Q]")),
        "Hit TTFT (ms) median [95% CI]": _ttft_or_refused(hit), "Miss TTFT (ms) median [95% CI]": _ttft_or_refused(miss),
        "cache_n / prompt hit": _cached(hit), "cache_n / prompt miss": _cached(miss),
        "Verified": f"{v}/{n}", "Refused trials": str(r.refused),
    }


def _slot_condition_rows(rows: list[SlotRow]) -> list[dict]:
    out = []
    for r in rows:
        for name, c in r.conditions.items():
            v, n = c.verified
            slots = "refused" if not c.trials else (
                f"{_slots(c.slots('warmup_id_slot'))} → {_slots(c.slots('id_slot'))}")
            out.append({
                "Backend": r.series, "A/B (tok)": r.config, "N": _s(r.n_parallel), "Condition": name,
                "Slots warm-up → query": slots, "n": str(c.summary().n),
                "TTFT (ms) median [95% CI]": _ttft_or_refused(c),
                "cache_n / prompt": _cached(c), "Expected cached": ms(c.median("expected_cached_tokens"), 0),
                "Verified": f"{v}/{n}",
                "Re-warm [A,B] (ms) median": ms(c.summary("rewarm_time_ms").median),
                "Re-warm cache_n": ms(c.median("rewarm_cached_tokens"), 0),
            })
    return out


def _slots(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) if ids else NA


def _slot_section(ev: Evidence, figures: list[FigureResult]) -> str:
    head = "## Slot eviction: llama-server with N slots at one total context\n\n"
    if not ev.slots:
        return "\n\n".join([head + "No ok slot_eviction cells.", *_embed(figures, "slot_eviction")])
    rows = ev.slots
    first = rows[0].cell.get("slot_eviction") or {}
    conditions = first.get("conditions") or {}
    unified = sorted({r.kv_unified for r in rows if r.kv_unified is not None})
    notes = [
        "The total context n_ctx is the same in every cell; llama-server splits it across its N slots "
        + ("(non-unified KV cache: each slot gets n_ctx / N, rounded up to a multiple of 256 by current builds). "
           if unified == [False] else "(as its start-up log reports `kv_unified`; see Settings parity). ")
        + "Per-slot ctx is read back from the engine (`/slots` `n_ctx`). A prompt fits when it is shorter than "
        "its slot's context; llama-server refuses a longer one (HTTP 400 `exceed_context_size_error`) and the "
        "trial is counted under Refused instead of being timed. cache_n / prompt: medians of the engine's "
        "`timings.cache_n` and the prompt tokens of the timed query; Verified: measured trials whose cache_n "
        "matched the expectation computed per slot from what each slot held.",
        "Conditions (interleaved round by round):\n\n" + "\n".join(
            f"- `{k}` ({SLOT_CONDITIONS.get(k, k)}): {v}" for k, v in conditions.items()),
        "Re-warm: the [A,B] request right after the timed query — what getting the prefix back costs after that "
        "query; after a miss on the only slot it recomputes [A,B] (the \"miss warm-up\"), with N ≥ 2 and the "
        "server routing, the miss went to another slot and [A,B] is still cached.",
    ]
    return "\n\n".join([
        head + _order_lines([r.cell for r in rows]),
        _table([_slot_main_row(r) for r in rows]),
        *notes,
        "### Every condition\n\n" + _table(_slot_condition_rows(rows)),
        *_embed(figures, "slot_eviction"),
    ])


# ---------------------------------------------------------------- roofline


def _roofline_section(ev: Evidence) -> str:
    head = (
        "## Roofline floor\n\n"
        "The least time the cell's device could take to prefill the tokens a query recomputes "
        "(r = prompt − cached tokens, c = cached tokens; medians over the condition's measured trials):\n\n"
        "- FLOPs = 2 · params · r + 4 · n_layers · hidden · r · (c + (r + 1) / 2) — every weight once per token, "
        "plus causal attention (QKᵀ and A·V, 2 · hidden · p FLOPs each for a token at position p, per layer);\n"
        "- bytes = params · bytes per weight (f32 4, f16/bf16 2, q8_0 1.0625, q4_0 0.5625), weights read once, "
        "KV-cache traffic ignored;\n"
        "- floor = max(FLOPs / peak FLOP/s, bytes / peak bandwidth).\n\n"
        "Peaks: GPU by name (dense fp16/bf16 tensor-core peak and HBM bandwidth from the data sheets: "
        + ", ".join(f"{p.name} {p.flops / 1e12:.0f} TFLOP/s, {p.bandwidth / 1e12:.2f} TB/s"
                    for _, p in roofline.GPU_PEAKS)
        + "). CPU runs use `provenance.cpu_peak_gflops` / `cpu_peak_gbps` when the runner measured them, else "
        f"an **estimate** (marked *): {roofline.CPU_GFLOPS_PER_CORE:.0f} GFLOP/s per prompt-processing thread "
        "(3.5 GHz × 2 FMA × 16 fp32 lanes × 2; half without AVX-512) and "
        f"{roofline.CPU_GBPS_PER_CORE:.0f} GB/s per thread. The estimate errs fast, so the floor errs low. "
        "2 · params · r counts the embedding and output matrices for every token, which an engine computing "
        "logits for the last token only does not do: for models whose embeddings are a large share of the "
        "parameters the floor is slightly high.\n\n"
    )
    rows, missing, below = [], [], []
    entries = [(r.cell_id, "miss", r.cell, r.floor, r.summary("miss").median) for r in ev.rows]
    entries += [(p.cell_id, f"scan kept={p.kept}", p.cell, p.floor, p.summary.median) for p in ev.scan]
    entries += [(p.cell_id, "miss", p.cell, p.floor, p.summary.median) for p in ev.sweep]
    for cid, cond, _, (f, why), achieved in entries:
        if f is None:
            missing.append(f"{cid} ({cond}): {why}")
            continue
        dev = f.device
        rows.append({
            "Cell": cid, "Query": cond,
            "Device (peak)": f"{dev.name}{' *' if dev.source == 'estimate' else ''} "
                             f"({dev.flops / 1e12:.3g} TFLOP/s, {dev.bandwidth / 1e9:.4g} GB/s)",
            "Model": f"{params_text(f.shape.params)} params, {f.shape.quant}",
            "Recomputed / cached (tok)": f"{f.recomputed:.0f} / {f.cached:.0f}",
            "GFLOP (of which attention)": f"{num(f.flops / 1e9)} ({num(f.attention_flops / 1e9)})",
            "MB read": num(f.bytes / 1e6),
            "Compute / memory time (ms)": f"{num(f.compute_ms)} / {num(f.memory_ms)}",
            "Floor (ms)": f"{num(f.ms)} ({f.bound})",
            "Achieved median (ms)": ms(achieved), "Achieved / floor": ratio_text(_ratio(achieved, f)),
            "Notes": "; ".join(n for n in f.notes if "estimated" not in n) or NA,
        })
        if (q := _ratio(achieved, f)) is not None and q < 1:
            below.append(f"{cid} ({cond})")
    text = head + (_table(rows) if rows else "No floor could be computed.")
    if below:
        text += ("\n\n**Faster than the floor** (achieved / floor < 1), so the floor's inputs are wrong for: "
                 + "; ".join(below) + ". Check the model shape and the device peak (an estimated CPU peak "
                 "can be low for a wide-vector or many-core CPU: have the runner record `cpu_peak_gflops`).")
    if missing:
        text += "\n\nNo floor: " + "; ".join(missing) + "."
    return text


# ---------------------------------------------------------------- outliers, device


def _outlier_section(cells: list[dict]) -> str:
    found = outliers(cells)
    head = "## Outlier trials\n\n"
    if not found:
        return head + f"None: no measured TTFT beyond the Tukey fences ({stats.TUKEY_K} IQR) of its condition."
    rows = [{"cell": o.cell_id, "condition": o.condition, "trial": _s(o.trial), "TTFT (ms)": ms(o.value),
             "fences (ms)": f"[{o.low:.1f}, {o.high:.1f}]"} for o in found]
    return head + (f"Measured trials whose TTFT lies beyond the Tukey fences ({stats.TUKEY_K} IQR) of their "
                   "condition. They are flagged here and kept in every statistic above.\n\n") + _table(rows)


def _device_section(cells: list[dict]) -> str:
    head = "## Device state (NVML)\n\n"
    states = [device_state(c) for c in sorted(cells, key=lambda c: (phase_key(c.get("phase")), str(c.get("cell_id"))))
              if is_ok(c)]
    kw = _keep_warm_note(states)
    if not states or not any(s.has_data for s in states):
        gpu = [c for c in cells if is_ok(c) and roofline.runs_on_gpu(c)]
        if gpu:
            return head + (f"No NVML samples recorded, although {len(gpu)} ok cell(s) ran on a GPU "
                           "(trial field `device`, cell field `device_settle`)." + kw)
        return head + "No NVML data (CPU run): no cell recorded device samples." + kw
    rows, drops = [], []
    for s in states:
        if not s.has_data:
            gpu = roofline.runs_on_gpu(next(c for c in cells if str(c.get("cell_id")) == s.cell_id))
            rows.append({"cell": s.cell_id, "SM clock min–max (MHz)":
                         "no NVML samples recorded" if gpu else "no NVML data (CPU run)"})
            continue
        sm, mem, pw, tc = (s.range(k) for k in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c"))
        rows.append({
            "cell": s.cell_id, "SM clock min–max (MHz)": _rng(sm),
            "SM clock in settles min–max (MHz)": _rng(s.settle_range("sm_clock_mhz")),
            "Memory clock min–max (MHz)": _rng(mem),
            "Power max (W)": ms(pw and pw[1]), "Temperature max (°C)": ms(tc and tc[1], 0),
            "Timed samples": str(len(s.timed)), "Settle samples": str(len(s.settle)),
            "Timed requests below 90% of max SM clock": str(len(s.drops)),
            "Keep-warm": keep_warm_text(s.keep_warm),
        })
        drops += [{"cell": s.cell_id, "condition": cond, "trial": _s(trial), "SM clock (MHz)": f"{sm_:.0f}",
                   "of cell max": f"{frac * 100:.0f}%"} for cond, trial, sm_, frac in s.drops]
    text = head + ("SM clock in settles: the NVML sample at the end of each settle pause, right before the "
                   "timed request (with keep-warm the pause is spent in device work, `--keep-warm`).\n\n") + _table(rows)
    if drops:
        text += (f"\n\nClock drops: timed requests whose SM clock was below {CLOCK_DROP:.0%} of the highest SM "
                 "clock seen in the cell (timed and settle samples); their TTFT may be inflated.\n\n" + _table(drops))
    else:
        text += f"\n\nNo timed request ran below {CLOCK_DROP:.0%} of its cell's highest SM clock."
    return text


def keep_warm_text(kw: dict | None) -> str:
    """Keep-warm of one cell: off, active (how much device work), or requested but inactive (why)."""
    if not kw or not kw.get("requested"):
        return "off"
    if kw.get("active"):
        return f"active: {kw.get('settles', '?')} settles, {kw.get('busy_s', '?')} s busy"
    return f"requested, inactive: {kw.get('reason') or 'no reason recorded'}"


def _keep_warm_note(states) -> str:
    """For a run without NVML data: what keep-warm did where it was requested."""
    texts = sorted({keep_warm_text(s.keep_warm) for s in states if s.keep_warm and s.keep_warm.get("requested")})
    return (" Keep-warm: " + "; ".join(texts) + ".") if texts else ""


def _rng(r) -> str:
    return NA if r is None else f"{r[0]:.0f}–{r[1]:.0f}"


# ---------------------------------------------------------------- unverified, failed, parity, provenance


def _unverified_section(cells: list[dict]) -> str:
    found = [u for c in cells if is_ok(c) for u in unverified_trials(c)]
    counts = [verified_count(c) for c in cells if is_ok(c)]
    v, n = sum(a for a, _ in counts), sum(b for _, b in counts)
    head = f"## Unverified trials\n\nVerified measured trials over all ok cells: {v}/{n}.\n\n"
    if not found:
        return head + "None unverified: every measured trial's cached-token count matched the expectation."
    rows = [{
        "cell": u.cell_id, "condition": u.condition.replace("cache_", ""), "trial": u.trial,
        "cached tokens": "not reported" if u.cached_tokens is None else u.cached_tokens,
        "expected cached": u.expected_cached_tokens, "granularity": u.cache_granularity,
    } for u in found]
    return head + ("Measured trials whose engine-reported cached tokens did not check out. "
                   "They are included in the statistics above (rows marked " + MARK + ").\n\n") + _table(rows)


def _failed_section(cells: list[dict]) -> str:
    failed = [c for c in cells if not is_ok(c)]
    head = "## Failed cells\n\n"
    if not failed:
        return head + "None."
    rows = [{"cell": c.get("cell_id"), "status": c.get("status"), "error": c.get("error") or "(no message)"}
            for c in sorted(failed, key=lambda c: (phase_key(c.get("phase")), str(c.get("cell_id"))))]
    return head + _table(rows)


def _fmt(v) -> str:
    if v is None:
        return NA
    return str(v).lower() if isinstance(v, bool) else str(v)


def _parity_section(cells: list[dict]) -> str:
    par = settings_parity(cells)
    out = ["## Settings parity"]
    if not par.table:
        out.append("No ok cells to compare.")
    elif not par.keys:
        out.append(f"All {par.compared} effective runtime settings reported by more than one cell "
                   "are equal across the ok cells.")
    else:
        out.append(f"Effective runtime settings that differ between ok cells ({len(par.keys)} of "
                   f"{par.compared} compared; {NA} = not reported by that engine):")
        out.append(_table([[cid, *(_fmt(vals[k]) for k in par.keys)] for cid, vals in par.table.items()],
                          ["cell", *par.keys]))
    if par.mismatches:
        out.append("Requested vs effective mismatches:")
        out.append(_table([{"cell": cid, "mismatch": text} for cid, text in par.mismatches]))
    elif par.table:
        out.append("Requested vs effective: no mismatches reported.")
    return "\n\n".join(out)


def _provenance_section(cells: list[dict]) -> str:
    rows = [provenance_row(c) for c in sorted(cells, key=lambda c: (phase_key(c.get("phase")), str(c.get("cell_id"))))]
    return "## Provenance\n\n" + _table(rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; one-line error and exit 2 when a folder is missing or there are no cells."""
    ap = ArgumentParser(prog="python -m kvmatrix.analysis.report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run folder(s) holding cell *.json")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    args = ap.parse_args(argv)
    missing = [d for d in args.dirs if not d.exists()]
    if missing:  # not "no result cells": a mistyped folder is not an empty run
        print(f"kvmatrix: error: no result cells in {missing[0]}: no such folder; pass an existing run folder that "
              "holds the cell *.json (results/<run-name>)", file=sys.stderr)
        return 2
    try:
        path = write_report(args.dirs, args.out)
    except NoCellsError as exc:
        print(f"kvmatrix: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
