"""Harness overhead and the TTFT breakdown, from the cells' calibration data.

Reads only result JSON (each trial's ``ttft_ms`` / ``reference_ttft_ms`` /
``tokenid_ttft_ms`` / ``breakdown``, written by runners/calibration.py):

* ``overhead_rows``  backend x condition, trials pooled over the cells of a
  backend (model, settings and configs alike): harness TTFT, reference TTFT
  and the paired difference (harness - reference), each a median with a
  bootstrap CI; the chat template + tokenization cost (chat path - token-id
  path) where measured; and whether both clients saw the same cached tokens;
* ``section``        the report's "Harness overhead" section;
* ``breakdown_figure`` one stacked bar per backend and condition: client /
  interface / engine (medians of each part);
* ``python -m kvmatrix.analysis.calibration DIR...`` prints the table (the
  ``nox -s calibrate`` benchmark).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvmatrix.analysis.figure import FigureSpec, embed
from kvmatrix.analysis.fmt import ci_text, fixed, table
from kvmatrix.analysis.labels import phase_key, series_names
from kvmatrix.analysis.load import as_docs, load_required
from kvmatrix.analysis.stats import Summary, summarize
from kvmatrix.runners.document import HIT_MISS, CellDoc

CONDITIONS = ("cache_hit", "cache_miss", "warmup")
PARTS = ("client_ms", "interface_ms", "engine_ms")
PART_LABELS = {"client_ms": "client (before the request left)", "interface_ms": "interface (HTTP, template, "
               "tokenization, scheduling)", "engine_ms": "engine (its own prompt time)"}


@dataclass
class OverheadRow:
    series: str
    phase: str
    backend: str
    condition: str
    reference: str
    harness: Summary
    ref: Summary
    diff: Summary
    template: Summary | None
    same_cached: tuple[int, int]
    parts: dict[str, float] = field(default_factory=dict)


def _trials(cell: CellDoc) -> dict[str, list[dict]]:
    """Trials per calibration condition: measured hit / miss trials, warm-up trials pooled."""
    out: dict[str, list[dict]] = {}
    for cond in HIT_MISS:
        trials = cell.trials(cond)
        out.setdefault(cond, []).extend(t for t in trials if not t.get("warmup"))
        out.setdefault("warmup", []).extend(t for t in trials if t.get("warmup"))
    return out


def _trial_protocol(c: CellDoc) -> bool:
    return c.ok and any(c.has_condition(k) for k in HIT_MISS)


def _enabled(c: CellDoc) -> bool:
    return bool(c.calibration is not None and c.calibration.enabled)


def calibrated(cells) -> list[CellDoc]:
    """The ok trial-protocol cells that ran with the control."""
    return [c for c in as_docs(cells) if _trial_protocol(c) and _enabled(c)]


def overhead_rows(cells) -> list[OverheadRow]:
    cells = calibrated(cells)
    names = series_names(cells, ("model", "settings")) if cells else []
    groups: dict[tuple, list[dict]] = {}
    meta: dict[tuple, tuple] = {}
    for cell, name in zip(cells, names, strict=True):
        key = (name, str(cell.phase))
        meta[key] = (cell.backend, cell.calibration.get("reference_client", ""))
        for cond, trials in _trials(cell).items():
            groups.setdefault(key + (cond,), []).extend(trials)
    rows = []
    for (name, phase, cond), trials in groups.items():
        pairs = [t for t in trials if t.get("ttft_ms") is not None and t.get("reference_ttft_ms") is not None]
        if not pairs:
            continue
        tok = [t for t in trials if t.get("ttft_ms") is not None and t.get("tokenid_ttft_ms") is not None]
        parts: dict[str, float] = {}
        for p in PARTS + ("first_byte_ms",):
            vals = [(t.get("breakdown") or {}).get(p) for t in trials]
            vals = [v for v in vals if v is not None]
            if vals:
                parts[p] = statistics.median(vals)
        backend, reference = meta[(name, phase)]
        rows.append(OverheadRow(
            series=name, phase=phase, backend=str(backend), condition=cond, reference=reference,
            harness=summarize([t["ttft_ms"] for t in pairs]),
            ref=summarize([t["reference_ttft_ms"] for t in pairs]),
            diff=summarize([t["ttft_ms"] - t["reference_ttft_ms"] for t in pairs]),
            template=summarize([t["ttft_ms"] - t["tokenid_ttft_ms"] for t in tok]) if tok else None,
            same_cached=(sum(1 for t in pairs if t.get("reference_cached_tokens") == t.get("cached_tokens")),
                         len(pairs)),
            parts=parts,
        ))
    order = {c: i for i, c in enumerate(CONDITIONS)}
    rows.sort(key=lambda r: (phase_key(r.phase), r.series, order.get(r.condition, 9)))
    return rows


HEADERS = ["Phase", "Series", "Condition", "n", "Harness TTFT (ms)", "Reference TTFT (ms)",
           "Harness − reference (ms) [95% CI]", "Chat − token-id path (ms)", "Same cached tokens"]
BREAKDOWN_HEADERS = ["Phase", "Series", "Condition", "Client (ms)", "First byte (ms)", "Engine (ms)",
                     "Interface (ms)", "TTFT (ms)"]


def table_rows(rows: list[OverheadRow]) -> list[list[str]]:
    return [[r.phase, r.series, r.condition, str(r.diff.n), ci_text(r.harness, 2), ci_text(r.ref, 2), ci_text(r.diff, 2, sign=True),
             ci_text(r.template, 2, sign=True), f"{r.same_cached[0]}/{r.same_cached[1]}"] for r in rows]


def breakdown_rows(rows: list[OverheadRow]) -> list[list[str]]:
    return [[r.phase, r.series, r.condition, fixed(r.parts.get("client_ms")), fixed(r.parts.get("first_byte_ms")),
             fixed(r.parts.get("engine_ms")), fixed(r.parts.get("interface_ms")), ci_text(r.harness, 2)]
            for r in rows if r.parts]


def sections(ev, figures) -> list[str]:
    return [section(ev.cells, embed(figures, "calibration"))]


def section(cells, figure_lines: list[str] = ()) -> str:
    """The report's "Harness overhead" section; ``figure_lines``: the embedded figures' markdown."""
    head = "## Harness overhead (calibration control)\n\n"
    cells = as_docs(cells)
    rows = overhead_rows(cells)
    off = [c for c in cells if _trial_protocol(c) and not _enabled(c)]
    if not rows:
        never = "recorded before the control existed"
        why = "; ".join(sorted({c.calibration.get("reason", never) if c.calibration is not None else never
                                for c in off})) or "no trial-protocol cells"
        return head + f"No calibration data in these cells ({why}).\n"
    refs = sorted({f"{r.backend}: {r.reference}" for r in rows})
    worst_hit = max((r.diff.median for r in rows if r.condition == "cache_hit" and r.diff.median is not None),
                    default=None)
    notes = [
        "Every timed query was also sent through a reference client on the same engine, slot and cache state "
        "(re-warmed and settled the same way; which client goes first alternates per trial). Harness − reference "
        "is the median of the per-trial paired differences with its 95% bootstrap CI: what kvmatrix's own "
        "request path adds to every TTFT in the tables above. Reference clients: " + "; ".join(refs) + ".",
        "Chat − token-id path: the same prompt sent as token ids (llama-server `/completion`, vLLM "
        "`/v1/completions`, llama-cpp-python `create_completion`): what the chat template, tokenization and the "
        "chat endpoint cost on that engine.",
    ]
    notes.append("The warm-up row pools the discarded first trial of each condition: in trial 0 the harness query "
                 "goes first, so on a fresh engine its difference also holds the engine's first-request cost; "
                 "the hit and miss rows are the measured trials.")
    if worst_hit is not None:
        notes.append(f"Largest median harness overhead on a cache hit: {worst_hit:+.3f} ms.")
    if off:
        notes.append(f"{len(off)} cell(s) ran without the control (see their `calibration.reason`).")
    parts = [head + "\n\n".join(notes), table(table_rows(rows), HEADERS),
             "### TTFT breakdown (medians)\n\nClient = connection established → request handed to the socket; "
             "first byte = → the response's status line; engine = the engine's own prompt time (llama.cpp "
             "`timings.prompt_ms` / perf context, vLLM prefill histogram or `RequestOutput.metrics`); interface = "
             "TTFT − client − engine (HTTP, tokenization, chat template, scheduling).",
             table(breakdown_rows(rows), BREAKDOWN_HEADERS), *figure_lines]
    return "\n\n".join(parts)


SERIES_IN = 1.3  # fig7: inches per series (its hit and miss stacks)


def breakdown_figure(cells):
    """Stacked bars of the breakdown per series: hit and miss side by side, many series in several axes
    rows; a note string when there is none."""
    rows = [r for r in overhead_rows(cells) if r.parts and r.condition in ("cache_hit", "cache_miss")]
    if not rows:
        return "no calibrated cells with a TTFT breakdown"
    from matplotlib.patches import Patch  # noqa: PLC0415 - matplotlib only for the figure (no pyplot)

    from kvmatrix.analysis import plot  # noqa: PLC0415

    series = list(dict.fromkeys((r.phase, r.series) for r in rows))
    chunks = plot.split(series, plot.per_row(SERIES_IN, 1.2))
    most = max(len(c) for c in chunks)
    fig, (axes,) = plot.grid(1, plot.panel_width(most, SERIES_IN, 1.2, least=6.0), 3.6, per_panel=len(chunks),
                             sharey=True)
    colours = {"client_ms": "#4c72b0", "interface_ms": "#dd8452", "engine_ms": "#55a868"}
    width = 0.38
    totals = [sum(max(0.0, r.parts.get(p) or 0.0) for p in PARTS) for r in rows]
    typical = statistics.median(totals)
    # a few huge bars (a host-RAM cache restore: ~1 s) would flatten the rest: clip them, label the value
    top = 1.15 * max([t for t in totals if t <= 5 * typical] or totals)
    for ax, chunk in zip(axes, chunks, strict=True):
        for i, key in enumerate(chunk):
            for j, cond in enumerate(("cache_hit", "cache_miss")):
                r = next((x for x in rows if (x.phase, x.series) == key and x.condition == cond), None)
                if r is None:
                    continue
                x = i + (j - 0.5) * width
                bottom = 0.0
                for p in PARTS:
                    v = max(0.0, r.parts.get(p) or 0.0)
                    ax.bar(x, min(v, max(0.0, top - bottom)), width * 0.95, bottom=bottom, color=colours[p],
                           alpha=1.0 if cond == "cache_miss" else 0.6, edgecolor="white", linewidth=0.5)
                    bottom += v
                label = "hit" if cond == "cache_hit" else "miss"
                if bottom > top:
                    label += f"\n{bottom:.0f} ms ↑"
                ax.text(x, min(bottom, top), label, ha="center", va="bottom", fontsize=7)
        plot.xticks(ax, range(len(chunk)), [f"{p} {s}" for p, s in chunk])
        ax.set_xlim(-0.6, most - 0.4)
        ax.set_ylabel("median TTFT part (ms)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, top * 1.12)
    handles = [Patch(facecolor=colours[p], label=PART_LABELS[p]) for p in PARTS]
    plot.finish(fig, "TTFT breakdown per backend: client / interface / engine (hit light, miss dark)", handles,
                title_size=10)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvmatrix.analysis.calibration",
                                 description="Print the harness-overhead table of result folders.")
    ap.add_argument("dirs", nargs="+", type=Path, help="result folders (cell JSON files)")
    args = ap.parse_args(argv)
    try:
        cells = load_required(args.dirs)
    except (ValueError, OSError) as exc:
        print(f"kvmatrix: error: {exc}", file=sys.stderr)
        return 2
    rows = overhead_rows(cells)
    if not rows:
        print("kvmatrix: error: no calibrated cells in these folders; run them with the control on", file=sys.stderr)
        return 2
    print(table(table_rows(rows), HEADERS))
    print()
    print(table(breakdown_rows(rows), BREAKDOWN_HEADERS))
    return 0


if __name__ == "__main__":
    sys.exit(main())


FIGURES = (
    FigureSpec("fig7_ttft_breakdown", "TTFT breakdown: client / interface / engine", "calibration",
               lambda ev: breakdown_figure(ev.cells),
               "Median parts of the streaming TTFT per backend, hit and miss: client time before the request left, "
               "the interface (HTTP, tokenization, chat template, scheduling) and the engine's own prompt time."),
)

