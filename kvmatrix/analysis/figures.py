"""Report figures, each as PNG (150 dpi) and SVG, drawn off-screen (matplotlib Agg, no pyplot).

``make_figures(evidence, folder)`` draws every figure it has data for and says
why it skipped the others; the report embeds the former and quotes the latter.
Bars are medians over the measured trials; error bars are 95 % bootstrap
confidence intervals of the median (``kvmatrix.analysis.stats``).

Regenerate the figures of existing results without rerunning anything::

    python -m kvmatrix.analysis.figures DIR [DIR...] [--out DIR]

writes ``<out or first DIR>/figures/*.png`` and ``*.svg``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from kvmatrix.analysis import calibration, versions
from kvmatrix.analysis.stats import Summary, fmt_p, linear_fit
from kvmatrix.analysis.summary import (
    SERIES_ATTRS,
    SLOT_CONDITIONS,
    Evidence,
    NoCellsError,
    Row,
    build_evidence,
    cascade,
    config_key,
    load_required,
    recompute_points,
    series_names,
    stat,
    version_text,
)
from kvmatrix.runners.results import atomic_target

DPI = 150
FORMATS = ("png", "svg")
LOG_RATIO = 30  # switch a TTFT axis to log scale when max/min exceeds this
SYMLOG_PCT = 100.0  # fig3: linear part of the symlog degradation axis, in %
CONDITIONS = (("hit", "cache hit"), ("miss", "cache miss"))
CI_NOTE = "error bars = 95% bootstrap CI of the median"
STABLE_SVG = {"svg.hashsalt": "kvmatrix"}  # stable SVG ids: same results, same file


@dataclass
class FigureResult:
    """One figure: written to ``path`` (PNG; the SVG sits beside it), or skipped with ``note``."""

    name: str
    title: str
    section: str  # "invalidation" | "recompute_scan" | "batch_sweep" | "slot_eviction"
    path: Path | None = None
    note: str = ""
    caption: str = ""

    @property
    def svg(self) -> Path | None:
        return None if self.path is None else self.path.with_suffix(".svg")


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    section: str
    draw: Callable[[Evidence], Figure | str]
    caption: str


def make_figures(ev: Evidence, folder: Path) -> list[FigureResult]:
    """Draw all figures into ``folder``; one result per figure, drawn or skipped (a ``WHEN_APPLICABLE``
    figure that does not apply to these cells has none)."""
    folder = Path(folder)
    return [r for spec in SPECS + WHEN_APPLICABLE if (r := _draw(spec, ev, folder)) is not None]


def _draw(spec: Spec, ev: Evidence, folder: Path) -> FigureResult | None:
    fig_or_note = spec.draw(ev)
    stem = folder / spec.name
    if fig_or_note is None or isinstance(fig_or_note, str):
        for fmt in FORMATS:  # no stale figure from an earlier report
            stem.with_suffix(f".{fmt}").unlink(missing_ok=True)
        return None if fig_or_note is None else FigureResult(spec.name, spec.title, spec.section, note=fig_or_note)
    for fmt in FORMATS:
        save(fig_or_note, stem.with_suffix(f".{fmt}"))
    return FigureResult(spec.name, spec.title, spec.section, path=stem.with_suffix(".png"), caption=spec.caption)


def save(fig: Figure, path: Path) -> Path:
    """Write the figure atomically (temp file in the same folder, then rename); format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".")
    meta = {"Date": None} if fmt == "svg" else {}
    with atomic_target(path, suffix=path.suffix) as tmp, matplotlib.rc_context(STABLE_SVG):
        fig.savefig(tmp, dpi=DPI, format=fmt, bbox_inches="tight", metadata=meta)
    return path


# ---------------------------------------------------------------- helpers


def _tint(color, amount: float = 0.55):
    """The colour mixed with white (lighter shade for the cache-hit bar)."""
    return tuple(c + (1 - c) * amount for c in to_rgb(color))


def _err(s: Summary, log: bool = False) -> list[list[float]]:
    """Asymmetric CI error bar of a median; on a log axis the lower arm stays above zero."""
    arms = s.err
    if arms is None:
        return [[0.0], [0.0]]
    lo, hi = arms
    if log and s.median and s.median > 0:
        lo = min(lo, 0.9 * s.median)
    return [[max(0.0, lo)], [max(0.0, hi)]]


def _top(s: Summary) -> float:
    """Upper end of a bar's error bar."""
    if s.median is None:
        return 0.0
    return s.ci[1] if s.ci else s.median


def _is_log(values: list[float]) -> bool:
    vals = [v for v in values if v and v > 0]
    return bool(vals) and max(vals) / min(vals) > LOG_RATIO


