"""Result folders -> cell documents (``kvmatrix.runners.document.CellDoc``), and the selections every
analysis makes of them. Standard library only.

Every public function of the analysis that takes cells accepts ``CellDoc`` objects or the plain dicts of
the JSON files (``as_docs``); a dict is read once, at the boundary.
"""

from __future__ import annotations

from pathlib import Path

from kvmatrix.runners.document import CellDoc, measured
from kvmatrix.runners.results import load_cells

__all__ = ["NoCellsError", "as_doc", "as_docs", "load_dirs", "load_required", "measured", "ok_cells"]


class NoCellsError(ValueError):
    """No result cell JSON in the given folders; str(e) is the one-line message."""


def as_doc(cell: CellDoc | dict) -> CellDoc:
    return cell if isinstance(cell, CellDoc) else CellDoc.from_dict(cell)


def as_docs(cells) -> list[CellDoc]:
    return [as_doc(c) for c in cells]


def load_dirs(dirs: list[str | Path]) -> list[CellDoc]:
    """Cells of all folders (their top-level *.json), each file once even if a folder is named twice."""
    seen, cells = set(), []
    for d in load_cells([Path(d) for d in dirs]):
        key = str(Path(d["_path"]).resolve())
        if key not in seen:
            seen.add(key)
            cells.append(CellDoc.from_dict(d))
    return cells


def load_required(dirs: list[str | Path]) -> list[CellDoc]:
    """``load_dirs``, raising NoCellsError (one line) when there is no cell at all."""
    cells = load_dirs(dirs)
    if not cells:
        shown = " ".join(str(d) for d in dirs) or "."
        raise NoCellsError(
            f"no result cells in {shown}; run nox -s phase3a first or pass the folder that holds the *.json"
        )
    return cells


def ok_cells(cells, experiment: str | None = None) -> list[CellDoc]:
    """The ok cells (of ``experiment``), in the given order."""
    return [c for c in as_docs(cells) if c.ok and (experiment is None or c.experiment == experiment)]
