"""The invalidation figure "three_panel": where the time goes (TTFT = computation + overhead), the
generation throughput and the warm-up, bars per backend x config, hit plain and miss hatched."""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvmatrix.analysis import plot
from kvmatrix.analysis.experiments.invalidation.rows import Row, max_tokens, ttft_split
from kvmatrix.analysis.fmt import wrap

if TYPE_CHECKING:
    from kvmatrix.analysis.experiments import Evidence


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
                  f"(2) Generation throughput of the {max_tokens(rows)}-token run (median, 95% CI)")
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
        text = wrap(name, max(10, int((last - first + 0.9) * unit_in / (plot.CHAR_IN * 9 / 8))))
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
    log = bool(tops) and max(tops) / min(tops) > plot.LOG_RATIO
    for pos, cond, (comp, over), r in splits:
        hatch = "//" if cond == "miss" else None
        ax.bar(pos, comp, HALF, color="C0", hatch=hatch, edgecolor="black", linewidth=0.5)
        ax.bar(pos, over, HALF, bottom=comp, color="C1", hatch=hatch, edgecolor="black", linewidth=0.5)
        s = r.summary(cond)
        if over > 0 and s.ci:  # the stack's top is the TTFT median: show its CI
            ax.errorbar(pos, comp + over, yerr=plot.err(s, log), fmt="none", ecolor="black", capsize=2, linewidth=0.8)
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
    plot.legend_right(ax, [
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
            ax.bar(pos, s.median, HALF, yerr=plot.err(s), capsize=2, color=color,
                   hatch="//" if cond == "miss" else None, edgecolor="black", linewidth=0.5)
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    plot.legend_right(ax, handles or _condition_handles())
    ax.grid(axis="y", alpha=0.3)