def _limits(ax, tops: list[float], log: bool, room: float = 1.25, lows: list[float] | None = None) -> None:
    """Y limits leaving room above the tallest error bar for its label (and, on a log axis,
    below the shortest bar in ``lows`` so that it stays visible)."""
    tallest = max([t for t in tops if t] or [1.0])
    if log:
        ax.set_yscale("log")
        positive = [v for v in lows or [] if v and v > 0]
        ax.set_ylim(min(positive) / 3 if positive else None, tallest * 4)
    else:
        ax.set_ylim(0, tallest * room)


def _na(ax, pos: float) -> None:
    ax.text(pos, 0.02, "n/a", transform=ax.get_xaxis_transform(), rotation=90,
            ha="center", va="bottom", fontsize=7, color="grey")


def _legend_right(ax, handles, **kw) -> None:
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, **kw)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.0f}%"


def wrap(name: str, width: int) -> str:
    """Wrap a label at spaces and after slashes, never inside a word."""
    text = textwrap.fill(name.replace("/", "/ "), width, break_long_words=False, break_on_hyphens=False)
    return text.replace("/ ", "/")


CHAR_IN = 0.075  # approximate width of one 8-pt character, inches


def _xticks(ax, xs, labels: list[str], fontsize: int = 8) -> None:
    """Tick labels; rotated (one line each) when the longest line would not fit its slot."""
    slot = ax.get_position().width * ax.figure.get_figwidth() / max(1, len(labels))
    longest = max((len(line) for lab in labels for line in lab.split("\n")), default=0)
    if longest * CHAR_IN * fontsize / 8 <= slot * 0.95:
        ax.set_xticks(xs, labels, fontsize=fontsize)
    else:
        ax.set_xticks(xs, [" ".join(lab.split("\n")).replace("/ ", "/") for lab in labels], fontsize=fontsize,
                      rotation=30, ha="right", rotation_mode="anchor")


def _row_label(r: Row, width: int = 24) -> str:
    return f"{wrap(r.name, width)}\nA/B {r.config}"


def _ttft_rows(ev: Evidence) -> list[Row]:
    return [r for r in ev.rows if r.summary("hit").n or r.summary("miss").n]


NO_INVALIDATION = "no ok invalidation cell with streaming TTFT trials"


# ---------------------------------------------------------------- fig1: hit vs miss per config


def series_color(i: int, n: int):
    """Distinct colours: the default cycle up to 10 series, the 20-colour table beyond."""
    if n <= 10:
        return f"C{i}"
    from matplotlib import colormaps  # noqa: PLC0415

    return colormaps["tab20"](i % 20)


def series_linestyle(i: int) -> str:
    return ("-", "--", ":", "-.")[(i // 20) % 4]


MAX_SERIES = 8  # series per fig1 panel; more are split by phase, then into chunks


@dataclass
class Panel:
    """One panel of fig1: the rows of one model (and phase / chunk when split), named within it."""

    title: str
    rows: list[Row]
    names: list[str]  # series name per row, unique per config within the panel


def _model_of(r: Row) -> str:
    m = r.cell.get("model") or {}
    return f"{m.get('name') or '?'}{'/' + m['quant'] if m.get('quant') else ''}"


def _short_names(rows: list[Row]) -> list[str]:
    """Phase and label, with the TTFT-relevant settings on every series when they differ anywhere in the
    panel, then the fewest further attributes (run, then cell) that tell apart the rows sharing a config.
    The model is the panel's, so it is never repeated in a series name."""
    cells = [r.cell for r in rows]
    settings = [SERIES_ATTRS["settings"](c) for c in cells]
    shown = [f" ({t})" if t and len(set(settings)) > 1 else "" for t in settings]
    base = [f"{r.phase} {r.cell.get('label') or r.cell.get('backend')}{x}" for r, x in zip(rows, shown, strict=True)]
    for attrs in ((), ("run",), ("run", "cell")):
        extra = series_names([{**c, "label": b} for c, b in zip(cells, base, strict=True)], attrs) if attrs else base
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
        fig1_panels(rows), lambda r, c: r.summary(c), lambda r: _pct(r.comparison().rel_pct),
        "Streaming TTFT,\nmedian (ms)", "cache hit", "cache miss",
        "Invalidation cost: time to first token, cache hit vs cache miss, one panel per model\n"
        f"bars = median, {CI_NOTE}; label = miss vs hit change of the medians")


def _paired_panel(ax, panel: Panel, colors: dict, summary_of, label_of, ylabel: str) -> None:
    """x = config; per series a light bar (``summary_of(row, "hit")``) and a dark one (``"miss"``), with
    the dark one labelled ``label_of(row)``; log axis when the medians span more than LOG_RATIO."""
    configs = sorted({(r.a, r.b) for r in panel.rows}, key=lambda ab: config_key(*ab))
    names = list(dict.fromkeys(panel.names))
    by_key = {(n, (r.a, r.b)): r for r, n in zip(panel.rows, panel.names, strict=True)}
    summaries = [summary_of(r, c) for r in panel.rows for c in ("hit", "miss")]
    log = _is_log([s.median for s in summaries if s.median])
    width = 0.8 / (2 * len(names))
    for s, name in enumerate(names):
        for k, (cond, _) in enumerate(CONDITIONS):
            for x, cfg in enumerate(configs):
                pos = x - 0.4 + width * (2 * s + k + 0.5)
                r = by_key.get((name, cfg))
                st = summary_of(r, cond) if r else Summary(0)
                if st.median is None:
                    _na(ax, pos)
                    continue
                ax.bar(pos, st.median, width, yerr=_err(st, log), capsize=2,
                       color=_tint(colors[name]) if cond == "hit" else colors[name],
                       edgecolor=colors[name], linewidth=0.8)
                if cond == "miss":
                    ax.annotate(label_of(r), (pos, _top(st)), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=7,
                                rotation=90 if len(names) > 2 else 0)
    ax.set_xticks(range(len(configs)), [f"A/B = {_ab(a)}/{_ab(b)}" for a, b in configs])
    ax.set_xlim(-0.5, len(configs) - 0.5)
    for x in range(len(configs) - 1):
        ax.axvline(x + 0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_ylabel(ylabel + (", log" if log else ""))
    _limits(ax, [_top(s) for s in summaries], log, room=1.3, lows=[s.median for s in summaries])
    ax.set_title(panel.title, fontsize=10, loc="left", fontweight="bold")
    ax.grid(axis="y", alpha=0.3)


BELOW_IN = 5.5  # height of the extra panel under a paired figure


def _paired_figure(panels: list[Panel], summary_of, label_of, ylabel: str, light: str, dark: str,
                   title: str, below=None, below_slots: int = 0) -> Figure:
    """fig1's layout: a panel per model (``fig1_panels``), colours per series, one legend for all;
    ``below(ax)`` draws one more full-width panel underneath (``below_slots`` x positions wide)."""
    series = list(dict.fromkeys(n for p in panels for n in p.names))
    colors = {name: series_color(i, len(series)) for i, name in enumerate(series)}
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
    handles += [Patch(facecolor=_tint("grey"), edgecolor="grey", label=f"light: {light}"),
                Patch(facecolor="grey", edgecolor="grey", label=f"dark: {dark}")]
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    top = axes[0].get_position().y1
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, top), fontsize=8, frameon=False,
               title="Series (phase, backend, settings)", title_fontsize=8)
    return fig


