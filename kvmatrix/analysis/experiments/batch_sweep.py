"""The batch_sweep experiment (the miss at several n_batch values): ``SweepPoint`` per backend and
n_batch, the report section (each n_batch against the series' largest) and fig5."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kvmatrix.analysis import plot, roofline, stats
from kvmatrix.analysis.figure import FigureResult, FigureSpec, embed
from kvmatrix.analysis.fmt import NA, med_ci, ms, na, p_text, pct, ratio_text, table, val_ci
from kvmatrix.analysis.labels import series_names
from kvmatrix.analysis.load import ok_cells
from kvmatrix.analysis.trials import MeasuredTrials, order_lines
from kvmatrix.runners.document import CellDoc, measured

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments import Evidence

NAME = "batch_sweep"


@dataclass
class SweepPoint(MeasuredTrials):
    """The cache-miss TTFT of one batch_sweep cell (one backend at one n_batch)."""

    cell_id: str
    series: str
    n_batch: int | None
    n_ubatch: int | None
    trials: list[dict] = field(repr=False)  # measured miss trials
    cell: CellDoc = field(default_factory=CellDoc, repr=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)


def batch_value(cell: CellDoc, key: str) -> int | None:
    """n_batch / n_ubatch as the engine reported it, else requested, else the sweep's value."""
    sweep = cell.sweep.to_dict() if cell.sweep is not None else {}
    for src in (cell.runtime.effective, cell.runtime.requested, sweep):
        v = src.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def build(cells) -> list[SweepPoint]:
    ok = ok_cells(cells, NAME)
    names = series_names(ok, ("phase", "model", "config", "run"))
    out = [SweepPoint(str(c.cell_id), name, batch_value(c, "n_batch"), batch_value(c, "n_ubatch"),
                      measured(c.trials("cache_miss")), c)
           for c, name in zip(ok, names, strict=True)]
    out.sort(key=lambda p: (p.series, p.n_batch if p.n_batch is not None else math.inf))
    return out


def sections(ev: Evidence, figures: list[FigureResult]) -> list[str]:
    head = "## Batch sweep: cache-miss TTFT vs n_batch\n\n"
    if not ev.sweep:
        return ["\n\n".join([head + "No ok batch_sweep cells.", *embed(figures, NAME)])]
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
            "Backend": p.series, "n_batch": na(p.n_batch), "n_ubatch": na(p.n_ubatch), "n": str(p.summary.n),
            "Miss TTFT (ms) median [95% CI]": med_ci(p.summary), "Mean (ms)": ms(p.summary.mean),
            "Stdev (ms)": ms(p.summary.stdev), "CV (%)": pct(p.summary.cv), "p95 (ms)": ms(p.summary.p95),
            "vs largest n_batch (ms) [95% CI]": "reference" if ref is p else
            (NA if cmp_ is None else val_ci(cmp_.diff, cmp_.diff_ci, sign=True)),
            "p (Mann-Whitney)": NA if cmp_ is None else p_text(cmp_),
            "Floor (ms)": roofline.floor_text(p.floor),
            "Miss / floor": ratio_text(roofline.ratio(p.summary.median, p.floor[0])),
            "Verified": p.verified,
        })
    cells = [p.cell for p in ev.sweep]
    note = ("n_batch and n_ubatch are the engine's effective values (requested where the engine reports none). "
            "\"vs largest n_batch\" is the difference of medians to the same backend's largest n_batch, with its "
            "bootstrap CI and the Mann-Whitney p. The floor does not depend on n_batch: a gap to it that shrinks "
            "with n_batch is batching overhead. Floors marked * use an estimated CPU peak.")
    return ["\n\n".join([head + order_lines(cells), table(rows), note, *embed(figures, NAME)])]


# ---------------------------------------------------------------- fig5: miss TTFT vs n_batch


def fig5_miss_ttft_vs_nbatch(ev: Evidence) -> Figure | str:
    """Cache-miss TTFT (median, 95 % CI) against n_batch per backend, log2 x axis; dashed: roofline floor."""
    pts = [p for p in ev.sweep if p.n_batch and p.summary.median is not None]
    if not pts:
        return "no ok batch_sweep cell with cache-miss TTFT trials"
    series = list(dict.fromkeys(p.series for p in pts))
    fig, ((ax,),) = plot.grid(1, 10.0, 5.0)
    handles = []
    floors = False
    for i, name in enumerate(series):
        color = plot.series_color(i, len(series))
        sel = sorted((p for p in pts if p.series == name), key=lambda p: p.n_batch)
        x = [p.n_batch for p in sel]
        y = [p.summary.median for p in sel]
        err = [[e[0][0] for e in (plot.err(p.summary) for p in sel)], [e[1][0] for e in (plot.err(p.summary) for p in sel)]]
        ax.errorbar(x, y, yerr=err, color=color, marker="o", capsize=3, linewidth=1.2, markersize=5)
        handles.append(Line2D([], [], color=color, marker="o", label=name))
        fl = [(p.n_batch, f.ms) for p in sel if (f := p.floor[0]) is not None]
        if fl:
            floors = True
            ax.plot([a for a, _ in fl], [b for _, b in fl], color=color, linestyle="--", linewidth=0.9)
    if floors:
        handles.append(Line2D([], [], color="grey", linestyle="--", label="roofline floor (same colour)"))
    ax.set_xscale("log", base=2)
    xs = sorted({p.n_batch for p in pts})
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("n_batch (tokens per logical batch, log2 scale; n_ubatch as recorded per cell)")
    ax.set_ylabel("Cache-miss streaming TTFT, median (ms)")
    ax.grid(alpha=0.3)
    plot.finish(fig, f"Miss TTFT vs batch size\npoints = median, {plot.CI_NOTE}", handles, title_size=10)
    return fig


# ---------------------------------------------------------------- fig6: slot eviction


FIGURES = (
    FigureSpec("fig5_miss_ttft_vs_nbatch", "Miss TTFT vs n_batch", NAME, fig5_miss_ttft_vs_nbatch,
               "Median cache-miss TTFT per n_batch and backend, with the roofline floor dashed."),
)
