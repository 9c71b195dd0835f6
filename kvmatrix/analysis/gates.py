"""The gates of ``compare``: ``--fail-if METRIC OP VALUE[%]`` parsed, then evaluated over the matched rows.

Grammar: METRIC one of ``METRICS``, OP one of ``> >= < <=``, VALUE a number in one of three forms:

* no sign (``unverified>0``, ``harness_overhead_ms>0.5``): NEW's own value, on every NEW row the metric reads
  (matched or not);
* a sign (``miss_ttft_ms>+2``): the change NEW - BASE in the metric's unit, on the matched rows;
* a sign and ``%`` (``miss_ttft_ms>+10%``): the relative change NEW vs BASE, on the matched rows (timings only).

What decides (``gate_on``): "ci" (the default) - a timing gate holds on a row only when its point estimate AND
the near bound of its 95 % CI are beyond the threshold (the lower bound for > / >=, the upper one for < / <=):
a regression inside the run-to-run noise does not trip it, one the data show does. "point" - the point
estimate alone. Counts (unverified trials, failed cells, rows lost) have no CI: their value decides either way.
A row without the number (no calibration on a side, a condition that measured nothing) is counted as such; a
gate that found the number on no row at all passes but reads "not evaluated", never a silent "passed".

``failed`` is NEW's number of failed cells (a change: NEW's minus BASE's); ``only_in_base`` the BASE rows
(cell x condition) NEW lacks, the cells a run lost.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field

from kvmatrix.analysis.summary import SummaryRow

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
GATE_ON = ("ci", "point")


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    help: str
    kind: str  # ttft | mmh | harness | unverified | failed | only_in_base
    conditions: tuple[str, ...] = ()  # the rows a ttft metric reads (empty: every row)
    relative: bool = True  # a % change is allowed
    delta: bool = True  # a signed change is allowed


METRICS = {m.name: m for m in (
    Metric("hit_ttft_ms", "ms", "median TTFT of each cache_hit row", "ttft", ("cache_hit",)),
    Metric("miss_ttft_ms", "ms", "median TTFT of each cache_miss row (batch_sweep's too)", "ttft", ("cache_miss",)),
    Metric("ttft_ms", "ms", "median TTFT of every row, any condition (scan points, slot, prefix rows)", "ttft"),
    Metric("miss_minus_hit_ms", "ms", "miss - hit TTFT of each cell with both conditions", "mmh"),
    Metric("harness_overhead_ms", "ms", "harness - reference client, median of the paired trials", "harness"),
    Metric("unverified", "trials", "a row's trials the engine's counters contradict", "unverified", relative=False),
    Metric("failed", "cells", "NEW's failed cells (a change: NEW's minus BASE's)", "failed", relative=False),
    Metric("only_in_base", "rows", "BASE rows (cell x condition) NEW lacks", "only_in_base", relative=False,
           delta=False),
)}


class GateError(ValueError):
    """A --fail-if expression that does not parse; str(e) is the one-line message."""


@dataclass(frozen=True)
class Gate:
    """``METRIC OP VALUE[%]``: mode "own" (NEW's value), "abs" (NEW - BASE) or "rel" (% change)."""

    text: str
    metric: str
    op: str
    value: float
    mode: str


_EXPR = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*([<>=!]+)\s*(.*?)\s*")
_VALUE = re.compile(r"([+-])?(\d+(?:\.\d*)?|\.\d+)\s*(%)?")


def parse_gate(text: str) -> Gate:
    """``METRIC OP VALUE[%]``; GateError naming the fix."""
    m = _EXPR.fullmatch(text)
    if not m:
        raise GateError(f"{text!r}: not METRIC OP VALUE[%]; write e.g. miss_ttft_ms>+10% (OP one of > >= < <=)")
    name, op, raw = m.groups()
    if name not in METRICS:
        raise GateError(f"{text!r}: unknown metric {name!r}; one of {', '.join(METRICS)}")
    if op not in OPS:
        raise GateError(f"{text!r}: OP {op!r} is not one of > >= < <=; write e.g. {name}>{'0' if op else '+10%'}")
    v = _VALUE.fullmatch(raw)
    if not v:
        raise GateError(f"{text!r}: {raw!r} is not a number; write VALUE as 0.5 (NEW's value), +2 (NEW - BASE) or "
                        "+10% (the change NEW vs BASE)")
    sign, number, pct = v.groups()
    metric = METRICS[name]
    if pct and not metric.relative:
        raise GateError(f"{text!r}: {name} is a count, it has no % change; write {name}{op}0 (NEW's count)"
                        + (f" or {name}{op}+0 (NEW's minus BASE's)" if metric.delta else ""))
    if pct and not sign:
        raise GateError(f"{text!r}: a % threshold is the change NEW vs BASE and takes a sign: {name}{op}+{number}%")
    if sign and not metric.delta:
        raise GateError(f"{text!r}: {name} counts BASE rows NEW lacks, it has no change; write {name}{op}{number}")
    value = float(number) * (-1 if sign == "-" else 1)
    return Gate(text.strip(), name, op, value, "rel" if pct else "abs" if sign else "own")


def interval(lo, hi) -> tuple[float, float] | None:
    return None if lo is None or hi is None else (lo, hi)


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Trip:
    where: str  # the row (or the run) it tripped on
    value: float
    ci: tuple[float, float] | None = None
    row: SummaryRow | None = field(default=None, compare=False)


@dataclass
class GateResult:
    gate: Gate
    evaluated: int = 0  # rows (or runs) with the number the gate needs
    missing: int = 0  # rows without it on a side the gate reads
    trips: list[Trip] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return bool(self.trips)

    @property
    def status(self) -> str:
        """FAILED (it holds: exit 1), passed, or "not evaluated" (no row had the number; passes, shown as such)."""
        return "FAILED" if self.trips else "passed" if self.evaluated else "not evaluated"


def holds(op: str, value: float, ci: tuple[float, float] | None, threshold: float, gate_on: str) -> bool:
    """The point estimate beyond the threshold and, with ``gate_on="ci"``, the CI's near bound as well
    (the lower bound for > / >=, the upper one for < / <=); without a CI the point decides."""
    f = OPS[op]
    if not f(value, threshold):
        return False
    if gate_on == "point" or ci is None:
        return True
    return f(ci[0] if op in (">", ">=") else ci[1], threshold)


def _own(metric: Metric, r: SummaryRow) -> tuple[float | None, tuple | None]:
    if metric.kind == "ttft":
        return r.ttft_ms, interval(r.ttft_ci_lo, r.ttft_ci_hi)
    if metric.kind == "mmh":
        return r.miss_minus_hit_ms, interval(r.miss_minus_hit_ci_lo, r.miss_minus_hit_ci_hi)
    if metric.kind == "harness":
        return r.harness_overhead_ms, interval(r.harness_overhead_ci_lo, r.harness_overhead_ci_hi)
    return (None if r.unverified is None else float(r.unverified)), None


def _change(metric: Metric, m, rel: bool) -> tuple[float | None, tuple | None]:
    if metric.kind == "unverified":
        return (None if m.unverified_delta is None else float(m.unverified_delta)), None
    d = {"ttft": m.ttft, "mmh": m.mmh, "harness": m.harness}[metric.kind]
    if d is None:
        return None, None
    return (d.rel_pct, d.rel_ci) if rel else (d.diff, d.diff_ci)


def _applies(metric: Metric, rows: tuple[SummaryRow, ...]) -> bool:
    """Whether a row (a matched pair) is one the metric reads: its condition; miss - hit only where it was formed."""
    if metric.kind == "mmh":
        return any(r.miss_minus_hit_ms is not None for r in rows)
    return not metric.conditions or rows[-1].condition in metric.conditions


def evaluate(gates: list[Gate], res, gate_on: str = "ci") -> list[GateResult]:
    """Each gate over every row it reads: NEW's rows for its own value, the matched rows for a change."""
    out = []
    for g in gates:
        metric, gr = METRICS[g.metric], GateResult(g)
        if metric.kind in ("failed", "only_in_base"):
            lost = [u.row for u in res.only_base]
            failed = [r for r in res.new_rows if r.status == "failed"]
            count = len(lost) if metric.kind == "only_in_base" else len(failed)
            if g.mode == "abs":
                count -= sum(1 for r in res.base_rows if r.status == "failed")
            gr.evaluated = 1
            if holds(g.op, count, None, g.value, gate_on):
                shown = lost if metric.kind == "only_in_base" else failed
                names = ", ".join(f"{res.label(r)} {r.condition}".strip() for r in shown[:8])
                gr.trips.append(Trip(f"{len(shown)} {metric.unit}" + (f": {names}" if names else "")
                                     + (" …" if len(shown) > 8 else ""), float(count)))
            out.append(gr)
            continue
        items = ([(r, _own(metric, r)) for r in res.new_rows if _applies(metric, (r,))] if g.mode == "own" else
                 [(m.new, _change(metric, m, g.mode == "rel")) for m in res.matches
                  if _applies(metric, (m.base, m.new))])
        for r, (v, ci) in items:
            if v is None or not math.isfinite(v):
                gr.missing += 1
                continue
            gr.evaluated += 1
            if holds(g.op, v, ci, g.value, gate_on):
                gr.trips.append(Trip(f"{res.label(r)} {r.condition}", v, ci, r))
        out.append(gr)
    return out


def trip_text(t: Trip, g: Gate) -> str:
    """A tripped number: ``+12.3% [+4.1, +20.2]``, ``+2.10 ms [+0.40, +3.90]``, ``3`` (a count)."""
    metric = METRICS[g.metric]
    if metric.kind in ("unverified", "failed", "only_in_base"):
        of = f" of {t.row.n} trials" if metric.kind == "unverified" and t.row is not None else ""
        return (f"{t.value:+g}" if g.mode != "own" else f"{t.value:g}") + of
    digits, unit = (1, "%") if g.mode == "rel" else (2, " ms")
    f = f"{{:{'+' if g.mode != 'own' else ''}.{digits}f}}"
    ci = "" if t.ci is None else f" [{f.format(t.ci[0])}, {f.format(t.ci[1])}]"
    return f.format(t.value) + unit + ci


HELP = "metrics (--fail-if METRIC OP VALUE[%], OP one of > >= < <=; repeat the option for several gates):\n" + "\n".join(
    f"  {m.name:<20} {m.help} [{m.unit}]" for m in METRICS.values()) + """

VALUE forms:
  0.5     NEW's own value: unverified>0, harness_overhead_ms>0.5 (every NEW row the metric reads)
  +2      NEW - BASE in the metric's unit: miss_ttft_ms>+2 (matched rows); counts: failed>+0
  +10%    the change NEW vs BASE in %: miss_ttft_ms>+10% (timings only)
--gate-on ci (default): a timing gate holds only when its 95% CI's near bound is beyond the threshold too
  (lower bound for > and >=, upper for < and <=), so a change inside the noise does not trip it;
  --gate-on point: the point estimate decides. Counts have no CI: their value decides either way.
exit status: 0 no gate holds, 1 a gate holds (tripped rows listed), 2 bad input (nothing written).
"""
