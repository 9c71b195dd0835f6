"""Report figures, each as PNG (150 dpi) and SVG, drawn off-screen (matplotlib Agg, no pyplot).

Every analysis module declares its figures (``FIGURES``: ``kvmatrix.analysis.figure.FigureSpec``): first
the summary figure (``LEAD``: ``kvmatrix.analysis.summary_figure``, section "summary"), then each
experiment's in catalogue order (``kvmatrix.analysis.experiments``), then the cross-cutting ones
(``CROSS``: the calibration's TTFT breakdown, the versions figure). ``make_figures(evidence, folder)``
draws every figure it has data for and says why it skipped the others; the report embeds the former and
quotes the latter.

Regenerate the figures of existing results without rerunning anything::

    python -m kvmatrix.analysis.figures DIR [DIR...] [--out DIR]

writes ``<out or first DIR>/figures/*.png`` and ``*.svg``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvmatrix.analysis import calibration, summary_figure, versions
from kvmatrix.analysis.experiments import Evidence, build_evidence, modules
from kvmatrix.analysis.figure import FigureResult, FigureSpec
from kvmatrix.analysis.load import NoCellsError, load_required
from kvmatrix.analysis.plot import FORMATS, save

#: the report's one summary figure, before every other
LEAD = (summary_figure,)
#: the figures of modules that read across experiments, after the experiments' own
CROSS = (calibration, versions)

#: every figure, in report order
ALL: list[FigureSpec] = [spec for mod in (*LEAD, *modules(), *CROSS) for spec in mod.FIGURES]
#: the figures every report lists (drawn, or skipped with the reason)
SPECS: list[FigureSpec] = [s for s in ALL if not s.optional]
#: figures that exist only for some runs: ``draw`` returns None (no entry, not "skipped") when they do not apply
WHEN_APPLICABLE: list[FigureSpec] = [s for s in ALL if s.optional]


def make_figures(ev: Evidence, folder: Path) -> list[FigureResult]:
    """Draw all figures into ``folder``; one result per figure, drawn or skipped (a ``WHEN_APPLICABLE``
    figure that does not apply to these cells has none)."""
    folder = Path(folder)
    return [r for spec in SPECS + WHEN_APPLICABLE if (r := _draw(spec, ev, folder)) is not None]


def _draw(spec: FigureSpec, ev: Evidence, folder: Path) -> FigureResult | None:
    fig_or_note = spec.draw(ev)
    stem = folder / spec.name
    if fig_or_note is None or isinstance(fig_or_note, str):
        for fmt in FORMATS:  # no stale figure from an earlier report
            stem.with_suffix(f".{fmt}").unlink(missing_ok=True)
        return None if fig_or_note is None else FigureResult(spec.name, spec.title, spec.section, note=fig_or_note)
    for fmt in FORMATS:
        save(fig_or_note, stem.with_suffix(f".{fmt}"))
    return FigureResult(spec.name, spec.title, spec.section, path=stem.with_suffix(".png"), caption=spec.caption)


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
