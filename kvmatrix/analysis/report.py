"""report.md and figures from one or more run folders of result cells.

Usage: ``python -m kvmatrix.analysis.report DIR [DIR...] [--out DIR]``
writes ``<out or first DIR>/report.md`` (atomically) and ``figures/*.png`` + ``*.svg``.

The report is summary first: the header, the Summary (``headline``: generated findings per interface and
model, the summary figure, the narrow headline table), the findings in detail (``findings``), then every
experiment's sections in catalogue order (``kvmatrix.analysis.experiments``), each followed by the sections
that read its cells (``FOLLOWS``), the checks every report ends with (``CLOSING``), and the Appendix (each
module's wide tables, the figure files, the statistics method, a hand-written ``findings.md`` from the output
folder when there is one).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

from kvmatrix.analysis import (
    attribution,
    calibration,
    checks,
    export,
    findings,
    headline,
    html,
    provenance,
    roofline,
    schema,
    stats,
    versions,
)
from kvmatrix.analysis.experiments import Evidence, build_evidence, modules
from kvmatrix.analysis.figure import FigureResult, figure_list
from kvmatrix.analysis.figures import make_figures
from kvmatrix.analysis.load import NoCellsError, load_checked
from kvmatrix.cli_parser import ArgumentParser
from kvmatrix.runners.results import write_text_atomic

__all__ = ["NoCellsError", "main", "render", "write_report"]

#: after an experiment's own sections, the cross-cutting sections that read its cells
FOLLOWS = {"invalidation": (calibration, versions, attribution)}
#: the report's last sections: the roofline floor of every experiment's points, the checks of every cell
#: (outliers, device state, unverified trials, failed cells), settings parity and provenance
CLOSING = (roofline, checks, provenance)


def write_report(dirs: list[Path], out: Path | None = None, *, cells=None, problems=()) -> Path:
    """Merge the cells of ``dirs``; write report.md, report.html, the exports (summary.csv, summary.jsonl,
    trials.csv) and figures/ into ``out`` (default dirs[0]). Unreadable or invalid files (``problems``, from
    ``load.load_checked``) are listed in the report, never silently dropped."""
    dirs = [Path(d) for d in dirs]
    if cells is None:
        cells, problems = load_checked(dirs)
    if not cells:
        shown = " ".join(str(d) for d in dirs) or "."
        bad = f" ({len(problems)} unreadable or invalid file(s): {problems[0].path}: {problems[0].reason})" \
            if problems else ""
        raise NoCellsError(f"no result cells in {shown}{bad}; run nox -s phase3a first or pass the folder that "
                           "holds the *.json")
    out = Path(out) if out is not None else dirs[0]
    ev = build_evidence(cells)
    figures = make_figures(ev, out / "figures")
    export.write_exports(ev, out)
    notes = out / "findings.md"  # a hand-written reading of these numbers, kept across regenerations
    hand_written = notes.read_text() if notes.is_file() else None
    text = render(ev, figures, hand_written, problems)
    path = write_text_atomic(out / "report.md", text)
    html.write_html(out, text)
    return path


def render(ev: Evidence, figures: list[FigureResult], hand_written: str | None = None, problems=()) -> str:
    """The whole report.md text; ``hand_written`` (markdown, optional) goes to the appendix; ``problems``
    (unreadable / invalid files) right after the header."""
    parts = [_header(ev, len(problems)), schema.problems_section(list(problems)), *headline.sections(ev, figures),
             *findings.sections(ev, figures)]
    for mod in modules():
        parts += mod.sections(ev, figures)
        for follower in FOLLOWS.get(mod.NAME, ()):
            parts += follower.sections(ev, figures)
    for closing in CLOSING:
        parts += closing.sections(ev, figures)
    parts += _appendix(ev, figures, hand_written)
    return "\n\n".join(p.rstrip() for p in parts if p.strip()) + "\n"


def _appendix(ev: Evidence, figures: list[FigureResult], hand_written: str | None) -> list[str]:
    """The wide tables (each module's ``appendix``), the figure files, the statistics method, hand-written notes."""
    parts = ["## Appendix", *findings.appendix(ev, figures)]
    for mod in modules():
        parts += getattr(mod, "appendix", lambda ev, figures: [])(ev, figures)
    parts.append(figure_list(figures).replace("## Figures", "### Figure files", 1))
    parts.append("### Statistics\n\n" + _method())
    if hand_written:
        parts.append("### Notes (hand-written, from findings.md)\n\n" + hand_written.strip())
    return parts


def _method() -> str:
    text = getattr(stats, "METHOD_TEXT", None)
    if text is None:
        text = (f"Over measured trials (warm-up trials excluded). Medians with 95% percentile-bootstrap "
                f"CIs ({stats.N_BOOT:,} resamples, seed {stats.SEED}); p = two-sided Mann-Whitney U, miss vs hit "
                f"(exact null distribution when the smaller sample has ≤ {stats.EXACT_MAX_N} values and there are "
                "no ties, else the normal approximation with tie and continuity correction).")
    return (text + f" CV = stdev / mean; outliers = beyond Tukey fences ({stats.TUKEY_K} IQR), flagged under "
            "Outlier trials and never dropped.")


def _header(ev: Evidence, n_problems: int = 0) -> str:
    cells = ev.cells
    ok = sum(1 for c in cells if c.ok)
    runs = ", ".join(sorted({str(c.run) for c in cells}))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    by_exp: dict[str, int] = {}
    for c in cells:
        if c.ok:
            by_exp[c.experiment] = by_exp.get(c.experiment, 0) + 1
    exps = ", ".join(f"{k} {v}" for k, v in sorted(by_exp.items())) or "none"
    return (
        "# KV cache invalidation: cache hit vs cache miss TTFT\n\n"
        f"- Runs: {runs}\n"
        f"- Cells: {len(cells)} ({ok} ok, {len(cells) - ok} failed); ok cells per experiment: {exps}\n"
        + (f"- **{n_problems} result file(s) unreadable or invalid**: listed below, not in any number\n"
           if n_problems else "") +
        f"- Generated: {now}"
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; one-line error and exit 2 when a folder is missing or there are no cells."""
    ap = ArgumentParser(prog="python -m kvmatrix.analysis.report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run folder(s) holding cell *.json")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    ap.add_argument("--allow-invalid", action="store_true",
                    help="exit 0 even when a result file is unreadable or invalid (it is still listed)")
    args = ap.parse_args(argv)
    missing = [d for d in args.dirs if not d.exists()]
    if missing:  # not "no result cells": a mistyped folder is not an empty run
        print(f"kvmatrix: error: no result cells in {missing[0]}: no such folder; pass an existing run folder that "
              "holds the cell *.json (results/<run-name>)", file=sys.stderr)
        return 2
    cells, problems = load_checked(args.dirs)
    for p in problems:
        print(schema.problem_line(p), file=sys.stderr)
    try:
        path = write_report(args.dirs, args.out, cells=cells, problems=problems)
    except NoCellsError as exc:
        print(f"kvmatrix: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    if problems and not args.allow_invalid:
        print(f"kvmatrix: error: {len(problems)} result file(s) unreadable or invalid (listed in the report); "
              "fix or remove them, or pass --allow-invalid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
