"""The invalidation figures: hit vs miss per config (fig1), the four experiment-1 metrics, the phase comparison,
the TTFT breakdown (three panel), the miss − hit cost in ms per backend / version / build (fig3), the warm-up
cascade (fig4). Each draws from the Evidence's invalidation rows; a note when there is nothing to draw."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvmatrix.analysis import plot
from kvmatrix.analysis.experiments.invalidation.breakdown import three_panel
from kvmatrix.analysis.experiments.invalidation.rows import Row, cascade, max_tokens
from kvmatrix.analysis.figure import FigureSpec
from kvmatrix.analysis.fmt import fmt_p, signed_pct, unknown
from kvmatrix.analysis.labels import config_key, series_names, settings_text, version_text
from kvmatrix.analysis.stats import Summary

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments import Evidence

CONDITIONS = (("hit", "cache hit"), ("miss", "cache miss"))


def _ttft_rows(ev: Evidence) -> list[Row]:
    return [r for r in ev.rows if r.summary("hit").n or r.summary("miss").n]


NO_INVALIDATION = "no ok invalidation cell with streaming TTFT trials"


# ---------------------------------------------------------------- fig1: hit vs miss per config


MAX_SERIES = 8  # series per fig1 panel; more are split by phase, then into chunks


@dataclass
class Panel:
    """One panel of fig1: the rows of one model (and phase / chunk when split), named within it."""

    title: str
    rows: list[Row]
    names: list[str]  # series name per row, unique per config within the panel


def _model_of(r: Row) -> str:
    m = r.cell.model
    return f"{m.name or '?'}{'/' + m.quant if m.quant else ''}"


def _short_names(rows: list[Row]) -> list[str]:
    """Phase and label, with the TTFT-relevant settings on every series when they differ anywhere in the
    panel, then the fewest further attributes (run, then cell) that tell apart the rows sharing a config.
    The model is the panel's, so it is never repeated in a series name."""
    cells = [r.cell for r in rows]
    settings = [settings_text(c) for c in cells]
    shown = [f" ({t})" if t and len(set(settings)) > 1 else "" for t in settings]
    base = [f"{r.phase} {r.cell.label or r.cell.backend}{x}" for r, x in zip(rows, shown, strict=True)]
    for attrs in ((), ("run",), ("run", "cell")):
        extra = series_names(cells, attrs, bases=base) if attrs else base
        if len(set(zip(extra, [(r.a, r.b) for r in rows], strict=True))) == len(rows):
            return extra
    return [f"{r.phase} {r.cell_id}" for r in rows]


def fig1_panels(rows: list[Row], max_series: int = MAX_SERIES) -> list[Panel]:
    """One panel per model; a model with more than ``max_series`` series is split by phase, and a phase
    that still has too many into chunks (series in order, each chunk with all its configs)."""
    panels = []
    for model in dict.fromkeys(_model_of(r) for r in rows):
        mrows = [r for r in rows if _model_of(r) == model]
        groups = [(model, mrows)]
        if len(set(_short_names(mrows))) > max_series:
            groups = [(f"{model}, phase {ph}", [r for r in mrows if r.phase == ph])
                      for ph in dict.fromkeys(r.phase for r in mrows)]
        for title, grows in groups:
            names = _short_names(grows)
            order = list(dict.fromkeys(names))
            chunks = [order[i:i + max_series] for i in range(0, len(order), max_series)]
            for k, chunk in enumerate(chunks):
                sel = [(r, n) for r, n in zip(grows, names, strict=True) if n in chunk]
                panels.append(Panel(title + (f" ({k + 1}/{len(chunks)})" if len(chunks) > 1 else ""),
                                    [r for r, _ in sel], [n for _, n in sel]))
    return panels


