"""Drawing helpers every report figure shares (matplotlib Agg objects, no pyplot: no global state).

Bars are medians over the measured trials; error bars are 95 % bootstrap confidence intervals of the
median (``kvmatrix.analysis.stats``). ``save`` writes PNG (150 dpi) or SVG atomically, SVG ids stable.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from kvmatrix.analysis.stats import Summary
from kvmatrix.runners.results import atomic_target

DPI = 150
FORMATS = ("png", "svg")
LOG_RATIO = 30  # switch a TTFT axis to log scale when max/min exceeds this
CI_NOTE = "error bars = 95% bootstrap CI of the median"
STABLE_SVG = {"svg.hashsalt": "kvmatrix"}  # stable SVG ids: same results, same file
CHAR_IN = 0.075  # approximate width of one 8-pt character, inches


def save(fig: Figure, path: Path) -> Path:
    """Write the figure atomically (temp file in the same folder, then rename); format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".")
    meta = {"Date": None} if fmt == "svg" else {}
    with atomic_target(path, suffix=path.suffix) as tmp, matplotlib.rc_context(STABLE_SVG):
        fig.savefig(tmp, dpi=DPI, format=fmt, bbox_inches="tight", metadata=meta)
    return path


def tint(color, amount: float = 0.55):
    """The colour mixed with white (lighter shade for the cache-hit bar)."""
    return tuple(c + (1 - c) * amount for c in to_rgb(color))


def err(s: Summary, log: bool = False) -> list[list[float]]:
    """Asymmetric CI error bar of a median; on a log axis the lower arm stays above zero."""
    arms = s.err
    if arms is None:
        return [[0.0], [0.0]]
    lo, hi = arms
    if log and s.median and s.median > 0:
        lo = min(lo, 0.9 * s.median)
    return [[max(0.0, lo)], [max(0.0, hi)]]


def top(s: Summary) -> float:
    """Upper end of a bar's error bar."""
    if s.median is None:
        return 0.0
    return s.ci[1] if s.ci else s.median


def is_log(values: list[float]) -> bool:
    vals = [v for v in values if v and v > 0]
    return bool(vals) and max(vals) / min(vals) > LOG_RATIO


def limits(ax, tops: list[float], log: bool, room: float = 1.25, lows: list[float] | None = None) -> None:
    """Y limits leaving room above the tallest error bar for its label (and, on a log axis,
    below the shortest bar in ``lows`` so that it stays visible)."""
    tallest = max([t for t in tops if t] or [1.0])
    if log:
        ax.set_yscale("log")
        positive = [v for v in lows or [] if v and v > 0]
        ax.set_ylim(min(positive) / 3 if positive else None, tallest * 4)
    else:
        ax.set_ylim(0, tallest * room)


def na_mark(ax, pos: float) -> None:
    ax.text(pos, 0.02, "n/a", transform=ax.get_xaxis_transform(), rotation=90,
            ha="center", va="bottom", fontsize=7, color="grey")


def legend_right(ax, handles, **kw) -> None:
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, **kw)


def xticks(ax, xs, labels: list[str], fontsize: int = 8) -> None:
    """Tick labels; rotated (one line each) when the longest line would not fit its slot."""
    slot = ax.get_position().width * ax.figure.get_figwidth() / max(1, len(labels))
    longest = max((len(line) for lab in labels for line in lab.split("\n")), default=0)
    if longest * CHAR_IN * fontsize / 8 <= slot * 0.95:
        ax.set_xticks(xs, labels, fontsize=fontsize)
    else:
        ax.set_xticks(xs, [" ".join(lab.split("\n")).replace("/ ", "/") for lab in labels], fontsize=fontsize,
                      rotation=30, ha="right", rotation_mode="anchor")


def series_color(i: int, n: int):
    """Distinct colours: the default cycle up to 10 series, the 20-colour table beyond."""
    if n <= 10:
        return f"C{i}"
    from matplotlib import colormaps  # noqa: PLC0415

    return colormaps["tab20"](i % 20)


def series_linestyle(i: int) -> str:
    return ("-", "--", ":", "-.")[(i // 20) % 4]
