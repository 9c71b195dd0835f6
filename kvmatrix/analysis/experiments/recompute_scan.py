"""The recompute_scan experiment (keep k tokens of [A,B], recompute the rest): ``ScanPoint`` per
kept/recomputed split, every trial's recomputed tokens vs TTFT (``TrialPoint``, from the invalidation and
the scan cells) with a least-squares line per series, the report section and fig2."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kvmatrix.analysis import plot, roofline, stats
from kvmatrix.analysis.figure import FigureResult, FigureSpec, embed
from kvmatrix.analysis.fmt import NA, finite, med_ci, ms, na, pct, ratio_text, table
from kvmatrix.analysis.labels import series_names
from kvmatrix.analysis.load import ok_cells
from kvmatrix.analysis.trials import CONDITION_NAMES, MeasuredTrials, order_lines, trial_tokens
from kvmatrix.runners.document import CellDoc, measured
from kvmatrix.runners.document import ScanPoint as ScanRecord

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments import Evidence

NAME = "recompute_scan"


@dataclass
class ScanPoint(MeasuredTrials):
    """One kept/recomputed split of a recompute_scan cell."""

    cell_id: str
    series: str
    kept: int | None
    recomputed: int | None
    trials: list[dict] = field(repr=False)  # measured
    cell: CellDoc = field(default_factory=CellDoc, repr=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)


def build(cells) -> list[ScanPoint]:
    ok = ok_cells(cells, NAME)
    names = series_names(ok, ("phase", "model", "config", "run", "cell"))
    out = []
    for c, name in zip(ok, names, strict=True):
        for p in c.scan or []:
            if not isinstance(p, ScanRecord):
                continue
            out.append(ScanPoint(str(c.cell_id), name, p.kept_tokens, p.recomputed_tokens, measured(p.trials), c))
    out.sort(key=lambda p: (p.series, p.recomputed if p.recomputed is not None else math.inf))
    return out


# ---------------------------------------------------------------- every trial: recomputed tokens vs TTFT


@dataclass(frozen=True)
class TrialPoint:
    series: str
    source: str  # "hit" | "miss" | "scan"
    recomputed: int
    ttft_ms: float
    cell_id: str


def recompute_points(cells) -> tuple[list[TrialPoint], int]:
    """(points, trials left out) over the measured trials of invalidation (hit and miss) and
    recompute_scan cells, one series per backend, model and TTFT-relevant settings; a trial
    without an engine-reported cached count, or whose count was not verified, is left out."""
    ok = [c for c in ok_cells(cells) if c.experiment in ("invalidation", NAME)]
    names = series_names(ok, ("phase", "model", "settings"))
    points, skipped = [], 0
    for c, name in zip(ok, names, strict=True):
        for cond, trials in c.trial_blocks():
            source = CONDITION_NAMES.get(cond, "scan")
            for t in measured(trials):
                toks = trial_tokens(t, allow_expected=False)
                y = finite(t.get("ttft_ms"))
                if toks is None or y is None or t.get("cache_verified") is False:
                    skipped += 1
                    continue
                points.append(TrialPoint(name, source, toks[0], y, str(c.cell_id)))
    return points, skipped


# ---------------------------------------------------------------- report section


def sections(ev: Evidence, figures: list[FigureResult]) -> list[str]:
    head = "## Recompute scan: TTFT vs recomputed tokens\n\n"
    parts = []
    if ev.scan:
        cells = list({p.cell_id: p.cell for p in ev.scan}.values())
        rows = [{
            "Backend": p.series, "Kept (tok)": na(p.kept), "Recomputed (tok)": na(p.recomputed), "n": str(p.summary.n),
            "TTFT (ms) median [95% CI]": med_ci(p.summary), "Mean (ms)": ms(p.summary.mean),
            "Stdev (ms)": ms(p.summary.stdev), "CV (%)": pct(p.summary.cv), "p95 (ms)": ms(p.summary.p95),
            "Floor (ms)": roofline.floor_text(p.floor),
            "TTFT / floor": ratio_text(roofline.ratio(p.summary.median, p.floor[0])), "Verified": p.verified,
        } for p in ev.scan]
        parts += [head + order_lines(cells), table(rows)]
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
                     "every measured, engine-verified trial; one line per backend, model and TTFT-relevant settings:\n\n" + table(fits))
    if skipped:
        parts.append(f"{skipped} measured trial(s) left out of the fit: no engine-reported cached-token count, "
                     "no prompt size, or a cached count that failed verification (see Unverified trials).")
    parts += embed(figures, "recompute_scan")
    return ["\n\n".join(parts)]


# ---------------------------------------------------------------- fig2: recomputed tokens vs TTFT


SOURCE_MARKERS = {"hit": ("o", "invalidation, cache hit"), "miss": ("s", "invalidation, cache miss"),
                  "scan": ("^", "recompute scan")}


def fig2_ttft_vs_recomputed(ev: Evidence) -> Figure | str:
    """Every measured trial: recomputed tokens vs TTFT, per backend, with a least-squares line."""
    points, _ = recompute_points(ev.cells)
    if not points:
        return ("no measured trial of an invalidation or recompute_scan cell has prompt tokens and an "
                "engine-reported cached-token count")
    series = list(dict.fromkeys(p.series for p in points))
    fig, ((ax,),) = plot.grid(1, 10.5, 5.2)
    handles = []
    xmax = max(p.recomputed for p in points)
    for i, name in enumerate(series):
        color = plot.series_color(i, len(series))
        pts = [p for p in points if p.series == name]
        for source, (marker, _) in SOURCE_MARKERS.items():
            sel = [p for p in pts if p.source == source]
            if sel:
                ax.scatter([p.recomputed for p in sel], [p.ttft_ms for p in sel], s=18, marker=marker,
                           facecolors="none" if source == "hit" else color, edgecolors=color,
                           linewidths=0.8, alpha=0.75)
        fit = stats.linear_fit([p.recomputed for p in pts], [p.ttft_ms for p in pts])
        if fit is None:
            label = f"{name}: no fit (one recomputed-token value), n = {len(pts)}"
        else:
            ax.plot([0, xmax * 1.02], [fit.intercept, fit.intercept + fit.slope * xmax * 1.02], color=color,
                    linewidth=1.2, linestyle=plot.series_linestyle(i))
            r2 = "n/a" if fit.r2 is None else f"{fit.r2:.3f}"
            label = (f"{name}: slope {fit.slope:.3g} ms/token, intercept {fit.intercept:.3g} ms,\n"
                     f"R² = {r2}, n = {fit.n}")
        handles.append(Line2D([], [], color=color, marker="o", linewidth=1.2, linestyle=plot.series_linestyle(i), label=label))
    handles += [Line2D([], [], color="grey", marker=m, linestyle="none", markerfacecolor="none" if s == "hit"
                       else "grey", label=lab) for s, (m, lab) in SOURCE_MARKERS.items()
                if any(p.source == s for p in points)]
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("Recomputed tokens (prompt tokens − engine-reported cached tokens)")
    ax.set_ylabel("Streaming TTFT (ms)")
    ax.grid(alpha=0.3)
    plot.finish(fig, "TTFT grows with the tokens the engine must recompute\nevery measured trial (warm-up trials "
                     "excluded); lines = least-squares fit per backend", handles, title_size=10)
    return fig


FIGURES = (
    FigureSpec("fig2_ttft_vs_recomputed", "TTFT vs recomputed tokens, every trial", NAME, fig2_ttft_vs_recomputed,
               "All measured trials of invalidation (hit and miss) and recompute_scan cells, with a least-squares "
               "line per backend."),
)