def _ab(v) -> str:
    return "?" if v is None else str(v)


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
    tokens = _max_tokens(rows)
    _hit_miss_panel(axes[0][1], rows, xs, "throughput", "Throughput (tokens/s)",
                    f"(b) Generation throughput, {tokens}-token run")
    _hit_miss_panel(axes[1][0], rows, xs, "ttft_non_streaming_ms", "Non-streaming TTFT (ms)",
                    "(c) Time to first token (non-streaming, 1 token)")
    _diff_panel(axes[1][1], rows, xs)
    for ax in axes.flat:
        _xticks(ax, xs, labels)
        ax.set_xlim(-0.6, n - 0.4)
    axes[0][0].legend(handles=_hit_miss_handles(), fontsize=8, loc="upper left")
    fig.suptitle(f"Experiment 1: cache hit vs cache miss per phase and backend\nbars = median over measured "
                 f"trials, {CI_NOTE}", fontsize=12)
    fig.tight_layout()
    return fig


def _max_tokens(rows: list[Row]) -> str:
    n = {r.max_output_tokens for r in rows}
    return str(n.pop()) if len(n) == 1 and None not in n else "N"


def _hit_miss_handles() -> list[Patch]:
    return [Patch(facecolor=_tint("C0"), edgecolor="C0", label="cache hit"),
            Patch(facecolor="C3", edgecolor="C3", label="cache miss")]


