"""Drawing helpers every report figure shares (matplotlib Agg objects, no pyplot: no global state).

Bars are medians over the measured trials; error bars are 95 % bootstrap confidence intervals of the
median (``kvmatrix.analysis.stats``). ``save`` writes PNG (150 dpi) or SVG atomically, SVG ids stable.
"""

from __future__ import annotations

import textwrap
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


# ---------------------------------------------------------------- small multiples, one legend, labels apart

MAX_WIDTH_IN = 15.5  # widest figure: 2325 px at 150 dpi (+ the tight bbox's padding), under the ~2400 px limit
MAX_COLS = 3  # panels per row of small multiples
LEGEND_GAP_IN = 0.12  # between the panels and the legend below them


def columns(n: int, panel_w: float, max_cols: int = MAX_COLS) -> int:
    """Panels per row: as many as fit MAX_WIDTH_IN (at least one), at most ``max_cols`` and ``n``."""
    return max(1, min(n, max_cols, int(MAX_WIDTH_IN // max(panel_w, 0.1))))


def panel_width(slots: float, slot_in: float, margin_in: float = 1.3, least: float = 4.0) -> float:
    """Width of a panel of ``slots`` x positions, ``slot_in`` inches each, within [least, MAX_WIDTH_IN]."""
    return min(MAX_WIDTH_IN, max(least, margin_in + slots * slot_in))


def grid(n: int, panel_w: float, panel_h: float, *, per_panel: int = 1, max_cols: int = MAX_COLS,
         head_in: float = 0.9, foot_in: float = 0.6) -> tuple[Figure, list[list]]:
    """Small multiples: ``n`` panels, each ``per_panel`` axes stacked (``panel_w`` x ``panel_h`` inches
    each), wrapped into rows of at most ``max_cols`` panels and MAX_WIDTH_IN inches; ``head_in`` above
    for the title, ``foot_in`` below for the legend. Returns the figure and, per panel, its axes
    (top first); cells of the grid without a panel are left empty."""
    panel_w = min(panel_w, MAX_WIDTH_IN)
    ncols = columns(n, panel_w, max_cols)
    nrows = -(-n // ncols) * per_panel
    fig = Figure(figsize=(panel_w * ncols, head_in + foot_in + panel_h * nrows))
    gs = fig.add_gridspec(nrows, ncols)
    panels = []
    for p in range(n):
        row, col = (p // ncols) * per_panel, p % ncols
        panels.append([fig.add_subplot(gs[row + k, col]) for k in range(per_panel)])
    return fig, panels


def renderer(fig: Figure):
    """The figure's Agg renderer (attaching an Agg canvas to a Figure made without pyplot)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


def legend_ncol(fig: Figure, handles, fontsize: float = 8, share: float = 1.0) -> int:
    """Columns for a legend below the panels: as many of its widest entry as fit ``share`` of the width."""
    longest = max((len(line) for h in handles for line in str(h.get_label()).split("\n")), default=1)
    entry_in = longest * CHAR_IN * fontsize / 8 + 0.55
    return max(1, min(len(handles), int(fig.get_figwidth() * share * 0.95 // entry_in)))


def finish(fig: Figure, title: str, handles=None, *, legend_title: str | None = None, ncol: int | None = None,
           fontsize: float = 8, title_size: float = 11) -> None:
    """Title on top, ONE legend for the whole figure centred below the panels (never beside them), then
    the layout: the panels fill what is left (tight_layout inside the measured title and legend)."""
    r = renderer(fig)
    h = fig.get_figheight() * fig.dpi
    per_line = int(fig.get_figwidth() * 0.95 / (CHAR_IN * title_size / 8))
    title = "\n".join(textwrap.fill(line, per_line, break_on_hyphens=False) for line in title.split("\n"))
    sup = fig.suptitle(title, fontsize=title_size, y=1.0 - 4 / h, va="top")
    top = 1.0 - (sup.get_window_extent(r).height + 10) / h
    bottom = 0.0
    if handles:
        leg = fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), frameon=False,
                         ncol=ncol or legend_ncol(fig, handles, fontsize), fontsize=fontsize, title=legend_title,
                         title_fontsize=fontsize)
        bottom = (leg.get_window_extent(r).height + LEGEND_GAP_IN * fig.dpi) / h
    fig.tight_layout(rect=(0, bottom, 1, top))


def _direction(t) -> int:
    """+1: the label sits above its anchor (moved up when it collides); -1: below it (moved down)."""
    return -1 if t.get_va() == "top" else 1


def _shift(t, base, dy_px: float) -> None:
    """Move a text ``dy_px`` display pixels from its base position (Annotation offsets in points)."""
    from matplotlib.text import Annotation  # noqa: PLC0415

    if isinstance(t, Annotation) and t.anncoords == "offset points":
        t.xyann = (base[0], base[1] + dy_px * 72 / t.figure.dpi)
        return
    tr = t.get_transform()
    x, y = tr.transform(base)
    t.set_position(tr.inverted().transform((x, y + dy_px)))


def _base(t):
    from matplotlib.text import Annotation  # noqa: PLC0415

    return t.xyann if isinstance(t, Annotation) and t.anncoords == "offset points" else t.get_position()


def _overlap(a, b, tol: float = 0.5) -> bool:
    return a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol


def overlapping(texts, renderer) -> list[tuple]:
    """Pairs of visible, non-empty texts whose bounding boxes overlap (display coordinates)."""
    shown = [t for t in texts if t.get_visible() and t.get_text().strip()]
    boxes = [t.get_window_extent(renderer) for t in shown]
    return [(shown[i], shown[j]) for i in range(len(shown)) for j in range(i + 1, len(shown))
            if _overlap(boxes[i], boxes[j])]


def _in_data(t, ax) -> bool:
    """Whether the text hangs from a data point (its axes' limits move it), not from the axes frame."""
    from matplotlib.text import Annotation  # noqa: PLC0415

    if isinstance(t, Annotation):
        return t.xycoords == "data"
    return t.get_transform() == ax.transData


def place_labels(ax, texts=None, pad_px: float = 1.5, rounds: int = 8) -> None:
    """Labels apart: a greedy vertical repel. Labels above their anchor (va bottom/center/baseline) are
    placed bottom-up, each moved up past every label already placed that it overlaps; labels below
    their anchor (va top) top-down, moved down. The y limits then grow until every label hanging from a
    data point fits inside the axes, and it is repeated from the original positions until nothing
    changes (new limits move the anchors). Call it after the layout is final (``finish`` /
    tight_layout): positions are measured on screen."""
    texts = [t for t in (ax.texts if texts is None else texts) if t.get_visible() and t.get_text().strip()]
    if not texts:
        return
    r = renderer(ax.figure)
    bases = {id(t): _base(t) for t in texts}
    for _ in range(rounds):
        for t in texts:
            _shift(t, bases[id(t)], 0.0)
        boxes = {id(t): t.get_window_extent(r) for t in texts}
        placed = []
        order = sorted((t for t in texts if _direction(t) > 0), key=lambda t: boxes[id(t)].y0)
        order += sorted((t for t in texts if _direction(t) < 0), key=lambda t: -boxes[id(t)].y1)
        top, bottom = None, None
        for t in order:
            bb, d, dy = boxes[id(t)], _direction(t), 0.0
            for _ in range(len(placed) + 1):
                hit = [p for p in placed if _overlap(bb.translated(0, dy), p)]
                if not hit:
                    break
                dy = (max(p.y1 for p in hit) - bb.y0 + pad_px) if d > 0 else (min(p.y0 for p in hit) - bb.y1 - pad_px)
            if dy:
                _shift(t, bases[id(t)], dy)
            new = bb.translated(0, dy)
            placed.append(new)
            if _in_data(t, ax):
                top = new.y1 if top is None else max(top, new.y1)
                bottom = new.y0 if bottom is None else min(bottom, new.y0)
        if not _grow(ax, top, bottom):
            return


def _grow(ax, top_px: float | None, bottom_px: float | None) -> bool:
    """Extend the y limits so that display rows ``top_px`` / ``bottom_px`` lie inside the axes;
    False when they already do."""
    box = ax.get_window_extent()
    over = 0.0 if top_px is None else top_px - (box.y1 - 2)
    under = 0.0 if bottom_px is None or ax.get_yscale() != "linear" else (box.y0 + 2) - bottom_px
    if over <= 0 and under <= 0:
        return False
    lo, hi = ax.get_ylim()
    frac_hi, frac_lo = max(0.0, over) / box.height, max(0.0, under) / box.height
    if ax.get_yscale() == "log":
        ax.set_ylim(lo, hi * (hi / lo) ** (frac_hi * 1.1 + 0.02))
    elif ax.get_yscale() == "linear":
        span = hi - lo
        ax.set_ylim(lo - span * (frac_lo * 1.1 + (0.02 if under > 0 else 0)),
                    hi + span * (frac_hi * 1.1 + (0.02 if over > 0 else 0)))
    else:  # symlog: no simple inverse, grow by a factor
        ax.set_ylim(lo * (1 + frac_lo * 2) if lo < 0 else lo, hi * (1.3 + frac_hi * 2))
    return True


def label_rotation(ax, n_slots: float, longest: int, fontsize: float = 7) -> int:
    """90 when a horizontal label of ``longest`` characters is wider than its slot (the axes'
    width over ``n_slots`` labels), else 0."""
    slot = ax.get_position().width * ax.figure.get_figwidth() / max(1.0, n_slots)
    return 90 if longest * CHAR_IN * fontsize / 8 > 0.9 * slot else 0
