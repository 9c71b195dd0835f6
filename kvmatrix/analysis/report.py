"""report.md and figures from one or more run folders of result cells.

Usage: ``python -m kvmatrix.analysis.report DIR [DIR...] [--out DIR]``
writes ``<out or first DIR>/report.md`` (atomically) and ``figures/*.png``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from tabulate import tabulate

from kvmatrix.analysis.figures import FigureResult, computation_ms, make_figures
from kvmatrix.analysis.summary import (
    Row,
    build_rows,
    is_ok,
    phase_key,
    provenance_row,
    settings_parity,
    stat,
    unverified_trials,
)
from kvmatrix.runners.results import load_cells, write_text_atomic

MARK = "†"  # rows whose stats include unverified trials
NA = "—"


class NoCellsError(ValueError):
    """No result cell JSON in the given folders; str(e) is the one-line message."""


def write_report(dirs: list[Path], out: Path | None = None) -> Path:
    """Merge the cells of ``dirs``; write report.md and figures/ into ``out`` (default dirs[0])."""
    dirs = [Path(d) for d in dirs]
    cells = _load(dirs)
    if not cells:
        shown = " ".join(str(d) for d in dirs) or "."
        raise NoCellsError(
            f"no result cells in {shown}; run nox -s phase3a first or pass the folder that holds the *.json"
        )
    out = Path(out) if out is not None else dirs[0]
    rows = build_rows(cells)
    figures = make_figures(rows, out / "figures")
    return write_text_atomic(out / "report.md", render(cells, rows, figures))


def _load(dirs: list[Path]) -> list[dict]:
    """Cells of all folders, each file once even if a folder is named twice."""
    seen, cells = set(), []
    for cell in load_cells(dirs):
        key = str(Path(cell["_path"]).resolve())
        if key not in seen:
            seen.add(key)
            cells.append(cell)
    return cells


def render(cells: list[dict], rows: list[Row], figures: list[FigureResult]) -> str:
    """The whole report.md text."""
    parts = [
        _header(cells),
        _main_table(rows),
        _unverified_section(cells),
        _failed_section(cells),
        _parity_section(cells),
        _provenance_section(cells),
        _figures_section(rows, figures),
    ]
    return "\n\n".join(p.rstrip() for p in parts) + "\n"


def _table(rows: list[list] | list[dict], headers="keys") -> str:
    return tabulate(rows, headers=headers, tablefmt="github", missingval=NA, disable_numparse=True)


def _header(cells: list[dict]) -> str:
    ok = sum(1 for c in cells if is_ok(c))
    runs = ", ".join(sorted({str(c.get("run")) for c in cells}))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        "# KV cache invalidation: cache hit vs cache miss TTFT\n\n"
        f"- Runs: {runs}\n"
        f"- Cells: {len(cells)} ({ok} ok, {len(cells) - ok} failed)\n"
        f"- Generated: {now}"
    )


def ms(v: float | None) -> str:
    return NA if v is None else f"{v:.1f}"


def med_sd(stats: dict, metric: str) -> str:
    """"median ± stdev" of a metric, one decimal."""
    med, sd = stat(stats, metric), stat(stats, metric, "stdev")
    if med is None:
        return NA
    return f"{med:.1f} ± {sd:.1f}" if sd is not None else f"{med:.1f}"


def pair(hit: float | None, miss: float | None) -> str:
    """"hit / miss" medians, one decimal."""
    return NA if hit is None and miss is None else f"{ms(hit)} / {ms(miss)}"


def verified(stats: dict) -> str:
    n = stats.get("n_trials")
    return NA if n is None else f"{stats.get('verified_trials', 0)}/{n}"


def trial_counts(r: Row) -> str:
    """Measured + warm-up trials; one figure when hit and miss agree."""
    hit = f"{r.hit.get('n_trials', '?')} + {r.warmups[0]}"
    miss = f"{r.miss.get('n_trials', '?')} + {r.warmups[1]}"
    return hit if hit == miss else f"{hit} / {miss}"


MAIN_HEADERS = [
    "Phase", "Backend", "A/B (tok)", "Hit TTFT (ms)", "Miss TTFT (ms)", "Degradation (%)",
    "Non-stream TTFT hit / miss (ms)", "Overhead hit / miss (ms)", "Throughput hit (tok/s)",
    "Warm-up hit / miss (ms)", "Verified hit", "Verified miss", "Trials (measured + warm-up)",
]


def main_row(r: Row) -> list[str]:
    """One row of the main table."""
    deg = NA if r.degradation_pct is None else f"{r.degradation_pct:+.1f}"
    return [
        r.phase, f"{r.series} {MARK}" if r.unverified else r.series, r.config,
        med_sd(r.hit, "ttft_ms"), med_sd(r.miss, "ttft_ms"), deg,
        pair(stat(r.hit, "ttft_non_streaming_ms"), stat(r.miss, "ttft_non_streaming_ms")),
        pair(stat(r.hit, "overhead_ms"), stat(r.miss, "overhead_ms")),
        ms(stat(r.hit, "throughput")),
        pair(stat(r.hit, "warmup_time_ms"), stat(r.miss, "warmup_time_ms")),
        verified(r.hit), verified(r.miss), trial_counts(r),
    ]


def _main_table(rows: list[Row]) -> str:
    if not rows:
        return "## Results\n\nNo ok cells: nothing to tabulate (see Failed cells)."
    notes = [
        "TTFT columns are median ± stdev over measured trials (warm-up trials excluded); "
        "degradation is (miss − hit) / hit of the mean streaming TTFT, as recorded in each cell. "
        "Non-streaming TTFT is a 1-token non-streaming call; overhead = streaming − non-streaming TTFT. "
        "Rows are ordered by phase, backend, then config (largest A first).",
    ]
    flagged = [r for r in rows if r.unverified]
    if flagged:
        n = sum(r.unverified for r in flagged)
        notes.append(f"{MARK} The statistics of this row include {n} unverified trial(s) in total "
                     "(cached tokens did not match the expectation); they are listed under "
                     "Unverified trials, not dropped.")
    return "## Results\n\n" + _table([main_row(r) for r in rows], MAIN_HEADERS) + "\n\n" + "\n\n".join(notes)


def _unverified_section(cells: list[dict]) -> str:
    found = [u for c in cells if is_ok(c) for u in unverified_trials(c)]
    head = "## Unverified trials\n\n"
    if not found:
        return head + "None: every measured trial's cached-token count matched the expectation."
    rows = [{
        "cell": u.cell_id, "condition": u.condition.replace("cache_", ""), "trial": u.trial,
        "cached tokens": "not reported" if u.cached_tokens is None else u.cached_tokens,
        "expected cached": u.expected_cached_tokens, "granularity": u.cache_granularity,
    } for u in found]
    return head + ("Measured trials whose engine-reported cached tokens did not check out. "
                   "They are included in the statistics above (rows marked " + MARK + ").\n\n") + _table(rows)


def _failed_section(cells: list[dict]) -> str:
    failed = [c for c in cells if not is_ok(c)]
    head = "## Failed cells\n\n"
    if not failed:
        return head + "None."
    rows = [{"cell": c.get("cell_id"), "status": c.get("status"), "error": c.get("error") or "(no message)"}
            for c in sorted(failed, key=lambda c: (phase_key(c.get("phase")), str(c.get("cell_id"))))]
    return head + _table(rows)


def _fmt(v) -> str:
    if v is None:
        return NA
    return str(v).lower() if isinstance(v, bool) else str(v)


def _parity_section(cells: list[dict]) -> str:
    par = settings_parity(cells)
    out = ["## Settings parity"]
    if not par.table:
        out.append("No ok cells to compare.")
    elif not par.keys:
        out.append(f"All {par.compared} effective runtime settings reported by more than one cell "
                   "are equal across the ok cells.")
    else:
        out.append(f"Effective runtime settings that differ between ok cells ({len(par.keys)} of "
                   f"{par.compared} compared; {NA} = not reported by that engine):")
        out.append(_table([[cid, *(_fmt(vals[k]) for k in par.keys)] for cid, vals in par.table.items()],
                          ["cell", *par.keys]))
    if par.mismatches:
        out.append("Requested vs effective mismatches:")
        out.append(_table([{"cell": cid, "mismatch": text} for cid, text in par.mismatches]))
    elif par.table:
        out.append("Requested vs effective: no mismatches reported.")
    return "\n\n".join(out)


def _provenance_section(cells: list[dict]) -> str:
    rows = [provenance_row(c) for c in sorted(cells, key=lambda c: (phase_key(c.get("phase")), str(c.get("cell_id"))))]
    return "## Provenance\n\n" + _table(rows)


def _figures_section(rows: list[Row], figures: list[FigureResult]) -> str:
    out = ["## Figures"]
    for f in figures:
        if f.path is None:
            out.append(f"*{f.title}*: skipped ({f.note}).")
        else:
            out.append(f"![{f.title}](figures/{f.path.name})")
    sources = {}
    for r in rows:
        for cond in ("hit", "miss"):
            sources.setdefault(computation_ms(getattr(r, cond))[1], set()).add(r.name)
    if any(f.path and f.name == "three_panel.png" for f in figures) and "non-streaming" in sources:
        names = ", ".join(sorted(sources["non-streaming"]))
        out.append(f"In panel (1), computation is the non-streaming TTFT for {names} "
                   "(no engine prompt time reported); elsewhere it is the engine's prompt time.")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; one-line error and exit 2 when there are no cells."""
    ap = argparse.ArgumentParser(prog="python -m kvmatrix.analysis.report", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run folder(s) holding cell *.json")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.dirs, args.out)
    except NoCellsError as exc:
        print(f"kvmatrix: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
