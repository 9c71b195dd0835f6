"""Write-up of the prefix_reuse experiment, from result JSON only (the analysis is
``kvmatrix.analysis.experiments.prefix_reuse``; this is its entry point).

``python -m kvmatrix.analysis.prefix_report DIR [DIR ...]`` (also called by
``kvmatrix prefix`` at the end, as ``write_report(out_dir)``) writes into the first DIR:

* ``prefix_requests.csv`` / ``prefix_requests.json``: one row per timed request;
* ``prefix_summary.csv`` / ``prefix_summary.json``: one row per (engine, mode,
  prefix regime, concurrency, reuse mix): mean/p50/p95/p99 TTFT and end to
  end, tokens, tokens/s, requests/s, verified hit ratio;
* ``prompts.jsonl``: the prompt set the cells ran (the first cell's; the
  write-up says whether every cell's set was identical);
* ``prefix_caching_results.md``: prefix strategy, the server command lines,
  the summary tables, the hit-rate mental model, memory, conclusions: every
  number is computed from the data;
* ``figures/prefix_ttft_vs_concurrency.png``, ``figures/prefix_p95_e2e_vs_concurrency.png``.

Never imports a backend, and nothing beyond the standard library (matplotlib for the figures).
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvmatrix.analysis.experiments.prefix_reuse import (
    MODES,
    aggregate,
    collect,
    find,
    note,
    render,
    write_report,
)
from kvmatrix.cli_parser import ArgumentParser

__all__ = ["MODES", "aggregate", "collect", "find", "main", "note", "render", "write_report"]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; one-line error and exit 2 for a missing folder or one without prefix_reuse cells."""
    ap = ArgumentParser(prog="python -m kvmatrix.analysis.prefix_report",
                        description="The prefix-caching write-up (prefix_caching_results.md, CSV/JSON tables, "
                                    "prompts.jsonl, figures) from the result JSON of `kvmatrix prefix` runs.")
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                    help="run folder(s) holding prefix_reuse cell *.json (`kvmatrix prefix --out DIR`)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    args = ap.parse_args(argv)
    missing = [d for d in args.dirs if not d.exists()]
    if missing:
        print(f"kvmatrix: error: no prefix_reuse cells in {missing[0]}: no such folder; pass an existing results "
              "folder of `kvmatrix prefix`", file=sys.stderr)
        return 2
    if not collect(args.dirs)[0]:
        shown = " ".join(map(str, args.dirs))
        print(f"kvmatrix: error: no prefix_reuse cells in {shown}; run `kvmatrix prefix` (nox -s prefix) first or "
              "pass the folder that holds its *.json", file=sys.stderr)
        return 2
    path = write_report(args.out or args.dirs[0], args.dirs)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
