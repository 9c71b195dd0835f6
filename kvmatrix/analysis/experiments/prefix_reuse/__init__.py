"""The prefix_reuse experiment (repeated-prefix benchmark: caching off vs on, concurrency), from result JSON
only: its rows (``rows``), its write-up ``prefix_caching_results.md`` (``sections``) and figures
(``figures``). It has no section or figure in report.md: ``write_report`` (``python -m
kvmatrix.analysis.prefix_report DIR``, also run by ``kvmatrix prefix``) writes its own files.

Standard library only (matplotlib for the figures, when installed): ``kvmatrix prefix`` runs it on the host.
"""

from __future__ import annotations

from pathlib import Path

from kvmatrix.analysis.experiments.prefix_reuse.figures import write_figures
from kvmatrix.analysis.experiments.prefix_reuse.rows import (
    ENGINE_TITLES,
    MODES,
    NAME,
    REQUEST_COLUMNS,
    SUMMARY_COLUMNS,
    TABLE_COLUMNS,
    aggregate,
    collect,
    enrich,
    find,
    hit_rate_model,
    memory_rows,
    note,
    ratio,
)
from kvmatrix.analysis.experiments.prefix_reuse.sections import conclusions, memory_observation, prompt_set, render
from kvmatrix.analysis.fmt import json_safe, to_csv
from kvmatrix.analysis.load import ok_cells
from kvmatrix.runners.results import write_json_atomic, write_text_atomic

#: report.md has no prefix_reuse section or figure (the write-up is its own file)
FIGURES = ()

__all__ = ["ENGINE_TITLES", "FIGURES", "MODES", "NAME", "REQUEST_COLUMNS", "SUMMARY_COLUMNS", "TABLE_COLUMNS",
           "aggregate", "build", "collect", "conclusions", "enrich", "find", "hit_rate_model", "memory_observation",
           "memory_rows", "note", "ratio", "render", "sections", "write_figures", "write_report"]


def build(cells) -> list[dict]:
    """One summary row per (engine, mode, workload, prefix length, concurrency, reuse mix) of the ok cells."""
    rows = [r for d in ok_cells(cells, NAME) for r in d.requests or []]
    groups = aggregate(rows)
    enrich(groups, rows)
    return groups


def sections(ev, figures) -> list[str]:
    """None in report.md: the write-up is ``prefix_caching_results.md`` (``write_report``)."""
    return []


def write_report(out_dir: str | Path, dirs: list[str | Path] | None = None) -> Path:
    """Write the write-up, its CSV/JSON tables, prompts.jsonl and figures into ``out_dir`` from the prefix_reuse
    cells of ``dirs`` (default: ``out_dir``); returns the path of ``prefix_caching_results.md``."""
    out_dir = Path(out_dir)
    cells, ok, rows = collect([Path(d) for d in (dirs or [out_dir])])
    groups = aggregate(rows)
    enrich(groups, rows)
    write_text_atomic(out_dir / "prefix_requests.csv", to_csv(rows, REQUEST_COLUMNS))
    write_json_atomic(out_dir / "prefix_requests.json", {"requests": rows})
    write_text_atomic(out_dir / "prefix_summary.csv", to_csv(groups, SUMMARY_COLUMNS))
    write_json_atomic(out_dir / "prefix_summary.json", {"groups": [json_safe(g) for g in groups]})
    prompt_note, prompts = prompt_set(ok)
    if prompts is not None and prompts.is_file():
        write_text_atomic(out_dir / "prompts.jsonl", prompts.read_text())
    figures = write_figures(groups, out_dir / "figures") if groups else []
    path = out_dir / "prefix_caching_results.md"
    write_text_atomic(path, render(cells, ok, rows, groups, figures, out_dir, prompt_note))
    return path
