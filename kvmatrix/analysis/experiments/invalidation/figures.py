"""The invalidation figures: hit vs miss per config (fig1), the 2x2 experiment-1 grid, the phase comparison,
the TTFT breakdown (three panel), the degradation per backend / version / build (fig3), the warm-up cascade
(fig4). Each draws from the Evidence's invalidation rows; a note when there is nothing to draw."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvmatrix.analysis import plot
from kvmatrix.analysis.experiments.invalidation.breakdown import three_panel
from kvmatrix.analysis.experiments.invalidation.rows import Row, cascade, max_tokens
from kvmatrix.analysis.figure import FigureSpec
from kvmatrix.analysis.fmt import fmt_p, signed_pct, unknown, wrap
from kvmatrix.analysis.labels import config_key, series_names, settings_text, version_text
from kvmatrix.analysis.stats import Summary

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments import Evidence

SYMLOG_PCT = 100.0  # fig3: linear part of the symlog degradation axis, in %
CONDITIONS = (("hit", "cache hit"), ("miss", "cache miss"))


def _row_label(r: Row, width: int = 24) -> str:
    return f"{wrap(r.name, width)}\nA/B {r.config}"


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
            for x, cfg in enumerate(configs):
                pos = x - 0.4 + width * (2 * s + k + 0.5)
                r = by_key.get((name, cfg))
                st = summary_of(r, cond) if r else Summary(0)
                if st.median is None:
                    plot.na_mark(ax, pos)
                    continue
                ax.bar(pos, st.median, width, yerr=plot.err(st, log), capsize=2,
                       color=plot.tint(colors[name]) if cond == "hit" else colors[name],
                       edgecolor=colors[name], linewidth=0.8)
                if cond == "miss":
                    ax.annotate(label_of(r), (pos, plot.top(st)), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=7,
                                rotation=90 if len(names) > 2 else 0)
    ax.set_xticks(range(len(configs)), [f"A/B = {unknown(a)}/{unknown(b)}" for a, b in configs])
    ax.set_xlim(-0.5, len(configs) - 0.5)
    for x in range(len(configs) - 1):
        ax.axvline(x + 0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_ylabel(ylabel + (", log" if log else ""))
    plot.limits(ax, [plot.top(s) for s in summaries], log, room=1.3, lows=[s.median for s in summaries])
    ax.set_title(panel.title, fontsize=10, loc="left", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)


BELOW_IN = 5.5  # height of the extra panel under a paired figure


def _paired_figure(panels: list[Panel], summary_of, label_of, ylabel: str, light: str, dark: str,
                   title: str, below=None, below_slots: int = 0) -> Figure:
    """fig1's layout: a panel per model (``fig1_panels``), colours per series, one legend for all;
    ``below(ax)`` draws one more full-width panel underneath (``below_slots`` x positions wide)."""
    series = list(dict.fromkeys(n for p in panels for n in p.names))
    colors = {name: plot.series_color(i, len(series)) for i, name in enumerate(series)}
    most = max(len(set(p.names)) * len({(r.a, r.b) for r in p.rows}) for p in panels)
    heights = [4.2] * len(panels) + ([BELOW_IN] if below else [])
    fig = Figure(figsize=(max(8.0, 1.5 + 0.55 * most, 3.0 + 1.8 * below_slots), 0.6 + sum(heights)))
    axes = fig.subplots(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, panel in zip(axes[:len(panels)], panels, strict=True):
        _paired_panel(ax, panel, colors, summary_of, label_of, ylabel)
    axes[len(panels) - 1].set_xlabel("Config: context A / context B size (tokens)")
    if below:
        below(axes[-1])
    handles = [Patch(facecolor=colors[n], edgecolor=colors[n], label=n) for n in series]
    handles += [Patch(facecolor=plot.tint("grey"), edgecolor="grey", label=f"light: {light}"),
                Patch(facecolor="grey", edgecolor="grey", label=f"dark: {dark}")]
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    top = axes[0].get_position().y1
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, top), fontsize=8, frameon=False,
               title="Series (phase, backend, settings)", title_fontsize=8)
    return fig


# ---------------------------------------------------------------- experiment1: 2x2 grid


def experiment1_results(ev: Evidence) -> Figure | str:
    """(a) TTFT, (b) throughput, (c) non-streaming TTFT: hit vs miss per phase/backend/config;
    (d) miss - hit difference of median TTFT with its CI and the Mann-Whitney p-value."""
    rows = _ttft_rows(ev)
    if not rows:
        return NO_INVALIDATION
    n = len(rows)
    fig = Figure(figsize=(max(12.0, 2.0 + 1.5 * n), 10.5))
    axes = fig.subplots(2, 2)
    xs = list(range(n))
    labels = [_row_label(r) for r in rows]
    _hit_miss_panel(axes[0][0], rows, xs, "ttft_ms", "Streaming TTFT (ms)", "(a) Time to first token (streaming)",
                    annotate=True)
    tokens = max_tokens(rows)
    _hit_miss_panel(axes[0][1], rows, xs, "throughput", "Throughput (tokens/s)",
                    f"(b) Generation throughput, {tokens}-token run")
    _hit_miss_panel(axes[1][0], rows, xs, "ttft_non_streaming_ms", "Non-streaming TTFT (ms)",
                    "(c) Time to first token (non-streaming, 1 token)")
    _diff_panel(axes[1][1], rows, xs)
    for ax in axes.flat:
        plot.xticks(ax, xs, labels)
        ax.set_xlim(-0.6, n - 0.4)
    axes[0][0].legend(handles=_hit_miss_handles(), fontsize=8, loc="upper left")
    fig.suptitle(f"Experiment 1: cache hit vs cache miss per phase and backend\nbars = median over measured "
                 f"trials, {plot.CI_NOTE}", fontsize=12)
    fig.tight_layout()
    return fig


def _hit_miss_handles() -> list[Patch]:
    return [Patch(facecolor=plot.tint("C0"), edgecolor="C0", label="cache hit"),
            Patch(facecolor="C3", edgecolor="C3", label="cache miss")]


def _hit_miss_panel(ax, rows: list[Row], xs: list[float], metric: str, ylabel: str, title: str,
                    annotate: bool = False) -> None:
    sums = [(r, {c: r.summary(c, metric) for c, _ in CONDITIONS}) for r in rows]
    meds = [s.median for _, d in sums for s in d.values() if s.median]
    log = metric != "throughput" and plot.is_log(meds)
    w = 0.38
    for x, (r, d) in zip(xs, sums, strict=True):
        for k, (cond, _) in enumerate(CONDITIONS):
            pos = x + (k - 0.5) * w
            s = d[cond]
            if s.median is None:
                plot.na_mark(ax, pos)
                continue
            color = plot.tint("C0") if cond == "hit" else "C3"
            ax.bar(pos, s.median, w, yerr=plot.err(s, log), capsize=3, color=color,
                   edgecolor="C0" if cond == "hit" else "C3", linewidth=0.8)
        if annotate and d["miss"].median is not None:
            ax.annotate(signed_pct(r.comparison(metric).rel_pct), (x + 0.5 * w, plot.top(d["miss"])), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
    if not meds:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    plot.limits(ax, [plot.top(s) for _, d in sums for s in d.values()], log, lows=meds)
    ax.set_ylabel(ylabel + (", log scale" if log else ""))
    ax.set_title(title + ("; label = miss vs hit change of the medians" if annotate else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _diff_panel(ax, rows: list[Row], xs: list[float]) -> None:
    tops, bottoms = [], []
    vertical = len(rows) > 8  # side by side, horizontal p labels of neighbouring bars run into each other
    for x, r in zip(xs, rows, strict=True):
        c = r.comparison()
        if c.diff is None:
            plot.na_mark(ax, x)
            continue
        lo, hi = c.diff_ci
        ax.bar(x, c.diff, 0.5, yerr=[[max(0.0, c.diff - lo)], [max(0.0, hi - c.diff)]], capsize=3,
               color="C1", edgecolor="black", linewidth=0.5)
        ax.annotate(f"p = {fmt_p(c.p)}", (x, max(hi, c.diff) if c.diff >= 0 else min(lo, c.diff)),
                    xytext=(0, 3 if c.diff >= 0 else -3), textcoords="offset points", ha="center",
                    va="bottom" if c.diff >= 0 else "top", fontsize=8, rotation=90 if vertical else 0)
        tops.append(max(hi, 0.0))
        bottoms.append(min(lo, 0.0))
    ax.axhline(0, color="black", linewidth=0.6)
    if tops:
        top, bottom = max(tops), min(bottoms)
        span = (top - bottom) or 1.0
        room = 0.55 if vertical else 0.15  # vertical labels need more headroom
        ax.set_ylim(bottom - (room * span if bottom < 0 else 0), top + room * span)
    ax.set_ylabel("Miss − hit, median TTFT (ms)")
    ax.set_title("(d) Invalidation cost: difference of medians with 95% CI;\nlabel = Mann-Whitney U two-sided p",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------- phase comparison


def experiment1_phase_comparison(ev: Evidence) -> Figure | str:
    """A row of panels per model (as fig1 groups them), one panel per config; in each, every series'
    hit and miss median TTFT with 95 % CI and the value on top."""
    rows = _ttft_rows(ev)
    if not rows:
        return NO_INVALIDATION
    panels = fig1_panels(rows)
    configs = sorted({(r.a, r.b) for r in rows}, key=lambda ab: config_key(*ab))
    most = max(len(set(p.names)) for p in panels)
    fig = Figure(figsize=(max(8.0, 1.5 + len(configs) * (0.6 + 0.75 * most)), 0.9 + 4.6 * len(panels)))
    axes = fig.subplots(len(panels), len(configs), sharey="row", squeeze=False)
    w = 0.38
    for axrow, panel in zip(axes, panels, strict=True):
        names = list(dict.fromkeys(panel.names))
        by_key = {(n, (r.a, r.b)): r for r, n in zip(panel.rows, panel.names, strict=True)}
        meds = [r.summary(c).median for r in panel.rows for c in ("hit", "miss") if r.summary(c).median]
        log = plot.is_log(meds)
        tops = []
        for ax, cfg in zip(axrow, configs, strict=True):
            for x, name in enumerate(names):
                r = by_key.get((name, cfg))
                for k, (cond, _) in enumerate(CONDITIONS):
                    pos = x + (k - 0.5) * w
                    st = r.summary(cond) if r else Summary(0)
                    if st.median is None:
                        plot.na_mark(ax, pos)
                        continue
                    ax.bar(pos, st.median, w, yerr=plot.err(st, log), capsize=3,
                           color=plot.tint("C0") if cond == "hit" else "C3",
                           edgecolor="C0" if cond == "hit" else "C3", linewidth=0.8)
                    tops.append(plot.top(st))
                    ax.annotate(f"{st.median:.0f}" if st.median >= 10 else f"{st.median:.1f}", (pos, plot.top(st)),
                                xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
            plot.xticks(ax, range(len(names)), [wrap(n, 16) for n in names], fontsize=7)
            ax.set_xlim(-0.6, len(names) - 0.4)
            ax.set_title(f"{panel.title}: A/B = {unknown(cfg[0])}/{unknown(cfg[1])} tokens", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        plot.limits(axrow[0], tops, log, room=1.15, lows=meds)
        axrow[0].set_ylabel("Streaming TTFT, median (ms)" + (", log scale" if log else ""))
    axes[0][-1].legend(handles=_hit_miss_handles(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       frameon=False)
    fig.suptitle("Phase comparison: every backend, cache hit vs cache miss, a row per model\n"
                 f"bars = median (value on top), {plot.CI_NOTE}", fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- fig3: degradation per backend/version/build


def fig3_degradation(ev: Evidence) -> Figure | str:
    """Change of median TTFT, miss vs hit, in %, per backend / version / build, bars per config."""
    rows = [r for r in _ttft_rows(ev) if r.comparison().rel_pct is not None]
    if not rows:
        return "no ok invalidation cell with both hit and miss TTFT"
    groups = list(dict.fromkeys((r.name, version_text(r.cell)) for r in rows))
    configs = sorted({(r.a, r.b) for r in rows}, key=lambda ab: config_key(*ab))
    colors = {cfg: f"C{i % 10}" for i, cfg in enumerate(configs)}
    fig = Figure(figsize=(max(7.5, 2.0 + len(groups) * (0.6 + 0.45 * len(configs))), 5.6))
    ax = fig.subplots()
    w = 0.8 / len(configs)
    tops = []
    for x, g in enumerate(groups):
        for k, cfg in enumerate(configs):
            r = next((r for r in rows if (r.name, version_text(r.cell)) == g and (r.a, r.b) == cfg), None)
            if r is None:
                continue
            c = r.comparison()
            pos = x - 0.4 + w * (k + 0.5)
            lo, hi = c.rel_ci
            ax.bar(pos, c.rel_pct, w, yerr=[[max(0.0, c.rel_pct - lo)], [max(0.0, hi - c.rel_pct)]], capsize=3,
                   color=colors[cfg], edgecolor="black", linewidth=0.5)
            ax.annotate(signed_pct(c.rel_pct), (pos, max(hi, c.rel_pct)), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, rotation=90 if len(configs) > 2 else 0)
            tops.append(max(hi, 0.0))
    ax.axhline(0, color="black", linewidth=0.6)
    plot.xticks(ax, range(len(groups)), [wrap(n, 24) + (f"\n{wrap(v, 24)}" if v else "") for n, v in groups])
    top = max(tops or [1.0])
    values = sorted(abs(r.comparison().rel_pct) for r in rows)
    typical = max(values[len(values) // 2], SYMLOG_PCT / 10)
    symlog = top / typical > plot.LOG_RATIO  # a few huge degradations would flatten every other bar to zero
    if symlog:
        ax.set_yscale("symlog", linthresh=SYMLOG_PCT)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), top * 4)
    else:
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), top * 1.25)
    ax.set_ylabel("TTFT degradation of the miss (%)\n(median miss − median hit) / median hit"
                  + (f"\nsymlog: linear within ±{SYMLOG_PCT:.0f} %, log beyond" if symlog else ""))
    ax.set_title(f"TTFT degradation per backend, engine version and build\n{plot.CI_NOTE.replace('median', 'ratio')}",
                 fontsize=10)
    plot.legend_right(ax, [Patch(facecolor=colors[c], edgecolor="black", label=f"A/B = {unknown(c[0])}/{unknown(c[1])}")
                       for c in configs])
    ax.grid(axis="y", alpha=0.3)
    return fig


# ---------------------------------------------------------------- fig4: warm-up cascade


def fig4_cascade(ev: Evidence) -> Figure | str:
    """Warm-up time of [A,B] after a miss (dark) vs after a hit (light), in fig1's layout (a panel per
    model, colours per series); a second figure row of cached/recomputed tokens where they were recorded."""
    found = {id(r): c for r in ev.rows if (c := cascade(r)[0]) is not None}
    if not found:
        reasons = sorted({cascade(r)[1] for r in ev.rows}) or ["no ok invalidation cell"]
        return "; ".join(reasons)
    rows = [r for r in ev.rows if id(r) in found]
    with_tokens = [(r, found[id(r)]) for r in rows if found[id(r)].tokens("hit") or found[id(r)].tokens("miss")]

    def ratio(r: Row) -> str:
        m, h = found[id(r)].summary("miss").median, found[id(r)].summary("hit").median
        return f"×{m / h:.1f}" if m and h else ""

    title = ("Warm-up cascade: the [A,B] warm-up after a miss vs after a hit, one panel per model\n"
             f"each trial's warm-up attributed to the query run before it; {plot.CI_NOTE}; label = after-miss / "
             "after-hit ratio of the medians")
    return _paired_figure(fig1_panels(rows), lambda r, c: found[id(r)].summary(c), ratio,
                          "Warm-up [A,B] time,\nmedian (ms)", "after a cache hit", "after a cache miss", title,
                          below=(lambda ax: _cascade_tokens(ax, with_tokens)) if with_tokens else None,
                          below_slots=len(with_tokens))


def _cascade_tokens(ax, found) -> None:
    w = 0.38
    for x, (_, c) in enumerate(found):
        for k, prev in enumerate(("miss", "hit")):
            toks = c.tokens(prev)
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
                        ha="center", va="bottom", fontsize=7)
    plot.xticks(ax, range(len(found)), [_row_label(r) for r, _ in found])
    ax.set_xlim(-0.7, len(found) - 0.3)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_ylabel("Warm-up prompt tokens, median")
    ax.set_title("What the warm-up reused: cached vs recomputed tokens\n(left bar after a miss, hatched; right "
                 "after a hit)", fontsize=10)
    plot.legend_right(ax, [Patch(facecolor="C2", edgecolor="black", label="cached (reused)"),
                       Patch(facecolor="C1", edgecolor="black", label="recomputed"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="after a miss"),
                       Patch(facecolor="white", edgecolor="black", label="after a hit")])
    ax.grid(axis="y", alpha=0.3)


FIGURES = (
    FigureSpec("fig1_invalidation_cost", "Invalidation cost: hit vs miss TTFT per A/B config", "invalidation",
               fig1_invalidation_cost,
               "Median streaming TTFT of the cache hit and the cache miss per config and backend."),
    FigureSpec("experiment1_results", "Experiment 1: TTFT, throughput and the hit/miss difference", "invalidation",
               experiment1_results,
               "2x2: streaming TTFT, throughput, non-streaming TTFT (hit vs miss) and the miss − hit difference of "
               "medians with its CI and Mann-Whitney p."),
    FigureSpec("experiment1_phase_comparison", "Phase comparison: every backend, hit vs miss", "invalidation",
               experiment1_phase_comparison, "One panel per config; every backend's hit and miss median TTFT."),
    FigureSpec("three_panel", "TTFT breakdown, throughput and warm-up", "invalidation", three_panel,
               "TTFT split into computation and overhead, generation throughput, warm-up time."),
    FigureSpec("fig3_degradation", "TTFT degradation per backend / version / build", "invalidation",
               fig3_degradation,
               "Miss vs hit change of median TTFT in %, with bootstrap CI, labelled with engine version and build."),
    FigureSpec("fig4_cascade", "Warm-up cascade: warm-up after a miss vs after a hit", "invalidation", fig4_cascade,
               "Each warm-up of [A,B] attributed to the query before it in run order."),
)
