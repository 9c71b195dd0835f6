"""Result folders -> cell documents (``kvmatrix.runners.document.CellDoc``), and the selections every
analysis makes of them. Standard library only, except ``load_checked`` (validation: ``jsonschema``).

Every public function of the analysis that takes cells accepts ``CellDoc`` objects or the plain dicts of
the JSON files (``as_docs``); a dict is read once, at the boundary.

``load_dirs`` / ``load_required`` skip what is not a cell (``results.load_cells``). ``load_checked`` reads the
same files and says what it skipped: every top-level ``*.json`` that is not valid JSON (unreadable), and
every cell file that breaks the JSON Schema (``kvmatrix.analysis.schema``), each as a ``Problem`` (path and
one line); only valid cells are returned. A cell file is a JSON object with ``schema_version``, or with
``cell_id`` and ``status`` (a cell missing its ``schema_version``); any other JSON (cell specs,
``prefix_requests.json``, ``peer_check.json`` ...) is not a cell and not a problem.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvmatrix.analysis.schema import Problem, first_error
from kvmatrix.runners.document import CellDoc, measured
from kvmatrix.runners.results import load_cells

__all__ = ["NoCellsError", "Problem", "as_doc", "as_docs", "is_cell_file", "load_checked", "load_dirs",
           "load_required", "measured", "ok_cells", "read_checked"]


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


def is_cell_file(d) -> bool:
    """Whether parsed JSON is meant as a cell document (then it must be valid): an object with
    ``schema_version``, or with ``cell_id`` and ``status``. Cell specs (``cells/``) have neither."""
    return isinstance(d, dict) and ("schema_version" in d or ("cell_id" in d and "status" in d))


def read_checked(path: str | Path) -> tuple[CellDoc | None, Problem | None]:
    """One file: (its CellDoc, None) when it is a valid cell, (None, Problem) when it is unreadable or an
    invalid cell, (None, None) when it is JSON that is not a cell."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return None, Problem(str(path), f"unreadable: {' '.join(str(exc).split())}")
    if not text.strip():
        return None, Problem(str(path), "unreadable: empty file")
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, Problem(str(path), f"unreadable: not valid JSON ({exc})")
    if not is_cell_file(d):
        return None, None
    err = first_error(d)
    if err is not None:
        return None, Problem(str(path), f"invalid: {err}")
    d["_path"] = str(path)
    return CellDoc.from_dict(d), None


def load_checked(dirs: list[str | Path]) -> tuple[list[CellDoc], list[Problem]]:
    """(valid cells, problems) of the top-level ``*.json`` of all folders (or the files named), each file once
    even if a folder is named twice, in ``load_dirs``' order; problems: the unreadable files and the invalid
    cell files, with a one-line reason (``unreadable: ...`` / ``invalid: <where>: <what>``)."""
    seen: set[str] = set()
    cells: list[CellDoc] = []
    problems: list[Problem] = []
    for p in (Path(d) for d in dirs):
        for f in [p] if p.is_file() else sorted(p.glob("*.json")):
            key = str(f.resolve())
            if key in seen:
                continue
            seen.add(key)
            doc, problem = read_checked(f)
            if doc is not None:
                cells.append(doc)
            if problem is not None:
                problems.append(problem)
    return cells, problems


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
