"""The report's ONE summary figure, ``fig0_summary``, drawn from the summary model only
(``kvmatrix.analysis.summary``: ``headline`` pairs of the evidence's ``summary`` rows).

Per model a panel (small multiples, wrapped into rows): x = the interface / series, a bar per A/B config =
miss − hit difference of the median streaming TTFTs in ms with its bootstrap CI, labelled with the same
difference in % of the hit; under each series its hit TTFT (the fixed per-request cost that the % divides
by), so a large % on a fast engine and a small % on a slow one read as what they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvmatrix.analysis import plot, summary
from kvmatrix.analysis.figure import FigureSpec
from kvmatrix.analysis.fmt import signed_pct
from kvmatrix.analysis.labels import config_key, phase_key, settings_text

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments import Evidence
    from kvmatrix.analysis.summary import SummaryRow

SECTION = "summary"  # report.md embeds it with figure.embed(figures, "summary")
MAX_SERIES = 8  # series per panel; a model with more is split by phase, then into chunks
SERIES_IN = 0.45  # inches per series, plus BAR_IN per config
BAR_IN = 0.27
PANEL_H = 3.9
TITLE = "What a cache miss costs: miss − hit TTFT (ms)"  # one line: the bars stay on the first screen
NO_PAIRS = "no ok invalidation cell with both cache-hit and cache-miss TTFT trials"


@dataclass
class Bar:
    hit: SummaryRow
    miss: SummaryRow
    name: str  # series name within the model


@dataclass
class Panel:
    title: str
    bars: list[Bar]


def _names(pairs: list[tuple], cells: dict) -> list[str]:
    """Phase and API path, plus what tells apart series sharing them (settings, release, runtime, run)."""
    attrs = (lambda m: settings_text(c) if (c := cells.get((m.run, m.cell_id))) is not None else None,
             lambda m: m.release or None, lambda m: m.runtime_kind or None, lambda m: m.run or None)
    bases = [f"{m.phase} {m.api}" for _, m in pairs]
    names = list(bases)
    for base in dict.fromkeys(bases):
        idx = [i for i, b in enumerate(bases) if b == base]
        values = [[f(pairs[i][1]) for f in attrs] for i in idx]
        differing = [k for k in range(len(attrs)) if len({v[k] for v in values}) > 1]
        for i, v in zip(idx, values, strict=True):
            extra = [str(v[k]) for k in differing if v[k] is not None]
            names[i] = f"{base} ({', '.join(extra)})" if extra else base
    keys = [(n, m.model, m.a, m.b) for n, (_, m) in zip(names, pairs, strict=True)]
    if len(set(keys)) < len(keys):  # still not unique: the cell id says which
        names = [f"{n} [{m.cell_id}]" for n, (_, m) in zip(names, pairs, strict=True)]
    return names


def panels(ev: Evidence) -> list[Panel]:
    """One panel per model (in the order of the headline table); a model with more than MAX_SERIES series
    split by phase, a phase that still has more into chunks."""
    pairs = summary.headline(ev.summary)
    cells = {(str(c.run or ""), str(c.cell_id)): c for c in ev.cells}
    bars = [Bar(h, m, n) for (h, m), n in zip(pairs, _names(pairs, cells), strict=True)]
    out = []
    for model in dict.fromkeys(b.miss.model for b in bars):
        mbars = [b for b in bars if b.miss.model == model]
        groups = [(model, mbars)]
        if len({b.name for b in mbars}) > MAX_SERIES:
            phases = sorted({b.miss.phase for b in mbars}, key=phase_key)
            groups = [(f"{model}, phase {ph}", [b for b in mbars if b.miss.phase == ph]) for ph in phases]
        for title, gbars in groups:
            order = list(dict.fromkeys(b.name for b in gbars))
            chunks = [order[i:i + MAX_SERIES] for i in range(0, len(order), MAX_SERIES)]
            for k, chunk in enumerate(chunks):
                out.append(Panel(title + (f" ({k + 1}/{len(chunks)})" if len(chunks) > 1 else ""),
                                 [b for b in gbars if b.name in chunk]))
    return out


def _hit_text(bars: list[Bar]) -> str:
    """The hit TTFT medians of a series: one value, or the range over its configs."""
    vals = sorted(v for b in bars if (v := b.hit.ttft_ms) is not None)
    if not vals:
        return "hit n/a"
    lo, hi = (f"{v:.3g}" for v in (vals[0], vals[-1]))
    return f"hit {lo} ms" if lo == hi else f"hit {lo}–{hi} ms"


def _panel(ax, panel: Panel, configs: list[tuple], colors: dict) -> None:
    names = list(dict.fromkeys(b.name for b in panel.bars))
    shown = sorted({(b.miss.a, b.miss.b) for b in panel.bars}, key=lambda ab: config_key(*ab))
    w = 0.8 / len(shown)
    rotation = plot.label_rotation(ax, len(names) * len(shown), 5)
    ends = []
    for x, name in enumerate(names):
        for k, cfg in enumerate(shown):
            b = next((b for b in panel.bars if b.name == name and (b.miss.a, b.miss.b) == cfg), None)
            pos = x - 0.4 + w * (k + 0.5)
            if b is None or b.miss.miss_minus_hit_ms is None:
                if b is not None:
                    plot.na_mark(ax, pos)
                continue
            m = b.miss
            ci = (m.miss_minus_hit_ci_lo, m.miss_minus_hit_ci_hi) if m.miss_minus_hit_ci_lo is not None else None
            ends += plot.delta_bar(ax, pos, w, m.miss_minus_hit_ms, ci, signed_pct(m.miss_minus_hit_pct),
                                   colors[cfg], rotation=rotation)
    labels = [f"{n}\n{_hit_text([b for b in panel.bars if b.name == n])}" for n in names]
    plot.xticks(ax, range(len(names)), labels, fontsize=7)
    ax.set_xlim(-0.5, len(names) - 0.5)
    for x in range(len(names) - 1):
        ax.axvline(x + 0.5, color="grey", linewidth=0.5, linestyle=":")
    note = plot.delta_axis(ax, ends)
    ax.set_ylabel("Miss − hit, median TTFT (ms)" + (f"\n{note}" if note else ""), fontsize=8)
    ax.set_title(panel.title, fontsize=10, loc="left", fontweight="bold")


def fig0_summary(ev: Evidence) -> Figure | str:
    """Per model: the miss − hit TTFT difference (ms, CI) per series and config, labelled in %; the hit
    TTFT under each series."""
    ps = panels(ev)
    if not ps:
        return NO_PAIRS
    configs = sorted({(b.miss.a, b.miss.b) for p in ps for b in p.bars}, key=lambda ab: config_key(*ab))
    colors = {cfg: f"C{i % 10}" for i, cfg in enumerate(configs)}
    most = max(len({b.name for b in p.bars}) * (SERIES_IN + BAR_IN * len({(b.miss.a, b.miss.b) for b in p.bars}))
               for p in ps)
    fig, axes = plot.grid(len(ps), plot.panel_width(1, most, margin_in=1.0, least=4.5), PANEL_H, max_cols=2)
    for (ax,), panel in zip(axes, ps, strict=True):
        _panel(ax, panel, configs, colors)
    handles = [Patch(facecolor=colors[c], edgecolor="black", label=f"A/B = {c[0]}/{c[1]}") for c in configs]
    plot.finish(fig, TITLE, handles, legend_title="Config (tokens)")
    return fig


FIGURES = (
    FigureSpec("fig0_summary", "Summary: what a cache miss costs per interface (miss − hit TTFT, ms)", SECTION,
               fig0_summary,
               "One panel per model: per interface (x) and A/B config (colour) the bar is the miss − hit difference "
               "of the median streaming TTFTs in milliseconds, error bars its 95% bootstrap CI; the label on each "
               "bar is the same difference in % of the hit; under each interface its hit TTFT, the fixed "
               "per-request cost that the percentage divides by."),
)
