"""What a report figure is: its spec (declared by the analysis module it belongs to), the result of
drawing it, and how report.md embeds it. Standard library only; drawing is ``kvmatrix.analysis.figures``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FigureSpec:
    """One figure of report.md. ``draw(evidence)`` returns a matplotlib Figure, a note saying why it was
    skipped, or (``optional`` figures) None when it does not apply to these cells (no entry at all)."""

    name: str
    title: str
    section: str  # the report section that embeds it: an experiment name, "calibration", "versions"
    draw: Callable[[Any], Any]
    caption: str
    optional: bool = False


@dataclass
class FigureResult:
    """One figure: written to ``path`` (PNG; the SVG sits beside it), or skipped with ``note``."""

    name: str
    title: str
    section: str
    path: Path | None = None
    note: str = ""
    caption: str = ""

    @property
    def svg(self) -> Path | None:
        return None if self.path is None else self.path.with_suffix(".svg")


def embed(figures: list[FigureResult], section: str) -> list[str]:
    """The markdown of the figures of one section: image, title and caption, or why it was skipped."""
    out = []
    for f in figures:
        if f.section != section:
            continue
        if f.path is None:
            out.append(f"*{f.title}*: skipped ({f.note}).")
        else:
            out.append(f"![{f.title}](figures/{f.path.name})\n\n*{f.title}* — {f.caption} "
                       f"([SVG](figures/{f.svg.name}))")
    return out


def figure_list(figures: list[FigureResult]) -> str:
    """The report's "Figures" section: every figure's files, or why it was skipped."""
    lines = []
    for f in figures:
        if f.path is None:
            lines.append(f"- `{f.name}.png`, `.svg` — {f.title}: skipped ({f.note}).")
        else:
            lines.append(f"- [`{f.path.name}`](figures/{f.path.name}), [`{f.svg.name}`](figures/{f.svg.name}) — "
                         f"{f.title}")
    return ("## Figures\n\n" + "\n".join(lines) + "\n\nRegenerate them from these results alone: "
            "`python -m kvmatrix.analysis.figures DIR [DIR...]`.")
