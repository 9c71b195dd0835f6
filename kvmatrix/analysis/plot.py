"""Drawing helpers every report figure shares (matplotlib Agg objects, no pyplot: no global state).

Bars are medians over the measured trials; error bars are 95 % bootstrap confidence intervals of the
median (``kvmatrix.analysis.stats``). ``save`` writes PNG (150 dpi) or SVG atomically, SVG ids stable.

Readable at page width: no figure is wider than MAX_WIDTH_IN (about 2400 px at 150 dpi). Many panels wrap
into a grid of at most MAX_COLS columns (``grid``), a long x axis of bar groups into several axes rows
(``pack_groups`` / ``group_axis``, ``split``); ``finish`` puts the title on top and ONE legend below the
panels, never wider than LEGEND_SHARE of the figure, then moves colliding labels apart (``place_labels``).
"""

from __future__ import annotations

import math
import re
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.text import Annotation

from kvmatrix.runners.results import atomic_target

if TYPE_CHECKING:
    from kvmatrix.analysis.stats import Summary

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


def median_bars(ax, bars: list[tuple[float, Summary]], width: float, *, log: bool = False, capsize: float = 3,
                **style) -> None:
    """Bars at the medians of ``(x, Summary)`` pairs with their CIs as error bars, in ONE call (many
    separate bars with error bars are slow to draw); a pair without a median gets the n/a mark."""
    drawn = [(x, s) for x, s in bars if s.median is not None]
    for x, s in bars:
        if s.median is None:
            na_mark(ax, x)
    if drawn:
        arms = [err(s, log) for _, s in drawn]
        ax.bar([x for x, _ in drawn], [s.median for _, s in drawn], width,
               yerr=[[a[0][0] for a in arms], [a[1][0] for a in arms]], capsize=capsize, **style)


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


def xticks(ax, xs, labels: list[str], fontsize: float = 8, slots: float | None = None) -> None:
    """Tick labels, each line wrapped to its slot (the axes' width over ``slots``, default one per label);
    rotated (one line each) when a word is still wider than the slot."""
    slot = ax.get_position().width * ax.figure.get_figwidth() / max(1, slots or len(labels))
    wrapped = [wrap_lines(lab, max(6, int(slot * 0.95 / (CHAR_IN * fontsize / 8)))) for lab in labels]
    longest = max((len(line) for lab in wrapped for line in lab.split("\n")), default=0)
    if longest * CHAR_IN * fontsize / 8 <= slot * 0.95:
        ax.set_xticks(xs, wrapped, fontsize=fontsize)
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
LEGEND_SHARE = 1 / 3  # the widest a legend may be, of the figure's width
LEGEND_MIN_CHARS = 16  # characters per legend line the figure is widened for, at least
MIN_WIDTH_IN = (LEGEND_MIN_CHARS * CHAR_IN + 0.55) / 0.95 / LEGEND_SHARE  # narrowest: a legend line holds that
LEGEND_GAP_IN = 0.12  # between the panels and the legend below them
GROUP_GAP = 0.5  # x units between two groups of a grouped axis
GROUP_PAD_PT = 17  # group names: points below the axis (under one line of tick labels)
GROUP_FONT = 8.5  # group names' font size
NAME_LINES = 4  # a group is made wide enough for its name in this many lines


