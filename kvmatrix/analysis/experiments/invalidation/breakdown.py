"""The invalidation figure "three_panel": where the time goes (TTFT = computation + overhead), the
generation throughput and the warm-up, bars per backend x config, hit plain and miss hatched."""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvmatrix.analysis import plot
from kvmatrix.analysis.experiments.invalidation.rows import Row, max_tokens, ttft_split

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments import Evidence


SLOT_IN = 0.9  # inches per row (config): its hit and miss bars
ROW_H = 3.4  # one axes row


def three_panel(ev: Evidence) -> Figure | str:
    """(1) TTFT = computation + overhead, (2) throughput, (3) warm-up; bars per backend x config, hit
    plain and miss hatched; a long axis of backends wraps into several axes rows per metric."""
    rows = [r for r in ev.rows if ttft_split(r.hit) or ttft_split(r.miss)]
    if not rows:
        return "no ok invalidation cell has TTFT or prompt-time data"
    packed = plot.pack_groups(plot.runs(rows, lambda r: r.name), SLOT_IN)
    fig, panels = plot.grid(3, plot.panel_width(plot.units(packed), SLOT_IN, least=6.0), ROW_H,
                            per_panel=len(packed), max_cols=1, sharey=True)
    log = _log(rows)
    config = lambda r: r.config  # noqa: E731 - the tick of a row

    plot.draw_rows(panels[0], packed, lambda ax, rs, xs: _panel_split(ax, rs, xs, log), config)
    plot.draw_rows(panels[1], packed, lambda ax, rs, xs: _panel_metric(ax, rs, xs, "throughput", "C2"), config)
    plot.draw_rows(panels[2], packed, lambda ax, rs, xs: _panel_metric(ax, rs, xs, "warmup_time_ms", "C4"), config)
    _split_limits(panels[0][0], rows, log)
    note = "; log scale: read boundaries on the axis, segment heights are not to scale" if log else ""
    titles = [("TTFT (ms" + (", log scale)" if log else ")"),
               "(1) Streaming TTFT split into computation and overhead (medians)\nerror bar = 95% CI of the TTFT "
               f"median where the stack top is the TTFT{note}"),
              ("Throughput (tokens/s)", f"(2) Generation throughput of the {max_tokens(rows)}-token run (median, "
                                        "95% CI)"),
              ("Warm-up time (ms)", "(3) Warm-up [A,B] request time before each trial's query (median, 95% CI); "
                                    "plain = before a hit query, hatched = before a miss query\nit runs after the "
                                    "PREVIOUS query: interleaved, a hit's warm-up follows a miss (see the cascade "
                                    "figure)")]
    for axes, (ylabel, title) in zip(panels, titles, strict=True):
        for ax in axes:
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        axes[0].set_title(title, fontsize=10)
    handles = [Patch(facecolor="C0", edgecolor="black", label="computation (engine prompt time, else non-streaming TTFT)"),
               Patch(facecolor="C1", edgecolor="black", label="overhead (TTFT − computation)"),
               *_condition_handles()]
    plot.finish(fig, "Where the time goes: TTFT breakdown, throughput and warm-up\nx = config A/B (tokens), "
                     "grouped by phase and backend", handles, title_size=12)
    return fig


HALF = 0.38  # bar width; hit at x - HALF/2, miss at x + HALF/2


def _offsets(x: float) -> dict[str, float]:
    return {"hit": x - HALF / 2, "miss": x + HALF / 2}


def _splits(rows: list[Row]) -> list[tuple[float, float]]:
    return [sp for r in rows for cond in ("hit", "miss") if (sp := ttft_split(getattr(r, cond))) is not None]


def _log(rows: list[Row]) -> bool:
    """Whether the TTFT stacks of these rows need a log axis."""
    tops = [c + o for c, o in _splits(rows) if c + o > 0]
    return bool(tops) and max(tops) / min(tops) > plot.LOG_RATIO


def _panel_split(ax, rows: list[Row], xs: list[float], log: bool) -> None:
    for x, r in zip(xs, rows, strict=True):
        for cond, pos in _offsets(x).items():
            split = ttft_split(getattr(r, cond))
            if split is None:
                continue
            comp, over = split
            hatch = "//" if cond == "miss" else None
            ax.bar(pos, comp, HALF, color="C0", hatch=hatch, edgecolor="black", linewidth=0.5)
            ax.bar(pos, over, HALF, bottom=comp, color="C1", hatch=hatch, edgecolor="black", linewidth=0.5)
            s = r.summary(cond)
            if over > 0 and s.ci:  # the stack's top is the TTFT median: show its CI
                ax.errorbar(pos, comp + over, yerr=plot.err(s, log), fmt="none", ecolor="black", capsize=2,
                            linewidth=0.8)


def _split_limits(ax, rows: list[Row], log: bool) -> None:
    """Y scale and limits of panel (1), from every row (its axes rows share the y axis)."""
    splits = _splits(rows)
    tops = [c + o for c, o in splits if c + o > 0]
    tops += [s.ci[1] for r in rows for cond in ("hit", "miss")
             if (sp := ttft_split(getattr(r, cond))) and sp[1] > 0 and (s := r.summary(cond)).ci]
    if log:  # bars start at 0: keep the smallest segment above the axis floor
        ax.set_yscale("log")
        floor = min(v for split in splits for v in split if v > 0)
        ax.set_ylim(floor / 2, max(tops) * 1.5)
    elif tops:
        ax.set_ylim(0, max(tops) * 1.1)


def _condition_handles() -> list[Patch]:
    return [Patch(facecolor="white", edgecolor="black", label="cache hit (plain)"),
            Patch(facecolor="white", edgecolor="black", hatch="//", label="cache miss (hatched)")]


def _panel_metric(ax, rows: list[Row], xs: list[float], metric: str, color: str) -> None:
    for cond in ("hit", "miss"):
        bars = [(_offsets(x)[cond], s) for x, r in zip(xs, rows, strict=True)
                if (s := r.summary(cond, metric)).median is not None]
        plot.median_bars(ax, bars, HALF, capsize=2, color=color, hatch="//" if cond == "miss" else None,
                         edgecolor="black", linewidth=0.5)
    if not any(r.summary(c, metric).median is not None for r in rows for c in ("hit", "miss")):
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
