"""Compare two sets of runs cell by cell and gate on the differences (``nox -s compare -- BASE NEW``).

``python -m kvmatrix.analysis.compare BASE NEW [--out DIR] [--fail-if EXPR ...] [--gate-on point|ci]``; a side
of several folders: ``--base DIR [DIR ...]`` / ``--new DIR [DIR ...]`` (``--base h100/*/ --new h200/*/``).

Both sides become summary rows (``analysis.summary.build``: one per cell x condition); rows are matched by
``SummaryRow.match_key`` (the settings that define a cell and condition, not the host, release, runtime or run),
so two hosts or two releases compare cell by cell. When one side holds several rows with one key (a folder of
two releases or two runtimes), that key is matched by release / runtime / device too (then run, host, cell id),
and the write-up says so. Rows on one side only are listed with the reason (other settings, named; ambiguous;
no such cell), never dropped.

Per matched row: BASE and NEW median TTFT, NEW - BASE in ms and in % with bootstrap 95 % CIs
(``stats.compare`` on the measured TTFTs), where each ran, verified / unverified trials; per cell with hit and
miss also miss - hit on each side and its change. The change of a number that comes as a median [CI] per side
(miss - hit, harness overhead) has the MOVER interval (Zou & Donner 2008) from the two CIs; its % is the change
over BASE's point estimate (|BASE|).

Writes OUT/compare.md (the summary line first, the gates, a table per experiment, the unmatched rows) and
OUT/compare.csv (one line per matched row, every number); OUT defaults to NEW's first folder. Prints
compare.md. Exit 0: no gate holds; 1: a gate holds (the rows it tripped on are listed); 2: bad input, nothing
written.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvmatrix.analysis import fmt, stats
from kvmatrix.analysis.gates import (
    GATE_ON,
    HELP,
    METRICS,
    Gate,
    GateError,
    GateResult,
    evaluate,
    interval,
    parse_gate,
    trip_text,
)
from kvmatrix.analysis.load import NoCellsError, load_required
from kvmatrix.analysis.summary import HOST_SETTINGS, SummaryRow, build, sort_key
from kvmatrix.cli_parser import ArgumentParser

PROG = "python -m kvmatrix.analysis.compare"


# ---------------------------------------------------------------- matching


@dataclass(frozen=True)
class Delta:
    """NEW - BASE: ms with a CI, % of BASE with a CI, p (Mann-Whitney, TTFT only)."""

    diff: float | None = None
    diff_ci: tuple[float, float] | None = None
    rel_pct: float | None = None
    rel_ci: tuple[float, float] | None = None
    p: float | None = None


def mover(base: float | None, base_ci, new: float | None, new_ci) -> Delta | None:
    """new - base of two independent estimates with CIs: the MOVER interval; % over |base|."""
    if base is None or new is None:
        return None
    d = new - base
    ci = None
    if base_ci is not None and new_ci is not None:
        ci = (d - math.hypot(new - new_ci[0], base_ci[1] - base), d + math.hypot(new_ci[1] - new, base - base_ci[0]))
    rel = d / abs(base) * 100 if base else None
    rel_ci = (ci[0] / abs(base) * 100, ci[1] / abs(base) * 100) if base and ci else None
    return Delta(d, ci, rel, rel_ci)


@dataclass
class Match:
    base: SummaryRow
    new: SummaryRow
    by: tuple[str, ...] = ()  # what besides the match key paired them ("release/runtime/device", "run", ...)
    ttft: Delta | None = None
    mmh: Delta | None = None
    harness: Delta | None = None

    @property
    def unverified_delta(self) -> int | None:
        b, n = self.base.unverified, self.new.unverified
        return None if b is None or n is None else n - b


@dataclass
class Unmatched:
    row: SummaryRow
    reason: str


@dataclass
class Result:
    base_rows: list[SummaryRow]
    new_rows: list[SummaryRow]
    matches: list[Match] = field(default_factory=list)
    only_base: list[Unmatched] = field(default_factory=list)
    only_new: list[Unmatched] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)  # keys matched by more than their settings, one line per kind
    varying: dict[tuple, tuple[str, ...]] = field(default_factory=dict)  # cell -> settings that vary in it

    def label(self, r: SummaryRow) -> str:
        return label(r, self.varying.get(_near(r)[:-1], ()))

    def order(self, r: SummaryRow) -> tuple:
        """The summary's table order, a cell's rows of several settings kept together (hit, miss per setting)."""
        k = sort_key(r)
        return k[:6] + (self.label(r),) + k[6:]


#: what else makes a key unambiguous, tried in this order
_EXTRA = (("release/runtime/device", lambda r: r.where), ("run", lambda r: r.run), ("host", lambda r: r.host),
          ("cell id", lambda r: r.cell_id))


def _near(r: SummaryRow) -> tuple:
    """The match key without the runtime settings: the same cell and condition run with other settings
    (without its last item, the condition: the cell)."""
    return (r.experiment, r.phase, r.api, r.model, r.a, r.b, r.q, r.max_output_tokens, r.axis, r.condition)


def _settings(r: SummaryRow) -> dict:
    return {k: v for k, v in r.settings.items() if k not in HOST_SETTINGS}


def _unmatched_reason(r: SummaryRow, others: list[SummaryRow], other: str, same_key: list[SummaryRow],
                      by: tuple[str, ...]) -> str:
    if same_key:
        wheres = "; ".join(sorted({o.where for o in same_key}))
        return (f"{other} ran these settings only as {wheres}; a key with several rows on a side matches by "
                f"{', '.join(by)} too")
    near = [o for o in others if _near(o) == _near(r)]
    if not near:
        return f"no such cell in {other}"
    mine = _settings(r)

    def diff(o):
        theirs = _settings(o)
        return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))

    best = min(near, key=lambda o: len(diff(o)))
    theirs = _settings(best)
    return (f"{other} ran it only with " + ", ".join(f"{k}={fmt.setting(theirs.get(k))}" for k in diff(best))
            + " (here " + ", ".join(f"{k}={fmt.setting(mine.get(k))}" for k in diff(best)) + ")")


def _keyed(bs: list[SummaryRow], ns: list[SummaryRow]) -> tuple[tuple[str, ...], tuple[dict, dict]]:
    """The rows of one match key on each side, keyed by the fewest extra facts that make both sides unique."""
    if len(bs) <= 1 and len(ns) <= 1:
        return (), ({(): bs[0]} if bs else {}, {(): ns[0]} if ns else {})
    for i in range(1, len(_EXTRA) + 1):
        ext = tuple({tuple(f(r) for _, f in _EXTRA[:i]): r for r in rs} for rs in (bs, ns))
        if len(ext[0]) == len(bs) and len(ext[1]) == len(ns):
            return tuple(name for name, _ in _EXTRA[:i]), ext
    # identical on every fact (one folder given twice under two names): their order decides
    return tuple(name for name, _ in _EXTRA) + ("order",), tuple(
        {tuple(f(r) for _, f in _EXTRA) + (j,): r for j, r in enumerate(rs)} for rs in (bs, ns))


def match(base_rows: list[SummaryRow], new_rows: list[SummaryRow]) -> Result:
    """Pair rows by match key (made unambiguous where a side repeats a key); the deltas of every pair."""
    res = Result(base_rows, new_rows)
    groups: dict[tuple, tuple[list, list]] = {}
    cells: dict[tuple, list[dict]] = {}
    for side, rows in ((0, base_rows), (1, new_rows)):
        for r in rows:
            groups.setdefault(r.match_key, ([], []))[side].append(r)
            cells.setdefault(_near(r)[:-1], []).append(_settings(r))
    for near, ss in cells.items():
        names = sorted({k for s in ss for k in s})
        res.varying[near] = tuple(k for k in names if len({repr(s.get(k)) for s in ss}) > 1)
    ambiguous: dict[tuple[str, tuple], list[str]] = {}
    for bs, ns in groups.values():
        by, keyed = _keyed(bs, ns)
        if by:
            sides = " and ".join(s for s, rs in (("BASE", bs), ("NEW", ns)) if len(rs) > 1)
            first = (bs or ns)[0]
            ambiguous.setdefault((sides, by), []).append(f"{res.label(first)} {first.condition}")
        for k, b in keyed[0].items():
            if k in keyed[1]:
                res.matches.append(_pair(b, keyed[1][k], by))
            else:
                res.only_base.append(Unmatched(b, _unmatched_reason(b, new_rows, "NEW", ns, by)))
        for k, n in keyed[1].items():
            if k not in keyed[0]:
                res.only_new.append(Unmatched(n, _unmatched_reason(n, base_rows, "BASE", bs, by)))
    for (sides, by), names in ambiguous.items():
        res.ambiguous.append(f"{len(names)} key{'s' * (len(names) > 1)} with several rows on {sides} (one settings, "
                             f"several releases / runtimes / runs), matched by {', '.join(by)} too: "
                             + "; ".join(sorted(names)))
    res.matches.sort(key=lambda m: res.order(m.new))
    res.only_base.sort(key=lambda u: res.order(u.row))
    res.only_new.sort(key=lambda u: res.order(u.row))
    return res


def _pair(b: SummaryRow, n: SummaryRow, by: tuple[str, ...]) -> Match:
    ttft = None
    if b.values and n.values:
        c = stats.compare(b.values, n.values)
        ttft = Delta(c.diff, c.diff_ci, c.rel_pct, c.rel_ci, c.p)
    mmh = mover(b.miss_minus_hit_ms, interval(b.miss_minus_hit_ci_lo, b.miss_minus_hit_ci_hi),
                n.miss_minus_hit_ms, interval(n.miss_minus_hit_ci_lo, n.miss_minus_hit_ci_hi))
    harness = mover(b.harness_overhead_ms, interval(b.harness_overhead_ci_lo, b.harness_overhead_ci_hi),
                    n.harness_overhead_ms, interval(n.harness_overhead_ci_lo, n.harness_overhead_ci_hi))
    return Match(b, n, by, ttft, mmh, harness)


# ---------------------------------------------------------------- write-up


def label(r: SummaryRow, varying: tuple[str, ...] = ()) -> str:
    """The cell in a table: phase, API path, model, A/B, axis, and the ``varying`` settings (those that tell
    rows of one cell and condition apart in this comparison: ``flash_attn=true``)."""
    extra = f" {r.axis}" if r.axis else ""
    flags = ", ".join(f"{k}={fmt.setting(r.settings.get(k))}" for k in varying)
    return f"{r.phase} {r.api} {r.model} {r.config}{extra}" + (f" ({flags})" if flags else "")


def where_change(b: SummaryRow, n: SummaryRow) -> str:
    """"same", or the parts of release / runtime / device that differ: ``NVIDIA H100 80GB HBM3 → NVIDIA H200``."""
    if b.where == n.where:
        return "same"
    bp, np_ = b.where.split(", "), n.where.split(", ")
    if len(bp) != len(np_):
        return f"{b.where or '?'} → {n.where or '?'}"
    return "; ".join(f"{x} → {y}" for x, y in zip(bp, np_, strict=True) if x != y)


def _d(d: Delta | None, rel: bool = False) -> str:
    if d is None:
        return fmt.NA
    return fmt.val_ci(d.rel_pct, d.rel_ci, 1, sign=True) if rel else fmt.val_ci(d.diff, d.diff_ci, 2, sign=True)


def _where(m: Match) -> str:
    """Where a matched pair ran: what differs; for a pair matched by its release too, that release."""
    text = where_change(m.base, m.new)
    return m.new.where if text == "same" and m.by else text


def _counts(r: SummaryRow) -> str:
    return f"{fmt.na(r.unverified)}/{fmt.na(r.n)}"


def summary_line(res: Result, results: list[GateResult], gate_on: str) -> str:
    counts = {k: sum(1 for g in results if g.status == k) for k in ("passed", "FAILED", "not evaluated")}
    gates = ("gates: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v or k != "not evaluated")
             + f" (gate on the {'95% CI' if gate_on == 'ci' else 'point estimate'})" if results else "no gates")
    return (f"compare: {len(res.matches)} matched, {len(res.only_base)} only in BASE, {len(res.only_new)} only in NEW; "
            + gates)


def _folders(dirs: list[Path]) -> str:
    """``a`` / ``a b`` / ``parent/ (12 folders)`` for a side given as many folders of one parent."""
    parents = {Path(d).parent for d in dirs}
    if len(dirs) > 2 and len(parents) == 1:
        return f"{parents.pop()}/*/ ({len(dirs)} folders)"
    return " ".join(str(d) for d in dirs)


def _side(rows: list[SummaryRow], dirs: list[Path]) -> str:
    wheres: dict[str, int] = {}
    for r in rows:
        wheres[r.where] = wheres.get(r.where, 0) + 1
    runs = sorted({r.run for r in rows if r.run})
    hosts = ", ".join(sorted({r.host for r in rows if r.host})) or "?"
    run_text = f"run {runs[0]}" if len(runs) == 1 else f"{len(runs)} runs"
    return (f"{_folders(dirs)} — {len(rows)} rows, {run_text}, host {hosts}; "
            + "; ".join(f"{w or '?'} ({k})" for w, k in sorted(wheres.items())))


def markdown(res: Result, results: list[GateResult], base_dirs, new_dirs, gate_on: str = "ci") -> str:
    lines = [f"# {summary_line(res, results, gate_on)}", "",
             f"- BASE: {_side(res.base_rows, base_dirs)}", f"- NEW: {_side(res.new_rows, new_dirs)}",
             "- Rows are matched by the settings that define a cell and condition (not host, release, runtime, "
             "run). Δ = NEW − BASE of the median TTFT, ms and % with bootstrap 95% CIs "
             f"({stats.N_BOOT:,} resamples); miss − hit changes: MOVER interval from the two CIs. unverified = "
             "trials the engine's counters contradict / trials."]
    lines += [f"- {a}" for a in res.ambiguous]
    if results:
        lines += ["", "## Gates", "",
                  "A change gate (+x, +x%) holds when NEW − BASE is beyond the threshold"
                  + (" and so is the near bound of its 95% CI, so a change inside the noise does not trip it"
                     if gate_on == "ci" else " (point estimate)") + "; a plain value gates NEW's own number"
                  + (" (its CI too)" if gate_on == "ci" else "") + ".", ""]
        rows = [[f"`{g.gate.text}`", g.status, g.evaluated, g.missing, len(g.trips)]
                for g in results]
        lines.append(fmt.table(rows, ["gate", "result", "evaluated", "no number", "tripped"]))
        for g in results:
            if g.held:
                lines += ["", f"`{g.gate.text}` tripped on:", ""]
                lines += [f"- {t.where}" + ("" if METRICS[g.gate.metric].kind in ("failed", "only_in_base") else
                                            f": {trip_text(t, g.gate)}") for t in g.trips]
    by_exp: dict[str, list[Match]] = {}
    for m in res.matches:
        by_exp.setdefault(m.new.experiment, []).append(m)
    for exp, ms in by_exp.items():
        rows = [[res.label(m.new), m.new.condition or m.new.status, fmt.ms(m.base.ttft_ms, 2), fmt.ms(m.new.ttft_ms, 2),
                 _d(m.ttft), _d(m.ttft, rel=True), f"{_counts(m.base)} → {_counts(m.new)}",
                 _where(m)] for m in ms]
        lines += ["", f"## {exp}: TTFT (ms)", "", fmt.table(rows, ["cell", "condition", "BASE", "NEW", "Δ ms [CI]",
                                                                   "Δ % [CI]", "unverified", "where"])]
        mmh = [m for m in ms if m.mmh is not None]
        if mmh:
            rows = [[res.label(m.new), fmt.val_ci(m.base.miss_minus_hit_ms, interval(m.base.miss_minus_hit_ci_lo,
                                                                            m.base.miss_minus_hit_ci_hi), 2),
                     fmt.val_ci(m.new.miss_minus_hit_ms, interval(m.new.miss_minus_hit_ci_lo, m.new.miss_minus_hit_ci_hi), 2),
                     _d(m.mmh), _d(m.mmh, rel=True)] for m in mmh]
            lines += ["", f"## {exp}: miss − hit (ms)", "",
                      fmt.table(rows, ["cell", "BASE", "NEW", "Δ ms [CI]", "Δ % [CI]"])]
    for title, us in (("Only in BASE", res.only_base), ("Only in NEW", res.only_new)):
        if us:
            rows = [[res.label(u.row), u.row.condition or u.row.status, u.row.where, u.reason] for u in us]
            lines += ["", f"## {title} ({len(us)})", "", fmt.table(rows, ["cell", "condition", "where", "why"])]
    return "\n".join(lines) + "\n"


COLUMNS = (
    "experiment", "phase", "api", "model", "a", "b", "q", "max_output_tokens", "condition", "axis", "settings",
    "matched_by", "base_cell_id", "new_cell_id", "base_status", "new_status", "base_run", "new_run", "base_host",
    "new_host", "base_release", "new_release", "base_runtime", "new_runtime", "base_device", "new_device",
    "base_n", "new_n", "base_ttft_ms", "base_ttft_ci_lo", "base_ttft_ci_hi", "new_ttft_ms", "new_ttft_ci_lo",
    "new_ttft_ci_hi", "delta_ms", "delta_ci_lo", "delta_ci_hi", "delta_pct", "delta_pct_ci_lo", "delta_pct_ci_hi",
    "p_value", "base_verified", "base_unverified", "new_verified", "new_unverified", "base_harness_overhead_ms",
    "new_harness_overhead_ms", "harness_delta_ms", "harness_delta_ci_lo", "harness_delta_ci_hi",
    "base_miss_minus_hit_ms", "base_miss_minus_hit_ci_lo", "base_miss_minus_hit_ci_hi", "new_miss_minus_hit_ms",
    "new_miss_minus_hit_ci_lo", "new_miss_minus_hit_ci_hi", "miss_minus_hit_delta_ms", "miss_minus_hit_delta_ci_lo",
    "miss_minus_hit_delta_ci_hi", "miss_minus_hit_delta_pct", "miss_minus_hit_delta_pct_ci_lo",
    "miss_minus_hit_delta_pct_ci_hi", "gates_tripped",
)


def _delta_cols(prefix: str, d: Delta | None) -> dict:
    d = d or Delta()
    return {f"{prefix}_ms": d.diff, f"{prefix}_ci_lo": d.diff_ci and d.diff_ci[0],
            f"{prefix}_ci_hi": d.diff_ci and d.diff_ci[1], f"{prefix}_pct": d.rel_pct,
            f"{prefix}_pct_ci_lo": d.rel_ci and d.rel_ci[0], f"{prefix}_pct_ci_hi": d.rel_ci and d.rel_ci[1]}


def csv_text(res: Result, results: list[GateResult]) -> str:
    tripped: dict[int, list[str]] = {}
    for g in results:
        for t in g.trips:
            if t.row is not None:
                tripped.setdefault(id(t.row), []).append(g.gate.text)
    rows = []
    for m in res.matches:
        b, n = m.base, m.new
        d = {k: getattr(n, k) for k in ("experiment", "phase", "api", "model", "a", "b", "q", "max_output_tokens",
                                        "condition", "axis")}
        d["settings"] = " ".join(f"{k}={fmt.setting(v)}" for k, v in sorted(_settings(n).items()))
        d["matched_by"] = "settings" + "".join(f" + {x}" for x in m.by)
        for side, r in (("base", b), ("new", n)):
            d.update({f"{side}_cell_id": r.cell_id, f"{side}_status": r.status, f"{side}_run": r.run,
                      f"{side}_host": r.host, f"{side}_release": r.release, f"{side}_runtime": r.runtime_kind,
                      f"{side}_device": r.device, f"{side}_n": r.n, f"{side}_ttft_ms": r.ttft_ms,
                      f"{side}_ttft_ci_lo": r.ttft_ci_lo, f"{side}_ttft_ci_hi": r.ttft_ci_hi,
                      f"{side}_verified": r.verified, f"{side}_unverified": r.unverified,
                      f"{side}_harness_overhead_ms": r.harness_overhead_ms,
                      f"{side}_miss_minus_hit_ms": r.miss_minus_hit_ms,
                      f"{side}_miss_minus_hit_ci_lo": r.miss_minus_hit_ci_lo,
                      f"{side}_miss_minus_hit_ci_hi": r.miss_minus_hit_ci_hi})
        d.update(_delta_cols("delta", m.ttft))
        d["p_value"] = m.ttft.p if m.ttft else None
        h = _delta_cols("harness_delta", m.harness)
        d.update({k: h[k] for k in ("harness_delta_ms", "harness_delta_ci_lo", "harness_delta_ci_hi")})
        d.update(_delta_cols("miss_minus_hit_delta", m.mmh))
        d["gates_tripped"] = " ".join(tripped.get(id(n), []))
        rows.append(fmt.json_safe(d))
    return fmt.to_csv(rows, COLUMNS)


# ---------------------------------------------------------------- CLI


def _gate_arg(text: str) -> Gate:
    try:
        return parse_gate(text)
    except GateError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[Path], list[Path]]:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], epilog=HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                    help="BASE NEW, one run folder each; with --base or --new: the folder(s) of the other side")
    ap.add_argument("--base", nargs="+", action="extend", type=Path, metavar="DIR",
                    help="BASE as several folders (e.g. docs/results/h100-2026-11-22/*/)")
    ap.add_argument("--new", nargs="+", action="extend", type=Path, metavar="DIR", help="NEW as several folders")
    ap.add_argument("--out", type=Path, default=None, help="folder for compare.md / compare.csv (default: NEW's "
                    "first folder)")
    ap.add_argument("--fail-if", action="append", type=_gate_arg, default=[], metavar="EXPR",
                    help="gate: exit 1 when EXPR holds on any row (see below)")
    ap.add_argument("--gate-on", choices=GATE_ON, default="ci", help="what a timing gate tests: the CI's near "
                    "bound too (ci, default) or the point estimate (point)")
    args = ap.parse_args(argv)
    base, new, rest = list(args.base or []), list(args.new or []), list(args.dirs)
    if base and new and rest:
        ap.error(f"{rest[0]}: both sides are given by --base and --new; drop it or add it to one of them")
    if not base and not new:
        if len(rest) != 2:
            ap.error(f"give BASE and NEW ({len(rest)} folder{'s' * (len(rest) != 1)} given): compare BASE NEW, "
                     "or --base DIR... --new DIR... for sides of several folders")
        base, new = [rest[0]], [rest[1]]
    elif not new:
        if not rest:
            ap.error("NEW missing: give its folder after BASE's (--base DIR... NEW) or as --new DIR...")
        new = rest
    elif not base:
        if not rest:
            ap.error("BASE missing: give its folder (BASE --new DIR...) or --base DIR...")
        base = rest
    return args, base, new


def run(base_dirs: list[Path], new_dirs: list[Path], gates: list[Gate], gate_on: str = "ci"):
    """Load, match, evaluate: (Result, gate results, compare.md text)."""
    res = match(build(load_required(base_dirs)), build(load_required(new_dirs)))
    results = evaluate(gates, res, gate_on)
    return res, results, markdown(res, results, base_dirs, new_dirs, gate_on)


def main(argv: list[str] | None = None) -> int:
    args, base_dirs, new_dirs = parse_args(argv)
    missing = [d for d in base_dirs + new_dirs if not d.is_dir()]
    if missing:
        print(f"kvmatrix: error: no result cells in {missing[0]}: no such folder; pass an existing run folder that "
              "holds the cell *.json (results/<run-name>)", file=sys.stderr)
        return 2
    try:
        res, results, md = run(base_dirs, new_dirs, args.fail_if, args.gate_on)
    except NoCellsError as exc:
        print(f"kvmatrix: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or new_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(md)
    (out / "compare.csv").write_text(csv_text(res, results))
    print(md, end="")
    print(f"\nwrote {out / 'compare.md'}, {out / 'compare.csv'}")
    return 1 if any(g.held for g in results) else 0


if __name__ == "__main__":
    sys.exit(main())
