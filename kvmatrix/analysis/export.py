"""The machine-readable exports of a report folder: ``summary.csv``, ``summary.jsonl`` and ``trials.csv``.

* ``summary.csv`` / ``summary.jsonl``: one row per cell x condition, the summary model's rows
  (``kvmatrix.analysis.summary.build``, written by ``SummaryRow.export``: the settings that define the cell
  as ``setting_<name>`` columns, the headline numbers, ``summary_version`` first). The CSV has the union of
  the rows' ``setting_*`` columns (sorted, where ``settings`` is declared); a JSON line has the row's own.
* ``trials.csv``: one row per trial of every experiment (warm-up trials included, ``warmup`` says so): the
  cell's identity (``TRIAL_IDENTITY``; ``condition`` and ``axis`` as the summary rows name them, so the two
  files join on ``cell_id, condition, axis``), then every scalar trial key: those of ``results.Trial`` in
  its order (always, empty where a trial lacks one), those of a prefix_reuse request (``schema.REQUEST``;
  a prefix_reuse cell gives one row per timed request of ``cell.requests``, ``trial`` = its ``index``,
  ``ttft_ms`` = ``ttft_s`` x 1000), then any other scalar key in the order first seen, then the object
  keys of ``results.Trial`` (``device``, ``device_settle``, ``breakdown``) flattened one level
  (``device.sm_clock_mhz``).

CSV values: empty for None and non-finite numbers, ``True`` / ``False``, lists and objects as compact JSON.
JSON lines: standard JSON (non-finite numbers -> null). Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

from kvmatrix.analysis import summary
from kvmatrix.analysis.fmt import to_csv
from kvmatrix.analysis.labels import config_key, phase_key
from kvmatrix.analysis.load import as_docs
from kvmatrix.analysis.schema import REQUEST
from kvmatrix.runners.document import CellDoc
from kvmatrix.runners.results import Trial, write_text_atomic

__all__ = ["EXPORTS", "TRIAL_FIELDS", "TRIAL_IDENTITY", "TRIAL_OBJECTS", "summary_columns", "summary_records",
           "trial_columns", "trial_records", "write_exports"]

#: the files ``write_exports`` writes, in order
EXPORTS = ("summary.csv", "summary.jsonl", "trials.csv")
#: trials.csv: the cell and condition a trial belongs to
TRIAL_IDENTITY = ("cell_id", "run", "experiment", "status", "phase", "backend", "series", "model", "a", "b", "q",
                  "condition", "axis")


def _is_object(hint) -> bool:
    return hint is dict or dict in typing.get_args(hint)


_HINTS = typing.get_type_hints(Trial)
#: results.Trial's object fields: flattened one level into ``<field>.<key>`` columns
TRIAL_OBJECTS = tuple(f.name for f in dataclasses.fields(Trial) if _is_object(_HINTS[f.name]))
#: trials.csv: the scalar trial keys every file has a column for (results.Trial's, then a request's)
TRIAL_FIELDS = tuple(dict.fromkeys(
    [f.name for f in dataclasses.fields(Trial) if f.name not in TRIAL_OBJECTS]
    + [k for k in REQUEST if k not in TRIAL_IDENTITY]))


def _scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _clean(v):
    """JSON-safe: non-finite floats -> None, inside lists and objects too."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _csv_value(v):
    v = _clean(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return v


# ---------------------------------------------------------------- summary


def _summary_rows(evidence_or_cells) -> list[summary.SummaryRow]:
    rows = getattr(evidence_or_cells, "summary", None)
    if rows is None:
        rows = summary.build(evidence_or_cells)
    return sorted(rows, key=lambda r: (summary.sort_key(r), r.cell_id, r.run))


def summary_records(evidence_or_cells) -> list[dict]:
    """The summary rows as exported (``SummaryRow.export``), in table order, JSON-safe."""
    return [_clean(r.export()) for r in _summary_rows(evidence_or_cells)]


def summary_columns(records: list[dict]) -> list[str]:
    """summary.csv's header: ``summary_version``, the SummaryRow fields in their order with the union of the
    ``setting_*`` columns (sorted) where ``settings`` is, then any key an export adds, in the order seen."""
    settings = sorted({k for r in records for k in r if k.startswith("setting_")})
    cols = ["summary_version"]
    for f in dataclasses.fields(summary.SummaryRow):
        if f.name == "settings":
            cols += settings
        elif f.name != "values":
            cols.append(f.name)
    return list(dict.fromkeys(cols + [k for r in records for k in r]))


# ---------------------------------------------------------------- trials


def _identity(cell: CellDoc) -> dict:
    axis_key = summary.AXIS_SETTING.get(str(cell.experiment))
    req = cell.runtime.requested or {}
    return {"cell_id": cell.cell_id, "run": cell.run, "experiment": cell.experiment,
            "status": "ok" if cell.ok else (cell.status or "failed"), "phase": cell.phase, "backend": cell.backend,
            "series": cell.series_label, "model": cell.model.title, "a": cell.config.context_size_a,
            "b": cell.config.context_size_b, "q": cell.config.query_tokens, "condition": "",
            "axis": f"{axis_key}={req.get(axis_key)}" if axis_key else ""}


def _flat(trial: dict) -> dict:
    out = {}
    for k, v in trial.items():
        if k in TRIAL_OBJECTS:  # flattened; None (no sample) leaves its columns empty
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items() if _scalar(vv)})
        elif _scalar(v) and k not in TRIAL_IDENTITY:
            out[k] = v
    return out