def columns(n: int, panel_w: float, max_cols: int = MAX_COLS) -> int:
    """Panels per row: as many as fit MAX_WIDTH_IN (at least one), at most ``max_cols`` and ``n``."""
    return max(1, min(n, max_cols, int(MAX_WIDTH_IN // max(panel_w, 0.1))))


def panel_width(slots: float, slot_in: float, margin_in: float = 1.3, least: float = 4.0) -> float:
    """Width of a panel of ``slots`` x positions, ``slot_in`` inches each, within [least, MAX_WIDTH_IN]."""
    return min(MAX_WIDTH_IN, max(least, margin_in + slots * slot_in))


def per_row(slot_in: float, margin_in: float = 1.3) -> int:
    """How many x positions of ``slot_in`` inches one axes of MAX_WIDTH_IN holds (at least one)."""
    return max(1, int((MAX_WIDTH_IN - margin_in) // slot_in))


def split(items: list, most: int) -> list[list]:
    """``items`` in order, in the fewest chunks of at most ``most``, sizes differing by one at most."""
    k = max(1, -(-len(items) // max(1, most)))
    q, extra = divmod(len(items), k)
    out, i = [], 0
    for j in range(k):
        n = q + (j < extra)
        out.append(items[i:i + n])
        i += n
    return [c for c in out if c]


def grid(n: int | list[int], panel_w: float, panel_h: float, *, per_panel: int = 1, max_cols: int = MAX_COLS,
         sharey: bool = False, wide: int = 0, wide_w: float = 0.0, wide_h: float = 0.0) -> tuple[Figure, list[list]]:
    """Small multiples: ``n`` panels (a list: groups of panels, each group starting a new row), each
    ``per_panel`` axes stacked (``panel_w`` x ``panel_h`` inches each), wrapped into rows of at most
    ``max_cols`` panels and MAX_WIDTH_IN inches; then ``wide`` axes rows spanning every column
    (``wide_w`` x ``wide_h``). At least MIN_WIDTH_IN wide; the figure's size is the panels' area
    (``finish`` adds the title and the legend). Returns the figure and, per panel, its axes (top first;
    ``sharey``: shared within a panel), the wide rows last, one axes each; empty cells stay empty."""
    counts = [n] if isinstance(n, int) else list(n)
    panel_w = min(panel_w, MAX_WIDTH_IN)
    ncols = columns(max(counts, default=1), panel_w, max_cols)
    cells, row = [], 0
    for count in counts:
        cells += [(row + (p // ncols) * per_panel, p % ncols) for p in range(count)]
        row += -(-count // ncols) * per_panel
    width = max(panel_w * ncols, min(wide_w, MAX_WIDTH_IN) if wide else 0.0, MIN_WIDTH_IN)
    heights = [panel_h] * row + [wide_h] * wide
    fig = Figure(figsize=(width, sum(heights) or 1.0))
    # margins near what tight_layout will make of them: sizes measured before it (tick slots) come out right
    fig.subplots_adjust(left=min(0.25, 1.0 / width), right=1 - min(0.1, 0.2 / width))
    gs = fig.add_gridspec(max(1, len(heights)), ncols, height_ratios=heights or None)
    panels = []
    for r, c in cells:
        axes = []
        for k in range(per_panel):
            axes.append(fig.add_subplot(gs[r + k, c], sharey=axes[0] if sharey and axes else None))
        panels.append(axes)
    panels += [[fig.add_subplot(gs[row + k, :])] for k in range(wide)]
    return fig, panels


def renderer(fig: Figure):
    """The figure's Agg renderer (attaching an Agg canvas to a Figure made without pyplot)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


def wrap_lines(text: str, width: int) -> str:
    """Every line of ``text`` longer than ``width`` characters wrapped: at spaces, after slashes,
    underscores and hyphens, never inside a word."""
    def fill(line: str) -> str:
        for sep in "/_":
            line = line.replace(sep, sep + "\0")
        return textwrap.fill(line.replace("\0", " "), width, break_long_words=False).replace("/ ", "/").replace("_ ", "_")

    return "\n".join(fill(line) if len(line) > width else line for line in str(text).split("\n"))


def _entry_chars(fig_w_in: float, fontsize: float, share: float) -> int:
    """Characters per line of a one-column legend ``share`` of ``fig_w_in`` wide."""
    return int((fig_w_in * share * 0.95 - 0.55) / (CHAR_IN * fontsize / 8))


def legend(fig: Figure, handles, *, title: str | None = None, fontsize: float = 8, share: float = LEGEND_SHARE,
           ax=None, loc: str = "upper left"):
    """ONE legend centred at the bottom of the figure (or, with ``ax``, inside that axes at ``loc``), at
    most ``share`` of the figure's width: labels (and the title) wrapped to the width of one column, then
    as many columns as fit (measured, not guessed)."""
    r = renderer(fig)
    budget = fig.get_figwidth() * fig.dpi * share
    labels = [str(h.get_label()) for h in handles]
    longest = max((len(line) for lab in labels for line in lab.split("\n")), default=1)
    chars = max(8, min(longest, _entry_chars(fig.get_figwidth(), fontsize, share)))
    where = ({"loc": "lower center", "bbox_to_anchor": (0.5, 0.0), "frameon": False} if ax is None
             else {"loc": loc, "frameon": True})
    while True:
        for h, lab in zip(handles, labels, strict=True):
            h.set_label(wrap_lines(lab, chars))
        head = wrap_lines(title, max(chars, _entry_chars(fig.get_figwidth(), fontsize, share))) if title else None
        widest = max(len(line) for h in handles for line in h.get_label().split("\n"))
        start = max(1, min(len(handles), int(budget / fig.dpi // (widest * CHAR_IN * fontsize / 8 + 0.5)) + 1))
        for ncol in range(start, 0, -1):
            leg = (fig if ax is None else ax).legend(handles=handles, ncol=ncol, fontsize=fontsize, title=head,
                                                    title_fontsize=fontsize, **where)
            if leg.get_window_extent(r).width <= budget or (ncol == 1 and chars <= 8):
                return leg
            leg.remove()
        chars = max(8, int(chars * 0.8))


def finish(fig: Figure, title: str, handles=None, *, legend_title: str | None = None, fontsize: float = 8,
           title_size: float = 11, place: bool = True) -> None:
    """Title on top, ONE legend for the whole figure centred below the panels (never beside them, at most
    LEGEND_SHARE of the width), the figure grown by both (its size on entry is the panels' area), then the
    layout (tight_layout inside them) and, with ``place``, every axes' labels apart (``place_labels``)."""
    if handles:  # a narrow figure is widened until a legend line holds LEGEND_MIN_CHARS characters
        fig.set_figwidth(max(fig.get_figwidth(), MIN_WIDTH_IN))
    r = renderer(fig)
    panels_in = fig.get_figheight()
    per_line = int(fig.get_figwidth() * 0.95 / (CHAR_IN * title_size / 8))
    title = "\n".join(textwrap.fill(line, per_line, break_on_hyphens=False) for line in title.split("\n"))
    sup = fig.suptitle(title, fontsize=title_size, va="top")
    head_in = (sup.get_window_extent(r).height + 6) / fig.dpi  # tight_layout keeps the axes below it
    leg = legend(fig, handles, title=legend_title, fontsize=fontsize) if handles else None
    foot_in = (leg.get_window_extent(r).height / fig.dpi + LEGEND_GAP_IN) if leg else 0.0
    h = panels_in + head_in + foot_in
    fig.set_figheight(h)
    sup.set_y(1.0 - 4 / (h * fig.dpi))
    rect = (0, foot_in / h, 1, 1)
    for ax in fig.axes:  # labels hanging from data stay inside their axes (place_labels): not part of the layout
        for t in ax.texts:
            t.set_in_layout(not _in_data(t, ax))
        if place:  # first on the estimated layout: the limits grow, names below an axes are staggered
            place_labels(ax)
    fig.tight_layout(rect=rect)
    if place:
        outside = _outside(fig)
        for ax in fig.axes:
            place_labels(ax)
        if _outside(fig) != outside:  # names below an axes moved: the layout makes room once more
            fig.tight_layout(rect=rect)
            for ax in fig.axes:
                place_labels(ax)


def _outside(fig: Figure) -> list:
    """Where the texts not hanging from data points are (they are part of the layout)."""
    return [_base(t) for ax in fig.axes for t in ax.texts if not _in_data(t, ax)]


# ---------------------------------------------------------------- a long x axis of bar groups, in rows


@dataclass
class Group:
    """One group of a long x axis (a series and its configs): its items, where it starts and how many
    x units it spans (one per item, more when its name needs them)."""

    name: str
    items: list
    x0: float = 0.0  # left edge
    width: float = 1.0

    @property
    def xs(self) -> list[float]:
        """The x of each item (centres, one unit apart, centred in the group)."""
        off = (self.width - len(self.items)) / 2 + 0.5
        return [self.x0 + off + i for i in range(len(self.items))]


def _name_units(name: str, slot_in: float) -> float:
    """X units a group name needs, wrapped to at most NAME_LINES lines (its longest word at least)."""
    words = re.split(r"(?<=[ /_-])", name)
    chars = max(max(len(w.strip()) for w in words), -(-len(name) // NAME_LINES))
    return (chars * CHAR_IN * (GROUP_FONT + 0.5) / 8 + 0.1) / slot_in


def pack_groups(groups: list[tuple[str, list]], slot_in: float, margin_in: float = 1.3) -> list[list[Group]]:
    """Consecutive groups ``(name, items)`` into axes rows of at most MAX_WIDTH_IN (``slot_in`` inches per
    item, or what the name needs; GROUP_GAP between groups), rows balanced; a group longer than a row is
    split ("name (1/2)"). Each row's groups carry their x position."""
    cap = per_row(slot_in, margin_in)
    parts = []
    for name, items in groups:
        chunks = split(list(items), cap)
        for k, c in enumerate(chunks):
            label = name + (f" ({k + 1}/{len(chunks)})" if len(chunks) > 1 else "")
            parts.append(Group(label, c, width=min(cap, max(len(c), _name_units(label, slot_in)))))
    fewest = len(_fill(parts, cap))  # greedy: the fewest rows; then the narrowest rows that need no more
    lo, hi = max(g.width for g in parts), float(cap)
    while hi - lo > 0.05:
        lo, hi = (lo, (lo + hi) / 2) if len(_fill(parts, (lo + hi) / 2)) <= fewest else ((lo + hi) / 2, hi)
    return _fill(parts, hi)


def _fill(parts: list[Group], cap: float) -> list[list[Group]]:
    """Groups in order into rows of at most ``cap`` units (GROUP_GAP between groups), positions set."""
    rows, row, used = [], [], 0.0
    for g in parts:
        if row and used + GROUP_GAP + g.width > cap:
            rows.append(row)
            row, used = [], 0.0
        g.x0 = used + (GROUP_GAP if row else 0.0) - 0.5
        used = g.x0 + 0.5 + g.width
        row.append(g)
    return rows + ([row] if row else [])


def runs(items: list, key) -> list[tuple[str, list]]:
    """Consecutive items with the same ``key(item)`` as one group ``(key, items)``, in order."""
    groups: list[tuple[str, list]] = []
    for item in items:
        k = key(item)
        if groups and groups[-1][0] == k:
            groups[-1][1].append(item)
        else:
            groups.append((k, [item]))
    return groups


def units(rows: list[list[Group]]) -> float:
    """The x span of the longest of these axes rows (each row's axes gets the same, for equal slots)."""
    return max((row[-1].x0 + row[-1].width + 0.5 for row in rows if row), default=1.0)


def group_axis(ax, groups: list[Group], ticks: list[list[str]], span: float, fontsize: float = 8) -> None:
    """The x axis of one row of groups: a tick per item (``ticks``), the group's name centred under its
    ticks (wrapped to its width; ``place_labels`` staggers names that still collide), a dotted line
    between groups, x limits for ``span`` units (equal slots across rows)."""
    ax.set_xticks([x for g in groups for x in g.xs], [t for ts in ticks for t in ts], fontsize=fontsize)
    ax.set_xlim(-0.6, span - 0.4)
    unit_in = ax.get_position().width * ax.figure.get_figwidth() / span
    for g in groups:
        text = wrap_lines(g.name, max(6, int(((g.width + GROUP_GAP * 0.8) * unit_in - 0.1)
                                            / (CHAR_IN * GROUP_FONT / 8))))
        ax.annotate(text, (g.x0 + g.width / 2, 0), xycoords=("data", "axes fraction"),
                    xytext=(0, -GROUP_PAD_PT), textcoords="offset points", ha="center", va="top",
                    fontsize=GROUP_FONT, annotation_clip=False)
    for g in groups[:-1]:
        ax.axvline(g.x0 + g.width + GROUP_GAP / 2, color="grey", linewidth=0.6, linestyle=":")


def draw_rows(axes: list, packed: list[list[Group]], draw, tick) -> None:
    """One metric over several axes rows (``pack_groups``'s rows, one axes each): ``draw(ax, items, xs)``
    per row, then its grouped x axis (``tick(item)`` under each item, the group names under those)."""
    span = units(packed)
    for ax, groups in zip(axes, packed, strict=True):
        draw(ax, [it for g in groups for it in g.items], [x for g in groups for x in g.xs])
        group_axis(ax, groups, [[tick(it) for it in g.items] for g in groups], span)


# ---------------------------------------------------------------- signed bars: miss − hit in ms, % as label


def symlog_threshold(values: list[float]) -> float | None:
    """The linear threshold of a symlog axis when a few values would flatten the rest, else None."""
    mags = sorted(abs(v) for v in values if v)
    if not mags:
        return None
    typical = max(statistics.median(mags), 0.1)
    if mags[-1] / typical <= LOG_RATIO:
        return None
    return 10 ** math.ceil(math.log10(typical))  # a power of ten: no crowded ticks inside the linear part


def delta_bar(ax, pos: float, width: float, value: float, ci: tuple[float, float] | None, label: str, color, *,
              rotation: float = 0, fontsize: float = 7) -> list[float]:
    """A signed bar (a difference, e.g. miss − hit in ms) with its CI as error bar and ``label`` at its
    end (above a positive bar, below a negative one); returns the values the y limits must hold."""
    lo, hi = ci if ci else (value, value)
    ax.bar(pos, value, width, yerr=[[max(0.0, value - lo)], [max(0.0, hi - value)]], capsize=2, color=color,
           edgecolor="black", linewidth=0.5, error_kw={"linewidth": 0.8})
    up = value >= 0
    ax.annotate(label, (pos, max(hi, value) if up else min(lo, value)), xytext=(0, 2 if up else -2),
                textcoords="offset points", ha="center", va="bottom" if up else "top", fontsize=fontsize,
                rotation=rotation)
    return [lo, hi, value]


def delta_axis(ax, ends: list[float], unit: str = "ms") -> str:
    """Y axis of signed bars: the zero line, limits with room for the labels, symlog when a few values
    would flatten the rest (``symlog_threshold``); returns the y label's note ("" on a linear axis)."""
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    top, bottom = max(ends + [0.0]), min(ends + [0.0])
    thresh = symlog_threshold(ends)
    if thresh is not None:
        ax.set_yscale("symlog", linthresh=thresh)
        ax.set_ylim(bottom * 4 if bottom < 0 else 0.0, top * 4 if top > 0 else thresh)
        return f"symlog: linear within ±{thresh:g} {unit}"
    span = (top - bottom) or 1.0
    ax.set_ylim(bottom - (0.15 * span if bottom < 0 else 0.0), top + 0.18 * span)
    return ""


# ---------------------------------------------------------------- labels apart


def _direction(t) -> int:
    """+1: the label sits above its anchor (moved up when it collides); -1: below it (moved down)."""
    return -1 if t.get_va() == "top" else 1


def _offset(t) -> bool:
    return isinstance(t, Annotation) and t.anncoords == "offset points"


def _shift(t, base, dy_px: float) -> None:
    """Move a text ``dy_px`` display pixels from its base position (Annotation offsets in points)."""
    if _offset(t):
        t.xyann = (base[0], base[1] + dy_px * 72 / t.figure.dpi)
        return
    tr = t.get_transform()
    x, y = tr.transform(base)
    t.set_position(tr.inverted().transform((x, y + dy_px)))


def _base(t):
    return t.xyann if _offset(t) else t.get_position()


def _overlap(a, b, tol: float = 0.5) -> bool:
    return a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol


def _shown(texts) -> list:
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def overlapping(texts, renderer) -> list[tuple]:
    """Pairs of visible, non-empty texts whose bounding boxes overlap (display coordinates)."""
    shown = _shown(texts)
    boxes = [t.get_window_extent(renderer) for t in shown]
    return [(shown[i], shown[j]) for i in range(len(shown)) for j in range(i + 1, len(shown))
            if _overlap(boxes[i], boxes[j])]


def _in_data(t, ax) -> bool:
    """Whether the text hangs from a data point (its axes' limits move it), not from the axes frame."""
    if isinstance(t, Annotation):
        return t.xycoords == "data"
    return t.get_transform() == ax.transData


def place_labels(ax, texts=None, pad_px: float = 1.5, rounds: int = 8) -> bool:
    """Labels apart: a greedy vertical repel. Labels above their anchor (va bottom/center/baseline) are
    placed bottom-up, each moved up past every label already placed that it overlaps; labels below
    their anchor (va top) top-down, moved down. The y limits then grow until every label hanging from a
    data point fits inside the axes, and it is repeated from the original positions until nothing
    changes (new limits move the anchors). Call it after the layout is final (``finish`` /
    tight_layout): positions are measured on screen. True when the layout may have to follow (limits
    grown, or a label outside the data moved)."""
    texts = _shown(ax.texts if texts is None else texts)
    if not texts:
        return False
    entry = ax.get_ylim(), [_base(t) for t in texts if not _in_data(t, ax)]
    r = renderer(ax.figure)
    bases = getattr(ax, "_kvmatrix_label_bases", {})  # first positions: a later call starts from them too
    for t in texts:
        bases.setdefault(id(t), _base(t))
        if _in_data(t, ax):  # kept inside the axes here: the layout need not make room for it
            t.set_in_layout(False)
    ax._kvmatrix_label_bases = bases
    for _ in range(rounds):
        for t in texts:
            _shift(t, bases[id(t)], 0.0)
        boxes = {id(t): t.get_window_extent(r) for t in texts}
        placed = []
        order = sorted((t for t in texts if _direction(t) > 0), key=lambda t: boxes[id(t)].y0)
        order += sorted((t for t in texts if _direction(t) < 0), key=lambda t: -boxes[id(t)].y1)
        needs = []  # (anchor y in data, pixels the label reaches above it, below it) of labels on data points
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
                y = _anchor(t)
                a = ax.transData.transform((0, y))[1]
                needs.append((y, new.y1 - a, a - new.y0))
        if not _grow(ax, needs):
            break
    return (ax.get_ylim(), [_base(t) for t in texts if not _in_data(t, ax)]) != entry


def _anchor(t) -> float:
    """The data y a label hangs from."""
    return t.xy[1] if isinstance(t, Annotation) else t.get_position()[1]


def _grow(ax, needs: list[tuple[float, float, float]]) -> bool:
    """Extend the y limits so that every label fits inside the axes: ``needs`` holds per label the data y
    of its anchor and the pixels it reaches above and below it, which stay the same when the limits
    change; solved in the scale's own coordinates (linear, log, symlog alike). False when they fit."""
    box = ax.get_window_extent()
    h = box.height
    scale = ax.yaxis.get_transform()
    lo, hi = ax.get_ylim()
    lo_t, hi_t = scale.transform([lo, hi])
    new_lo, new_hi = lo_t, hi_t
    for y, up, down in needs:
        a = scale.transform([y])[0]
        pos = (a - lo_t) / (hi_t - lo_t) * h  # the anchor's height in the axes, pixels
        if pos + up > h - 2 and up < h - 4:
            new_hi = max(new_hi, lo_t + (a - lo_t) * h / (h - 3 - up))
        if pos - down < 2 and down < h - 4 and ax.get_yscale() != "log":  # a log axis keeps its floor
            k = (down + 3) / h
            new_lo = min(new_lo, (a - k * hi_t) / (1 - k))
    if new_lo >= lo_t and new_hi <= hi_t:
        return False
    ax.set_ylim(*scale.inverted().transform([new_lo, new_hi]))
    return True


def label_rotation(ax, n_slots: float, longest: int, fontsize: float = 7) -> int:
    """90 when a horizontal label of ``longest`` characters is wider than its slot (the axes'
    width over ``n_slots`` labels), else 0."""
    slot = ax.get_position().width * ax.figure.get_figwidth() / max(1.0, n_slots)
    return 90 if longest * CHAR_IN * fontsize / 8 > 0.9 * slot else 0
