"""Readable figures (issue #16, item 6): every report figure of every committed result folder, drawn again from
its cell JSON, is at most MAX_PX wide at 150 dpi, has no legend wider than a third of the figure and no two
labels of one axes on top of each other; the committed PNGs are as narrow; ``plot.place_labels`` moves texts
drawn on top of each other apart; ``plot.legend`` and ``plot.grid`` keep their bounds."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from kvmatrix.analysis import plot
from kvmatrix.analysis.experiments import build_evidence, prefix_reuse
from kvmatrix.analysis.experiments.prefix_reuse.figures import draw as prefix_figures
from kvmatrix.analysis.figures import SPECS, WHEN_APPLICABLE
from kvmatrix.analysis.load import load_dirs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
MAX_PX = 2400  # at plot.DPI: a figure readable at page width
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def result_sets() -> list[tuple[str, list[Path]]]:
    """Every committed folder with result cells (compare outputs have none): its own cell JSON, or, like
    the h100 / h200 runs, the subfolders holding them (the report is made from ``DIR/*/``)."""
    sets = []
    for d in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        dirs = [d] if load_dirs([d]) else [s for s in sorted(d.iterdir()) if s.is_dir() and load_dirs([s])]
        if dirs:
            sets.append((d.name, dirs))
    return sets


SETS = result_sets()


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head.startswith(PNG_MAGIC), path
    return struct.unpack(">II", head[16:24])


def legends(fig: Figure) -> list:
    return [*fig.legends, *(leg for ax in fig.axes if (leg := ax.get_legend()) is not None)]


def readability(fig: Figure) -> list[str]:
    """What makes a drawn figure hard to read: a legend wider than plot.LEGEND_SHARE of the figure, two
    labels of one axes overlapping (their rendered bounding boxes)."""
    r = plot.renderer(fig)
    width = fig.get_figwidth() * fig.dpi
    problems = [f"legend {leg.get_window_extent(r).width / width:.2f} of the width"
                for leg in legends(fig) if leg.get_window_extent(r).width > width * plot.LEGEND_SHARE + 0.5]
    for ax in fig.axes:
        problems += [f"{ax.get_title()[:40]!r}: {a.get_text()!r} overlaps {b.get_text()!r}"
                     for a, b in plot.overlapping(ax.texts, r)]
    return problems


def test_every_result_folder_is_found():
    names = [n for n, _ in SETS]
    assert {"cpu-demo-2026-12-01", "cpu-versions-2026-12-02", "h100-2026-11-22", "h200-2026-12-01"} <= set(names)
    assert not [n for n in names if n.startswith("compare-")]
    assert dict(SETS)["h200-2026-12-01"][0].parent.name == "h200-2026-12-01"  # cells in subfolders


@pytest.mark.parametrize(("name", "dirs"), SETS, ids=[n for n, _ in SETS])
def test_figures_of_committed_results_are_readable(name, dirs, tmp_path):
    """Drawn from the committed JSON into tmp_path (PNG, as the report writes it; no SVG: time)."""
    ev = build_evidence(load_dirs(dirs))
    drawn, problems = [], []
    for spec in SPECS + WHEN_APPLICABLE:
        fig = spec.draw(ev)
        if fig is None or isinstance(fig, str):
            continue
        width, _ = png_size(plot.save(fig, tmp_path / f"{spec.name}.png"))
        drawn.append(spec.name)
        problems += [f"{spec.name}: {width} px wide"] * (width > MAX_PX)
        problems += [f"{spec.name}: {p}" for p in readability(fig)]
    prefix = prefix_reuse.build(load_dirs(dirs))  # the prefix write-up's own figures
    for path in prefix_reuse.write_figures(prefix, tmp_path / "prefix") if prefix else []:
        width, _ = png_size(path)
        problems += [f"{path.name}: {width} px wide"] * (width > MAX_PX)
        drawn.append(path.stem)
    for pname, fig in prefix_figures(prefix) if prefix else []:
        problems += [f"{pname}: {p}" for p in readability(fig)]
    assert drawn, f"{name}: no figure drawn"
    assert not problems, "\n".join(problems)


def test_committed_pngs_are_readable_width():
    pngs = sorted(RESULTS.glob("*/figures/*.png"))
    assert pngs
    wide = [f"{p.relative_to(RESULTS)}: {w} px" for p in pngs if (w := png_size(p)[0]) > MAX_PX]
    assert not wide, "\n".join(wide)


def test_summary_figure_title_is_one_line():
    from kvmatrix.analysis import summary_figure

    assert "\n" not in summary_figure.TITLE
    assert "% of the hit" in summary_figure.FIGURES[0].caption  # the explanation moved to the caption


# ---------------------------------------------------------------- the helpers


def _stacked_labels(n: int = 6):
    fig, ((ax,),) = plot.grid(1, 6.0, 3.0)
    ax.bar(range(n), [10] * n, 0.9)
    ax.set_ylim(0, 11)
    for x in range(n):  # wide labels at one height: each runs into its neighbours
        ax.annotate(f"label number {x}", (x, 10), xytext=(0, 2), textcoords="offset points", ha="center",
                    va="bottom", fontsize=9)
    ax.text(0.5, 0.5, "centre", transform=ax.transAxes, ha="center", va="top")
    ax.text(0.5, 0.5, "centre too", transform=ax.transAxes, ha="center", va="top")
    return fig, ax


def test_place_labels_moves_overlapping_texts_apart():
    fig, ax = _stacked_labels()
    r = plot.renderer(fig)
    fig.tight_layout()
    assert len(plot.overlapping(ax.texts, r)) >= 5
    assert plot.place_labels(ax)
    assert plot.overlapping(ax.texts, r) == []
    box = ax.get_window_extent(r)
    for t in ax.texts[:6]:  # labels on data points end inside the axes (the y limits grew for them)
        bb = t.get_window_extent(r)
        assert box.y0 <= bb.y0 and bb.y1 <= box.y1
    assert ax.get_ylim()[1] > 11
    tops = sorted(t.get_window_extent(r).y0 for t in ax.texts[:6])
    assert tops[-1] > tops[0]  # moved up, not sideways
    assert ax.texts[7].get_window_extent(r).y1 <= ax.texts[6].get_window_extent(r).y0 + 0.5  # "va top": down


def test_place_labels_is_stable_and_leaves_separate_labels():
    fig, ax = _stacked_labels()
    r = plot.renderer(fig)
    fig.tight_layout()
    plot.place_labels(ax)
    first = [v for t in ax.texts for v in t.get_window_extent(r).bounds]
    assert not plot.place_labels(ax)  # a second call starts from the same positions: nothing left to do
    assert [v for t in ax.texts for v in t.get_window_extent(r).bounds] == pytest.approx(first)
    fig2, ((ax2,),) = plot.grid(1, 6.0, 3.0)
    ax2.set_xlim(0, 10)
    apart = [ax2.annotate("a", (x, 0.5), ha="center") for x in (1, 5, 9)]
    before = [t.get_position() for t in apart]
    assert not plot.place_labels(ax2)
    assert [t.get_position() for t in apart] == before


def test_place_labels_on_log_and_symlog_axes():
    for scale in ("log", "symlog"):
        fig, ax = _stacked_labels()
        ax.set_yscale(scale)
        ax.set_ylim(1, 11)
        r = plot.renderer(fig)
        fig.tight_layout()
        plot.place_labels(ax)
        assert plot.overlapping(ax.texts, r) == [], scale
        assert all(t.get_window_extent(r).y1 <= ax.get_window_extent(r).y1 for t in ax.texts[:6]), scale


def test_legend_is_at_most_a_third_and_below_the_panels():
    fig, ((ax,),) = plot.grid(1, 8.0, 3.0)
    handles = [Patch(label=f"series number {i} with a rather long name (FA off, cache-ram 8192)") for i in range(9)]
    plot.finish(fig, "A title", handles, legend_title="Series")
    r = plot.renderer(fig)
    leg = fig.legends[0]
    assert leg.get_window_extent(r).width <= fig.get_figwidth() * fig.dpi * plot.LEGEND_SHARE
    assert leg.get_window_extent(r).y1 < ax.get_tightbbox(r).y0  # under the panels, not beside them
    assert fig._suptitle.get_text() == "A title"


def test_grid_wraps_panels_and_stays_narrow():
    fig, panels = plot.grid(7, 6.0, 3.0)
    assert len(panels) == 7 and fig.get_figwidth() <= plot.MAX_WIDTH_IN
    cols = {round(p[0].get_position().x0, 3) for p in panels}
    assert len(cols) <= plot.MAX_COLS
    fig, panels = plot.grid([3, 1], 4.0, 3.0, wide=2, wide_w=40.0, wide_h=2.0)
    assert len(panels) == 6 and fig.get_figwidth() == plot.MAX_WIDTH_IN
    assert panels[3][0].get_position().y0 < panels[0][0].get_position().y0  # the second group: a new row


def test_pack_groups_balances_rows_within_the_width():
    groups = [(f"series {i}", list(range(3))) for i in range(11)] + [("a long one" * 3, [0])]
    rows = plot.pack_groups(groups, 0.65)
    assert sum(len(g.items) for row in rows for g in row) == 34
    assert plot.units(rows) * 0.65 + 1.3 <= plot.MAX_WIDTH_IN + 1e-9
    spans = [row[-1].x0 + row[-1].width for row in rows]
    assert max(spans) - min(spans) < 5  # balanced, not one full row and a stub
    xs = [x for row in rows[:1] for g in row for x in g.xs]
    assert xs == sorted(xs) and xs[0] == 0