def _prefix_condition(r: dict) -> str:
    """A request's group, named as the summary's prefix_reuse rows name their condition."""
    return (f"{r.get('workload')} prefix={r.get('prefix_len_tokens')} c={r.get('concurrency')} "
            f"reuse={r.get('reuse_pct')}%")


def _cell_trials(cell: CellDoc) -> list[dict]:
    ident = _identity(cell)
    out = []
    if cell.experiment == "prefix_reuse":
        for r in cell.requests or []:
            if not isinstance(r, dict):
                continue
            ttft = r.get("ttft_s")
            row = {**ident, "condition": _prefix_condition(r), "trial": r.get("index"), "warmup": False,
                   "ttft_ms": ttft * 1000 if isinstance(ttft, (int, float)) and not isinstance(ttft, bool) else None}
            row.update(_flat(r))
            out.append(row)
        return out
    for cond, trials in cell.trial_blocks():
        scan = cond.startswith("scan ")
        where = {"condition": "scan", "axis": cond.split(" ", 1)[1]} if scan else {"condition": cond}
        for t in trials:
            if isinstance(t, dict):
                out.append({**ident, **where, **_flat(t)})
    return out


def _cell_order(c: CellDoc) -> tuple:
    return (str(c.experiment), phase_key(c.phase), c.series_label, str(c.model.title),
            config_key(c.config.context_size_a, c.config.context_size_b), str(c.cell_id), str(c.run))


def trial_records(evidence_or_cells) -> list[dict]:
    """One record per trial (per timed request of a prefix_reuse cell) of every cell, ok or failed, the cells
    in table order (experiment, phase, series, model, config), each cell's trials in ``trial_blocks`` order."""
    cells = getattr(evidence_or_cells, "cells", None)
    cells = as_docs(evidence_or_cells if cells is None else cells)
    return [r for c in sorted(cells, key=_cell_order) for r in _cell_trials(c)]


def trial_columns(records: list[dict]) -> list[str]:
    """trials.csv's header: TRIAL_IDENTITY, TRIAL_FIELDS, other scalar keys as first seen, the flattened objects
    (in results.Trial's order of them, their keys as first seen)."""
    cols = list(TRIAL_IDENTITY) + list(TRIAL_FIELDS)
    seen = list(dict.fromkeys(k for r in records for k in r if k not in cols))
    flat = [k for k in seen if k.split(".", 1)[0] in TRIAL_OBJECTS and "." in k]
    flat.sort(key=lambda k: TRIAL_OBJECTS.index(k.split(".", 1)[0]))  # stable: keys as first seen
    return cols + [k for k in seen if k not in flat] + flat


# ---------------------------------------------------------------- files


def _csv(records: list[dict], columns: list[str]) -> str:
    return to_csv([{k: _csv_value(v) for k, v in r.items()} for r in records], tuple(columns))


def write_exports(evidence_or_cells, out_dir: str | Path) -> list[Path]:
    """Write summary.csv, summary.jsonl and trials.csv into ``out_dir`` (atomically) from an ``Evidence``
    (its built summary rows and cells) or cells (``CellDoc``s or dicts); returns their paths, in ``EXPORTS``
    order. Written for every report, with a header even when there are no rows."""
    out_dir = Path(out_dir)
    rows = summary_records(evidence_or_cells)
    trials = trial_records(evidence_or_cells)
    jsonl = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    return [
        write_text_atomic(out_dir / "summary.csv", _csv(rows, summary_columns(rows))),
        write_text_atomic(out_dir / "summary.jsonl", jsonl),
        write_text_atomic(out_dir / "trials.csv", _csv(trials, trial_columns(trials))),
    ]