def fig1_invalidation_cost(ev: Evidence) -> Figure | str:
    """Grouped bars, one panel per model: x = config, per series a hit (light) and a miss (dark) bar
    (median, 95 % CI), the miss labelled with its change vs the hit; one legend for all panels."""
    rows = _ttft_rows(ev)
    if not rows:
        return NO_INVALIDATION
    return _paired_figure(
        fig1_panels(rows), lambda r, c: r.summary(c), lambda r: signed_pct(r.comparison().rel_pct),
        "Streaming TTFT,\nmedian (ms)", "cache hit", "cache miss",
        "Invalidation cost: time to first token, cache hit vs cache miss, one panel per model\n"
        f"bars = median, {plot.CI_NOTE}; label = miss vs hit change of the medians")


def _paired_panel(ax, panel: Panel, colors: dict, summary_of, label_of, ylabel: str) -> None:
    """x = config; per series a light bar (``summary_of(row, "hit")``) and a dark one (``"miss"``), with
    the dark one labelled ``label_of(row)``; log axis when the medians span more than plot.LOG_RATIO."""
    configs = sorted({(r.a, r.b) for r in panel.rows}, key=lambda ab: config_key(*ab))
    names = list(dict.fromkeys(panel.names))
    by_key = {(n, (r.a, r.b)): r for r, n in zip(panel.rows, panel.names, strict=True)}
    summaries = [summary_of(r, c) for r in panel.rows for c in ("hit", "miss")]
    log = plot.is_log([s.median for s in summaries if s.median])
    width = 0.8 / (2 * len(names))
    for s, name in enumerate(names):
        for k, (cond, _) in enumerate(CONDITIONS):
            bars = []
            for x, cfg in enumerate(configs):
                pos = x - 0.4 + width * (2 * s + k + 0.5)
                r = by_key.get((name, cfg))
                st = summary_of(r, cond) if r else Summary(0)
                bars.append((pos, st))
                if cond == "miss" and st.median is not None:
                    ax.annotate(label_of(r), (pos, plot.top(st)), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=7,
                                rotation=90 if len(names) > 2 else 0)
            plot.median_bars(ax, bars, width, log=log, capsize=2, edgecolor=colors[name], linewidth=0.8,
                             color=plot.tint(colors[name]) if cond == "hit" else colors[name])
    ax.set_xticks(range(len(configs)), [f"A/B = {unknown(a)}/{unknown(b)}" for a, b in configs])
    ax.set_xlim(-0.5, len(configs) - 0.5)
    for x in range(len(configs) - 1):
        ax.axvline(x + 0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_ylabel(ylabel + (", log" if log else ""))
    plot.limits(ax, [plot.top(s) for s in summaries], log, room=1.3, lows=[s.median for s in summaries])
    ax.set_title(panel.title, fontsize=10, loc="left", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)


PAIRED_SLOT_IN = 0.55  # fig1 / fig4: inches per series x config
PANEL_H = 4.2
ROW_H = 3.6  # one axes row of a long axis of bar groups (experiment1, three_panel, the cascade's tokens)


def _paired_figure(panels: list[Panel], summary_of, label_of, ylabel: str, light: str, dark: str,
                   title: str, tokens: list[Row] | None = None, found: dict | None = None) -> Figure:
    """fig1's layout: a panel per model (``fig1_panels``, small multiples), colours per series, one legend
    below for all; ``tokens``: the cascade's token panel underneath, full width, in rows of series."""
    series = list(dict.fromkeys(n for p in panels for n in p.names))
    colors = {name: plot.series_color(i, len(series)) for i, name in enumerate(series)}
    most = max(len(set(p.names)) * len({(r.a, r.b) for r in p.rows}) for p in panels)
    rows = plot.pack_groups(plot.runs(tokens, lambda r: r.name), CASCADE_SLOT_IN) if tokens else []
    fig, axes = plot.grid(len(panels), plot.panel_width(most, PAIRED_SLOT_IN, 1.5, least=6.0), PANEL_H,
                          wide=len(rows), wide_w=1.3 + plot.units(rows) * CASCADE_SLOT_IN, wide_h=ROW_H)
    for (ax,), panel in zip(axes[:len(panels)], panels, strict=True):
        _paired_panel(ax, panel, colors, summary_of, label_of, ylabel)
        ax.set_xlabel("Config: context A / context B size (tokens)", fontsize=8)
    handles = [Patch(facecolor=colors[n], edgecolor=colors[n], label=n) for n in series]
    handles += [Patch(facecolor=plot.tint("grey"), edgecolor="grey", label=f"light: {light}"),
                Patch(facecolor="grey", edgecolor="grey", label=f"dark: {dark}")]
    if rows:
        _cascade_tokens([ax for (ax,) in axes[len(panels):]], rows, found)
        handles += _token_handles()
    plot.finish(fig, title, handles, legend_title="Series (phase, backend, settings)")
    return fig


# ---------------------------------------------------------------- experiment1: four metrics, rows of bar groups


EXP1_SLOT_IN = 0.65  # inches per row (config) of experiment1: its hit and miss bars


def experiment1_results(ev: Evidence) -> Figure | str:
    """(a) TTFT, (b) throughput, (c) non-streaming TTFT: hit vs miss per phase/backend/config;
    (d) miss - hit difference of median TTFT with its CI and the Mann-Whitney p-value. Each metric a
    panel; a long axis of series wraps into several axes rows."""
    rows = _ttft_rows(ev)
    if not rows:
        return NO_INVALIDATION
    packed = plot.pack_groups(plot.runs(rows, lambda r: r.name), EXP1_SLOT_IN)
    width = plot.panel_width(plot.units(packed), EXP1_SLOT_IN, least=6.0)
    fig, panels = plot.grid(4, width, ROW_H, per_panel=len(packed), max_cols=2, sharey=True)
    tokens = max_tokens(rows)
    metrics = [("ttft_ms", "Streaming TTFT (ms)", "(a) Time to first token (streaming)", True),
               ("throughput", "Throughput (tokens/s)", f"(b) Generation throughput, {tokens}-token run", False),
               ("ttft_non_streaming_ms", "Non-streaming TTFT (ms)", "(c) Time to first token (non-streaming, 1 token)",
                False)]
    for axes, (metric, ylabel, title, annotate) in zip(panels, metrics, strict=False):
        _hit_miss_panel(axes, packed, metric, ylabel, title, annotate)
    _diff_panel(panels[3], packed)
    plot.finish(fig, "Experiment 1: cache hit vs cache miss per phase and backend\nbars = median over measured "
                     f"trials, {plot.CI_NOTE}; x = config A/B (tokens), grouped by series", _hit_miss_handles(),
                title_size=12)
    return fig


#: bar style of the hit and the miss where the colour is not the series' (experiment1, phase comparison)
HIT_MISS_STYLE = {"hit": {"color": plot.tint("C0"), "edgecolor": "C0", "linewidth": 0.8},
                  "miss": {"color": "C3", "edgecolor": "C3", "linewidth": 0.8}}


def _hit_miss_handles() -> list[Patch]:
    return [Patch(facecolor=plot.tint("C0"), edgecolor="C0", label="cache hit"),
            Patch(facecolor="C3", edgecolor="C3", label="cache miss")]


def _hit_miss_panel(axes: list, packed: list, metric: str, ylabel: str, title: str, annotate: bool = False) -> None:
    """Hit and miss bars of one metric over the axes rows (a shared y axis); ``annotate``: the miss
    labelled with its change vs the hit."""
    every = [r for groups in packed for g in groups for r in g.items]
    sums = [s for r in every for s in (r.summary(c, metric) for c, _ in CONDITIONS)]
    meds = [s.median for s in sums if s.median]
    log = metric != "throughput" and plot.is_log(meds)
    w = 0.38

    def draw(ax, rows: list[Row], xs: list[float]) -> None:
        for k, (cond, _) in enumerate(CONDITIONS):
            plot.median_bars(ax, [(x + (k - 0.5) * w, r.summary(cond, metric)) for x, r in zip(xs, rows, strict=True)],
                             w, log=log, **HIT_MISS_STYLE[cond])
        for x, r in zip(xs, rows, strict=True):
            miss = r.summary("miss", metric)
            if annotate and miss.median is not None:
                ax.annotate(signed_pct(r.comparison(metric).rel_pct), (x + 0.5 * w, plot.top(miss)), xytext=(0, 3),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
        if not meds:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_ylabel(ylabel + (", log scale" if log else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)

    plot.draw_rows(axes, packed, draw, lambda r: r.config)
    plot.limits(axes[0], [plot.top(s) for s in sums], log, lows=meds)
    axes[0].set_title(title + ("; label = miss vs hit change of the medians" if annotate else ""), fontsize=10)


def _diff_panel(axes: list, packed: list) -> None:
    """(d): miss − hit difference of the medians (ms) with its CI, labelled with the Mann-Whitney p."""
    ends = []

    def draw(ax, rows: list[Row], xs: list[float]) -> None:
        for x, r in zip(xs, rows, strict=True):
            c = r.comparison()
            if c.diff is None:
                plot.na_mark(ax, x)
                continue
            ends.extend(plot.delta_bar(ax, x, 0.5, c.diff, c.diff_ci, f"p={fmt_p(c.p)}", "C1", fontsize=6.5))

    plot.draw_rows(axes, packed, draw, lambda r: r.config)
    for ax in axes:
        note = plot.delta_axis(ax, ends)
        ax.set_ylabel("Miss − hit, median TTFT (ms)" + (f"\n{note}" if note else ""), fontsize=9)
    axes[0].set_title("(d) Invalidation cost: difference of medians with 95% CI;\nlabel = Mann-Whitney U two-sided p",
                      fontsize=10)


# ---------------------------------------------------------------- phase comparison


PHASE_SLOT_IN = 0.8  # inches per series of a phase-comparison panel


def experiment1_phase_comparison(ev: Evidence) -> Figure | str:
    """Per model (as fig1 groups them) a row of panels, one per config (wrapped when they do not fit);
    in each, every series' hit and miss median TTFT with 95 % CI and the value on top."""
    rows = _ttft_rows(ev)
    if not rows:
        return NO_INVALIDATION
    panels = fig1_panels(rows)
    configs = sorted({(r.a, r.b) for r in rows}, key=lambda ab: config_key(*ab))
    most = max(len(set(p.names)) for p in panels)
    fig, axes = plot.grid([len(configs)] * len(panels), plot.panel_width(most, PHASE_SLOT_IN, 0.9, least=3.5), 3.8,
                          max_cols=len(configs))
    w = 0.38
    for m, panel in enumerate(panels):
        axrow = [a for (a,) in axes[m * len(configs):(m + 1) * len(configs)]]
        names = list(dict.fromkeys(panel.names))
        by_key = {(n, (r.a, r.b)): r for r, n in zip(panel.rows, panel.names, strict=True)}
        meds = [r.summary(c).median for r in panel.rows for c in ("hit", "miss") if r.summary(c).median]
        log = plot.is_log(meds)
        tops = []
        for ax, cfg in zip(axrow, configs, strict=True):
            if ax is not axrow[0]:
                ax.sharey(axrow[0])
            for k, (cond, _) in enumerate(CONDITIONS):
                bars = [(x + (k - 0.5) * w, r.summary(cond) if (r := by_key.get((name, cfg))) else Summary(0))
                        for x, name in enumerate(names)]
                plot.median_bars(ax, bars, w, log=log, **HIT_MISS_STYLE[cond])
                for pos, st in bars:
                    if st.median is None:
                        continue
                    tops.append(plot.top(st))
                    ax.annotate(f"{st.median:.0f}" if st.median >= 10 else f"{st.median:.1f}", (pos, plot.top(st)),
                                xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
            plot.xticks(ax, range(len(names)), names, fontsize=7)
            ax.set_xlim(-0.6, len(names) - 0.4)
            ax.set_title(f"{panel.title}: A/B = {unknown(cfg[0])}/{unknown(cfg[1])} tokens", fontsize=9)
            ax.set_ylabel("Streaming TTFT, median (ms)" + (", log scale" if log else ""), fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        plot.limits(axrow[0], tops, log, room=1.15, lows=meds)
    plot.finish(fig, "Phase comparison: every backend, cache hit vs cache miss, a panel per model and config\n"
                     f"bars = median (value on top), {plot.CI_NOTE}", _hit_miss_handles())
    return fig


# ---------------------------------------------------------------- fig3: miss − hit (ms) per backend/version/build


def fig3_degradation(ev: Evidence) -> Figure | str:
    """Miss − hit difference of the median TTFTs in ms (95 % CI) per backend / version / build, a bar per
    config labelled with the same difference in % of the hit; many groups wrap into several axes rows."""
    rows = [r for r in _ttft_rows(ev) if r.comparison().diff is not None]
    if not rows:
        return "no ok invalidation cell with both hit and miss TTFT"
    groups = list(dict.fromkeys((r.name, version_text(r.cell)) for r in rows))
    configs = sorted({(r.a, r.b) for r in rows}, key=lambda ab: config_key(*ab))
    colors = {cfg: f"C{i % 10}" for i, cfg in enumerate(configs)}
    slot_in = max(1.3, 0.6 + 0.45 * len(configs))  # room for the bars, and for a label of 16 characters a line
    chunks = plot.split(groups, plot.per_row(slot_in))
    most = max(len(c) for c in chunks)
    fig, (axes,) = plot.grid(1, plot.panel_width(most, slot_in, 1.6, least=6.0), 4.2, per_panel=len(chunks),
                             sharey=True)
    w = 0.8 / len(configs)
    ends = []
    for ax, chunk in zip(axes, chunks, strict=True):
        rotation = plot.label_rotation(ax, most * len(configs), 5)
        for x, g in enumerate(chunk):
            for k, cfg in enumerate(configs):
                r = next((r for r in rows if (r.name, version_text(r.cell)) == g and (r.a, r.b) == cfg), None)
                if r is None:
                    continue
                c = r.comparison()
                ends += plot.delta_bar(ax, x - 0.4 + w * (k + 0.5), w, c.diff, c.diff_ci, signed_pct(c.rel_pct),
                                       colors[cfg], rotation=rotation)
        plot.xticks(ax, range(len(chunk)), [n + (f"\n{v}" if v else "") for n, v in chunk], slots=most)
        ax.set_xlim(-0.5, most - 0.5)
    for ax in axes:
        note = plot.delta_axis(ax, ends)
        ax.set_ylabel("Miss − hit, median TTFT (ms)" + (f"\n{note}" if note else ""), fontsize=9)
    plot.finish(fig, "Cache-miss cost per backend, engine version and build: miss − hit TTFT (ms)\n"
                     f"bar = difference of the medians, {plot.CI_NOTE.replace('the median', 'it')}; "
                     "label = the same in % of the hit",
                [Patch(facecolor=colors[c], edgecolor="black", label=f"A/B = {unknown(c[0])}/{unknown(c[1])}")
                 for c in configs], legend_title="Config (tokens)")
    return fig


# ---------------------------------------------------------------- fig4: warm-up cascade


CASCADE_SLOT_IN = 0.9  # inches per row of the cascade's token panel: its after-miss and after-hit bars


def fig4_cascade(ev: Evidence) -> Figure | str:
    """Warm-up time of [A,B] after a miss (dark) vs after a hit (light), in fig1's layout (a panel per
    model, colours per series); then rows of cached/recomputed tokens where they were recorded."""
    found = {id(r): c for r in ev.rows if (c := cascade(r)[0]) is not None}
    if not found:
        reasons = sorted({cascade(r)[1] for r in ev.rows}) or ["no ok invalidation cell"]
        return "; ".join(reasons)
    rows = [r for r in ev.rows if id(r) in found]
    with_tokens = [r for r in rows if found[id(r)].tokens("hit") or found[id(r)].tokens("miss")]

    def ratio(r: Row) -> str:
        m, h = found[id(r)].summary("miss").median, found[id(r)].summary("hit").median
        return f"×{m / h:.1f}" if m and h else ""

    title = ("Warm-up cascade: the [A,B] warm-up after a miss vs after a hit, one panel per model\n"
             f"each trial's warm-up attributed to the query run before it; {plot.CI_NOTE}; label = after-miss / "
             "after-hit ratio of the medians")
    return _paired_figure(fig1_panels(rows), lambda r, c: found[id(r)].summary(c), ratio,
                          "Warm-up [A,B] time,\nmedian (ms)", "after a cache hit", "after a cache miss", title,
                          tokens=with_tokens, found=found)


def _token_handles() -> list[Patch]:
    return [Patch(facecolor="C2", edgecolor="black", label="tokens: cached (reused)"),
            Patch(facecolor="C1", edgecolor="black", label="tokens: recomputed"),
            Patch(facecolor="white", edgecolor="black", hatch="//", label="tokens: after a miss (hatched)"),
            Patch(facecolor="white", edgecolor="black", label="tokens: after a hit (plain)")]


def _cascade_tokens(axes: list, packed: list, found: dict) -> None:
    """The token panel, over its axes rows (one y axis): per row the after-miss (hatched) and after-hit
    bars of cached and recomputed warm-up tokens, each labelled (vertically: two lines in a narrow bar)."""
    w = 0.38

    def draw(ax, rows: list[Row], xs: list[float]) -> None:
        for x, r in zip(xs, rows, strict=True):
            for k, prev in enumerate(("miss", "hit")):
                toks = found[id(r)].tokens(prev)
                pos = x + (k - 0.5) * w
                if not toks:
                    plot.na_mark(ax, pos)
                    continue
                cached, rec = toks
                hatch = "//" if prev == "miss" else None
                ax.bar(pos, cached or 0, w, color="C2", hatch=hatch, edgecolor="black", linewidth=0.5)
                if rec is not None:
                    ax.bar(pos, rec, w, bottom=cached or 0, color="C1", hatch=hatch, edgecolor="black", linewidth=0.5)
                text = f"{cached or 0:.0f} cached" + ("" if rec is None else f"\n{rec:.0f} recomputed")
                ax.annotate(text, (pos, (cached or 0) + (rec or 0)), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_ylabel("Warm-up prompt tokens,\nmedian", fontsize=9)
        ax.grid(axis="y", alpha=0.3)

    plot.draw_rows(axes, packed, draw, lambda r: r.config)
    for ax in axes[1:]:
        ax.sharey(axes[0])
    axes[0].set_ylim(0, max(max(ax.get_ylim()[1] for ax in axes), 1.0) * 1.15)
    axes[0].set_title("What the warm-up reused: cached vs recomputed tokens (left bar after a miss, hatched; right "
                      "after a hit)", fontsize=10, loc="left")


FIGURES = (
    FigureSpec("fig1_invalidation_cost", "Invalidation cost: hit vs miss TTFT per A/B config", "invalidation",
               fig1_invalidation_cost,
               "Median streaming TTFT of the cache hit and the cache miss per config and backend."),
    FigureSpec("experiment1_results", "Experiment 1: TTFT, throughput and the hit/miss difference", "invalidation",
               experiment1_results,
               "(a) streaming TTFT, (b) throughput, (c) non-streaming TTFT (hit vs miss) and (d) the miss − hit "
               "difference of medians with its CI and Mann-Whitney p; x = config, grouped by series."),
    FigureSpec("experiment1_phase_comparison", "Phase comparison: every backend, hit vs miss", "invalidation",
               experiment1_phase_comparison, "One panel per config; every backend's hit and miss median TTFT."),
    FigureSpec("three_panel", "TTFT breakdown, throughput and warm-up", "invalidation", three_panel,
               "TTFT split into computation and overhead, generation throughput, warm-up time."),
    FigureSpec("fig3_degradation", "Cache-miss cost per backend / version / build (miss − hit TTFT, ms)",
               "invalidation", fig3_degradation,
               "Miss − hit difference of the median streaming TTFTs in milliseconds with its 95% bootstrap CI, per "
               "backend, engine version and build and per A/B config; each bar labelled with the same difference in "
               "% of the hit."),
    FigureSpec("fig4_cascade", "Warm-up cascade: warm-up after a miss vs after a hit", "invalidation", fig4_cascade,
               "Each warm-up of [A,B] attributed to the query before it in run order."),
)