def _hit_miss_panel(ax, rows: list[Row], xs: list[float], metric: str, ylabel: str, title: str,
                    annotate: bool = False) -> None:
    sums = [(r, {c: r.summary(c, metric) for c, _ in CONDITIONS}) for r in rows]
    meds = [s.median for _, d in sums for s in d.values() if s.median]
    log = metric != "throughput" and _is_log(meds)
    w = 0.38
    for x, (r, d) in zip(xs, sums, strict=True):
        for k, (cond, _) in enumerate(CONDITIONS):
            pos = x + (k - 0.5) * w
            s = d[cond]
            if s.median is None:
                _na(ax, pos)
                continue
            color = _tint("C0") if cond == "hit" else "C3"
            ax.bar(pos, s.median, w, yerr=_err(s, log), capsize=3, color=color,
                   edgecolor="C0" if cond == "hit" else "C3", linewidth=0.8)
        if annotate and d["miss"].median is not None:
            ax.annotate(_pct(r.comparison(metric).rel_pct), (x + 0.5 * w, _top(d["miss"])), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
    if not meds:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    _limits(ax, [_top(s) for _, d in sums for s in d.values()], log, lows=meds)
    ax.set_ylabel(ylabel + (", log scale" if log else ""))
    ax.set_title(title + ("; label = miss vs hit change of the medians" if annotate else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _diff_panel(ax, rows: list[Row], xs: list[float]) -> None:
    tops, bottoms = [], []
    vertical = len(rows) > 8  # side by side, horizontal p labels of neighbouring bars run into each other
    for x, r in zip(xs, rows, strict=True):
        c = r.comparison()
        if c.diff is None:
            _na(ax, x)
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
        log = _is_log(meds)
        tops = []
        for ax, cfg in zip(axrow, configs, strict=True):
            for x, name in enumerate(names):
                r = by_key.get((name, cfg))
                for k, (cond, _) in enumerate(CONDITIONS):
                    pos = x + (k - 0.5) * w
                    st = r.summary(cond) if r else Summary(0)
                    if st.median is None:
                        _na(ax, pos)
                        continue
                    ax.bar(pos, st.median, w, yerr=_err(st, log), capsize=3,
                           color=_tint("C0") if cond == "hit" else "C3",
                           edgecolor="C0" if cond == "hit" else "C3", linewidth=0.8)
                    tops.append(_top(st))
                    ax.annotate(f"{st.median:.0f}" if st.median >= 10 else f"{st.median:.1f}", (pos, _top(st)),
                                xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
            _xticks(ax, range(len(names)), [wrap(n, 16) for n in names], fontsize=7)
            ax.set_xlim(-0.6, len(names) - 0.4)
            ax.set_title(f"{panel.title}: A/B = {_ab(cfg[0])}/{_ab(cfg[1])} tokens", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        _limits(axrow[0], tops, log, room=1.15, lows=meds)
        axrow[0].set_ylabel("Streaming TTFT, median (ms)" + (", log scale" if log else ""))
    axes[0][-1].legend(handles=_hit_miss_handles(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       frameon=False)
    fig.suptitle("Phase comparison: every backend, cache hit vs cache miss, a row per model\n"
                 f"bars = median (value on top), {CI_NOTE}", fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- three panel


def computation_ms(stats: dict) -> tuple[float | None, str]:
    """Prompt computation time: engine prompt time when reported, else non-streaming TTFT."""
    eng = stat(stats, "engine_prompt_ms")
    if eng is not None:
        return eng, "engine"
    return stat(stats, "ttft_non_streaming_ms"), "non-streaming"


def ttft_split(stats: dict) -> tuple[float, float] | None:
    """(computation, overhead) in ms; overhead = max(0, TTFT median - computation)."""
    ttft = stat(stats, "ttft_ms")
    comp, _ = computation_ms(stats)
    if ttft is None and comp is None:
        return None
    comp = comp if comp is not None else ttft
    return comp, max(0.0, (ttft if ttft is not None else comp) - comp)


def three_panel(ev: Evidence) -> Figure | str:
    """(1) TTFT = computation + overhead, (2) throughput, (3) warm-up; bars per
    backend x config, hit plain and miss hatched."""
    rows = [r for r in ev.rows if ttft_split(r.hit) or ttft_split(r.miss)]
    if not rows:
        return "no ok invalidation cell has TTFT or prompt-time data"
    xs = positions(rows)
    fig = Figure(figsize=(max(8.0, 2.5 + 0.9 * xs[-1]), 11.0))
    axes = fig.subplots(3, 1, sharex=True)
    _panel_split(axes[0], rows, xs)
    _panel_metric(axes[1], rows, xs, "throughput", "Throughput (tokens/s)", "C2",
                  f"(2) Generation throughput of the {_max_tokens(rows)}-token run (median, 95% CI)")
    _panel_metric(axes[2], rows, xs, "warmup_time_ms", "Warm-up time (ms)", "C4",
                  "(3) Warm-up [A,B] request time before each trial's query (median, 95% CI)\nit runs after the "
                  "PREVIOUS query: interleaved, a hit's warm-up follows a miss (see the cascade figure)",
                  handles=[Patch(facecolor="white", edgecolor="black", label="before a hit query (plain)"),
                           Patch(facecolor="white", edgecolor="black", hatch="//", label="before a miss query\n(hatched)")])
    for ax in axes:
        _separate_series(ax, rows, xs)
    axes[2].set_xticks(xs, [r.config for r in rows], fontsize=8)
    lines = _label_series(axes[2], rows, xs)
    axes[2].set_xlabel("Config A/B (tokens), grouped by phase and backend", labelpad=20 + 13 * lines)
    fig.suptitle("Where the time goes: TTFT breakdown, throughput and warm-up", fontsize=12)
    fig.tight_layout()
    return fig


def positions(rows: list[Row]) -> list[float]:
    """x of each row; a gap of half a slot between backends."""
    xs, x = [], 0.0
    for i, r in enumerate(rows):
        if i and r.name != rows[i - 1].name:
            x += 0.5
        xs.append(x)
        x += 1.0
    return xs


def _groups(rows: list[Row], xs: list[float]) -> list[tuple[str, float, float, int]]:
    """(series name, first x, last x, count) for each run of rows of one series."""
    out = []
    for r, x in zip(rows, xs, strict=True):
        if out and out[-1][0] == r.name:
            name, x0, _, n = out[-1]
            out[-1] = (name, x0, x, n + 1)
        else:
            out.append((r.name, x, x, 1))
    return out


def _separate_series(ax, rows: list[Row], xs: list[float]) -> None:
    for _, _, last, _ in _groups(rows, xs)[:-1]:
        ax.axvline(last + 0.75, color="grey", linewidth=0.6, linestyle=":")


def _label_series(ax, rows: list[Row], xs: list[float]) -> int:
    """Backend names centred under their group of config ticks; returns the most lines used."""
    most = 1
    lo, hi = ax.get_xlim()
    unit_in = ax.get_position().width * ax.figure.get_figwidth() / max(1e-9, hi - lo)  # inches per x unit
    for name, first, last, _ in _groups(rows, xs):
        text = wrap(name, max(10, int((last - first + 0.9) * unit_in / (CHAR_IN * 9 / 8))))
        most = max(most, text.count("\n") + 1)
        ax.text((first + last) / 2, -0.13, text, fontsize=9,
                ha="center", va="top", transform=ax.get_xaxis_transform())
    return most


HALF = 0.38  # bar width; hit at x - HALF/2, miss at x + HALF/2


def _offsets(x: float) -> dict[str, float]:
    return {"hit": x - HALF / 2, "miss": x + HALF / 2}


def _panel_split(ax, rows: list[Row], xs: list[float]) -> None:
    splits = [
        (pos, cond, split, r)
        for x, r in zip(xs, rows, strict=True)
        for cond, pos in _offsets(x).items()
        if (split := ttft_split(getattr(r, cond))) is not None
    ]
    tops = [c + o for _, _, (c, o), _ in splits if c + o > 0]
    log = bool(tops) and max(tops) / min(tops) > LOG_RATIO
    for pos, cond, (comp, over), r in splits:
        hatch = "//" if cond == "miss" else None
        ax.bar(pos, comp, HALF, color="C0", hatch=hatch, edgecolor="black", linewidth=0.5)
        ax.bar(pos, over, HALF, bottom=comp, color="C1", hatch=hatch, edgecolor="black", linewidth=0.5)
        s = r.summary(cond)
        if over > 0 and s.ci:  # the stack's top is the TTFT median: show its CI
            ax.errorbar(pos, comp + over, yerr=_err(s, log), fmt="none", ecolor="black", capsize=2, linewidth=0.8)
            tops.append(s.ci[1])
    if log:  # bars start at 0: keep the smallest segment above the axis floor
        ax.set_yscale("log")
        floor = min(v for _, _, split, _ in splits for v in split if v > 0)
        ax.set_ylim(floor / 2, max(tops) * 1.5)
    elif tops:
        ax.set_ylim(0, max(tops) * 1.1)
    ax.set_ylabel("TTFT (ms" + (", log scale)" if log else ")"))
    note = "; log scale: read boundaries on the axis, segment heights are not to scale" if log else ""
    ax.set_title("(1) Streaming TTFT split into computation and overhead (medians)\nerror bar = 95% CI of the "
                 f"TTFT median where the stack top is the TTFT{note}", fontsize=10)
    _legend_right(ax, [
        Patch(facecolor="C0", edgecolor="black", label="computation (engine prompt time,\nelse non-streaming TTFT)"),
        Patch(facecolor="C1", edgecolor="black", label="overhead (TTFT − computation)"),
        *_condition_handles(),
    ])
    ax.grid(axis="y", alpha=0.3)


def _condition_handles() -> list[Patch]:
    return [Patch(facecolor="white", edgecolor="black", label="cache hit (plain)"),
            Patch(facecolor="white", edgecolor="black", hatch="//", label="cache miss (hatched)")]


def _panel_metric(ax, rows: list[Row], xs: list[float], metric: str, ylabel: str, color: str, title: str,
                  handles: list[Patch] | None = None) -> None:
    drawn = False
    for x, r in zip(xs, rows, strict=True):
        for cond, pos in _offsets(x).items():
            s = r.summary(cond, metric)
            if s.median is None:
                continue
            drawn = True
            ax.bar(pos, s.median, HALF, yerr=_err(s), capsize=2, color=color,
                   hatch="//" if cond == "miss" else None, edgecolor="black", linewidth=0.5)
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend_right(ax, handles or _condition_handles())
    ax.grid(axis="y", alpha=0.3)


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
    fig = Figure(figsize=(10.5, 6.0))
    ax = fig.subplots()
    handles = []
    xmax = max(p.recomputed for p in points)
    for i, name in enumerate(series):
        color = series_color(i, len(series))
        pts = [p for p in points if p.series == name]
        for source, (marker, _) in SOURCE_MARKERS.items():
            sel = [p for p in pts if p.source == source]
            if sel:
                ax.scatter([p.recomputed for p in sel], [p.ttft_ms for p in sel], s=18, marker=marker,
                           facecolors="none" if source == "hit" else color, edgecolors=color,
                           linewidths=0.8, alpha=0.75)
        fit = linear_fit([p.recomputed for p in pts], [p.ttft_ms for p in pts])
        if fit is None:
            label = f"{name}: no fit (one recomputed-token value), n = {len(pts)}"
        else:
            ax.plot([0, xmax * 1.02], [fit.intercept, fit.intercept + fit.slope * xmax * 1.02], color=color,
                    linewidth=1.2, linestyle=series_linestyle(i))
            r2 = "n/a" if fit.r2 is None else f"{fit.r2:.3f}"
            label = (f"{name}: slope {fit.slope:.3g} ms/token, intercept {fit.intercept:.3g} ms,\n"
                     f"R² = {r2}, n = {fit.n}")
        handles.append(Line2D([], [], color=color, marker="o", linewidth=1.2, linestyle=series_linestyle(i), label=label))
    handles += [Line2D([], [], color="grey", marker=m, linestyle="none", markerfacecolor="none" if s == "hit"
                       else "grey", label=lab) for s, (m, lab) in SOURCE_MARKERS.items()
                if any(p.source == s for p in points)]
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("Recomputed tokens (prompt tokens − engine-reported cached tokens)")
    ax.set_ylabel("Streaming TTFT (ms)")
    ax.set_title("TTFT grows with the tokens the engine must recompute\nevery measured trial (warm-up trials "
                 "excluded); lines = least-squares fit per backend", fontsize=10)
    _legend_right(ax, handles)
    ax.grid(alpha=0.3)
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
            ax.annotate(_pct(c.rel_pct), (pos, max(hi, c.rel_pct)), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, rotation=90 if len(configs) > 2 else 0)
            tops.append(max(hi, 0.0))
    ax.axhline(0, color="black", linewidth=0.6)
    _xticks(ax, range(len(groups)), [wrap(n, 24) + (f"\n{wrap(v, 24)}" if v else "") for n, v in groups])
    top = max(tops or [1.0])
    values = sorted(abs(r.comparison().rel_pct) for r in rows)
    typical = max(values[len(values) // 2], SYMLOG_PCT / 10)
    symlog = top / typical > LOG_RATIO  # a few huge degradations would flatten every other bar to zero
    if symlog:
        ax.set_yscale("symlog", linthresh=SYMLOG_PCT)
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), top * 4)
    else:
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), top * 1.25)
    ax.set_ylabel("TTFT degradation of the miss (%)\n(median miss − median hit) / median hit"
                  + (f"\nsymlog: linear within ±{SYMLOG_PCT:.0f} %, log beyond" if symlog else ""))
    ax.set_title(f"TTFT degradation per backend, engine version and build\n{CI_NOTE.replace('median', 'ratio')}",
                 fontsize=10)
    _legend_right(ax, [Patch(facecolor=colors[c], edgecolor="black", label=f"A/B = {_ab(c[0])}/{_ab(c[1])}")
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
             f"each trial's warm-up attributed to the query run before it; {CI_NOTE}; label = after-miss / "
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
                _na(ax, pos)
                continue
            cached, rec = toks
            hatch = "//" if prev == "miss" else None
            ax.bar(pos, cached or 0, w, color="C2", hatch=hatch, edgecolor="black", linewidth=0.5)
            if rec is not None:
                ax.bar(pos, rec, w, bottom=cached or 0, color="C1", hatch=hatch, edgecolor="black", linewidth=0.5)
            text = f"{cached or 0:.0f} cached" + ("" if rec is None else f"\n{rec:.0f} recomputed")
            ax.annotate(text, (pos, (cached or 0) + (rec or 0)), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    _xticks(ax, range(len(found)), [_row_label(r) for r, _ in found])
    ax.set_xlim(-0.7, len(found) - 0.3)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_ylabel("Warm-up prompt tokens, median")
    ax.set_title("What the warm-up reused: cached vs recomputed tokens\n(left bar after a miss, hatched; right "
                 "after a hit)", fontsize=10)
    _legend_right(ax, [Patch(facecolor="C2", edgecolor="black", label="cached (reused)"),
                       Patch(facecolor="C1", edgecolor="black", label="recomputed"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="after a miss"),
                       Patch(facecolor="white", edgecolor="black", label="after a hit")])
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------- fig5: miss TTFT vs n_batch


def fig5_miss_ttft_vs_nbatch(ev: Evidence) -> Figure | str:
    """Cache-miss TTFT (median, 95 % CI) against n_batch per backend, log2 x axis; dashed: roofline floor."""
    pts = [p for p in ev.sweep if p.n_batch and p.summary.median is not None]
    if not pts:
        return "no ok batch_sweep cell with cache-miss TTFT trials"
    series = list(dict.fromkeys(p.series for p in pts))
    fig = Figure(figsize=(10.0, 5.6))
    ax = fig.subplots()
    handles = []
    floors = False
    for i, name in enumerate(series):
        color = series_color(i, len(series))
        sel = sorted((p for p in pts if p.series == name), key=lambda p: p.n_batch)
        x = [p.n_batch for p in sel]
        y = [p.summary.median for p in sel]
        err = [[e[0][0] for e in (_err(p.summary) for p in sel)], [e[1][0] for e in (_err(p.summary) for p in sel)]]
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
    ax.set_title(f"Miss TTFT vs batch size\npoints = median, {CI_NOTE}", fontsize=10)
    _legend_right(ax, handles)
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------- fig6: slot eviction


def fig6_slot_eviction(ev: Evidence) -> Figure | str:
    """Per condition and slot count: TTFT of the timed query, the share of it served from the cache
    (engine cache_n), and the re-warm of [A,B] after it; refused conditions marked. One column per
    backend / config / total context, the three metrics stacked."""
    if not ev.slots:
        return "no ok slot_eviction cell"
    groups = list(dict.fromkeys((r.series, r.config, r.n_ctx_total) for r in ev.slots))
    counts = sorted({r.n_parallel for r in ev.slots if r.n_parallel is not None})
    colors = {n: f"C{i % 10}" for i, n in enumerate(counts)}
    conds = list(SLOT_CONDITIONS)
    fig = Figure(figsize=(11.5 * len(groups) + 1.5, 12.0))
    axes = fig.subplots(3, len(groups), squeeze=False, sharex=True)
    w = 0.8 / max(1, len(counts))
    panels = [("ttft_ms", "Timed query TTFT,\nmedian (ms)", f"(a) Time to first token of the timed query; {CI_NOTE}"),
              ("share", "Query prompt served\nfrom cache (%)",
               "(b) Share of the timed query's prompt the engine reused: median cache_n / prompt tokens"),
              ("rewarm_time_ms", "Re-warm [A,B],\nmedian (ms)",
               f"(c) Getting [A,B] back: the warm-up request right after the query; {CI_NOTE}")]
    for g, (series, config, total) in enumerate(groups):
        rows = sorted((r for r in ev.slots if (r.series, r.config, r.n_ctx_total) == (series, config, total)),
                      key=lambda r: r.n_parallel or 0)
        for ax, (metric, ylabel, title) in zip(axes[:, g], panels, strict=True):
            _slot_panel(ax, rows, conds, counts, colors, w, metric)
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
            ax.set_xlim(-0.6, len(conds) - 0.4)
            ax.grid(axis="y", alpha=0.3)
        axes[-1][g].set_xticks(range(len(conds)), [f"{c}\n{wrap(SLOT_CONDITIONS[c], 18)}" for c in conds],
                               fontsize=8)
        axes[-1][g].set_xlabel("Condition: warm-up → timed query (pinned slots, or the server's choice; "
                               "[A',B'] = another client's prefix)")
        handles = [Patch(facecolor=colors[r.n_parallel], edgecolor="black",
                         label=f"N = {r.n_parallel} slot{'s' if r.n_parallel != 1 else ''}: {_ab(r.slot_ctx)} "
                               f"tok/slot" + ("" if r.fits.get("[A,B,Q]", True)
                                              else f", [A,B,Q] ({r.prompts.get('[A,B,Q]')} tok) does not fit"))
                   for r in rows if r.n_parallel in colors]
        axes[0][g].legend(handles=handles, fontsize=8, loc="upper left", frameon=True,
                          title=f"{wrap(series, 40)}, A/B = {config}, n_ctx = {_ab(total)}", title_fontsize=8)
    fig.suptitle("Slot eviction: llama-server with N slots sharing one total context", fontsize=12)
    fig.tight_layout()
    return fig


def _slot_panel(ax, rows, conds: list[str], counts: list[int], colors: dict, w: float, metric: str) -> None:
    """Bars per (condition, slot count); a condition whose trials were all refused gets a red 'refused'."""
    bars = []  # (position, summary or share, colour)
    for r in rows:
        k = counts.index(r.n_parallel) if r.n_parallel in counts else 0
        for x, name in enumerate(conds):
            pos = x - 0.4 + w * (k + 0.5)
            c = r.conditions.get(name)
            if c is None or not c.trials:
                refused = c is not None and bool(c.refused)
                ax.text(pos, 0.02, "refused" if refused else "n/a", transform=ax.get_xaxis_transform(),
                        rotation=90, ha="center", va="bottom", fontsize=7, color="C3" if refused else "grey")
                continue
            value = c.cached_share if metric == "share" else c.summary(metric)
            if value is not None and (metric == "share" or value.median is not None):
                bars.append((pos, value, colors[r.n_parallel]))
    if metric == "share":
        for pos, v, color in bars:
            ax.bar(pos, 100 * v, w, color=color, edgecolor="black", linewidth=0.5)
        ax.set_ylim(0, 105)
        return
    log = _is_log([st.median for _, st, _ in bars])
    for pos, st, color in bars:
        ax.bar(pos, st.median, w, yerr=_err(st, log), capsize=2, color=color, edgecolor="black", linewidth=0.5)
    _limits(ax, [_top(st) for _, st, _ in bars], log, room=1.15, lows=[st.median for _, st, _ in bars])


# ---------------------------------------------------------------- registry, CLI


SPECS: list[Spec] = [
    Spec("fig1_invalidation_cost", "Invalidation cost: hit vs miss TTFT per A/B config", "invalidation",
         fig1_invalidation_cost, "Median streaming TTFT of the cache hit and the cache miss per config and backend."),
    Spec("experiment1_results", "Experiment 1: TTFT, throughput and the hit/miss difference", "invalidation",
         experiment1_results,
         "2x2: streaming TTFT, throughput, non-streaming TTFT (hit vs miss) and the miss − hit difference of "
         "medians with its CI and Mann-Whitney p."),
    Spec("experiment1_phase_comparison", "Phase comparison: every backend, hit vs miss", "invalidation",
         experiment1_phase_comparison, "One panel per config; every backend's hit and miss median TTFT."),
    Spec("three_panel", "TTFT breakdown, throughput and warm-up", "invalidation", three_panel,
         "TTFT split into computation and overhead, generation throughput, warm-up time."),
    Spec("fig3_degradation", "TTFT degradation per backend / version / build", "invalidation", fig3_degradation,
         "Miss vs hit change of median TTFT in %, with bootstrap CI, labelled with engine version and build."),
    Spec("fig4_cascade", "Warm-up cascade: warm-up after a miss vs after a hit", "invalidation", fig4_cascade,
         "Each warm-up of [A,B] attributed to the query before it in run order."),
    Spec("fig2_ttft_vs_recomputed", "TTFT vs recomputed tokens, every trial", "recompute_scan",
         fig2_ttft_vs_recomputed,
         "All measured trials of invalidation (hit and miss) and recompute_scan cells, with a least-squares line "
         "per backend."),
    Spec("fig5_miss_ttft_vs_nbatch", "Miss TTFT vs n_batch", "batch_sweep", fig5_miss_ttft_vs_nbatch,
         "Median cache-miss TTFT per n_batch and backend, with the roofline floor dashed."),
    Spec("fig6_slot_eviction", "Slot eviction: N slots sharing one context", "slot_eviction", fig6_slot_eviction,
         "Per condition and slot count: TTFT of the timed query, the share of its prompt the engine served from "
         "the cache, and the time to get [A,B] back right after it; refused = the prompt does not fit a slot."),
    Spec("fig7_ttft_breakdown", "TTFT breakdown: client / interface / engine", "calibration",
         lambda ev: calibration.breakdown_figure(ev.cells),
         "Median parts of the streaming TTFT per backend, hit and miss: client time before the request left, "
         "the interface (HTTP, tokenization, chat template, scheduling) and the engine's own prompt time."),
]

#: figures that exist only for some runs: ``draw`` returns None (no entry, not "skipped") when they do not apply
WHEN_APPLICABLE: list[Spec] = [
    Spec("fig8_versions", "TTFT per engine release", "versions", lambda ev: versions.figure(ev.rows),
         "Median streaming TTFT of the cache hit (dashed, open) and the cache miss (solid, filled) per release, "
         "one panel per engine family, per interface (colour) and runtime (marker), with 95% bootstrap CIs."),
]


def main(argv: list[str] | None = None) -> int:
    """Regenerate every figure from existing result cells; nothing is rerun."""
    ap = argparse.ArgumentParser(prog="python -m kvmatrix.analysis.figures",
                                 description="Regenerate report figures (PNG + SVG) from result JSON.")
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run folder(s) holding cell *.json")
    ap.add_argument("--out", type=Path, default=None, help="write OUT/figures/ (default: the first DIR)")
    args = ap.parse_args(argv)
    try:
        cells = load_required(args.dirs)
    except NoCellsError as exc:
        print(f"kvmatrix: error: {exc}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else args.dirs[0]
    for f in make_figures(build_evidence(cells), out / "figures"):
        if f.path is None:
            print(f"skipped {f.name}: {f.note}")
        else:
            print(f.path)
            print(f.svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
