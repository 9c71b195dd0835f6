"""What every trial-protocol analysis reads from the trials: tokens recomputed, verification, the run
order, the roofline floor of a set of trials.

A trial is the dict the runner wrote (``kvmatrix.runners.results.Trial``); a cell's trial blocks come
from ``CellDoc.trial_blocks``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmatrix.analysis import fmt, roofline
from kvmatrix.analysis.load import as_doc
from kvmatrix.analysis.stats import Summary, summarize
from kvmatrix.runners.document import CellDoc, measured

#: the trial protocol's two conditions and their short names
CONDITION_NAMES = {"cache_hit": "hit", "cache_miss": "miss"}


def median(xs: list[float]) -> float | None:
    """The median of the values that are not None (the middle two averaged); None when there are none."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def trial_tokens(t: dict, allow_expected: bool = True) -> tuple[int, int] | None:
    """(recomputed, cached) tokens of a timed query: prompt - cached.

    The engine's cached count; with ``allow_expected`` the expected count when the
    engine reported none. None when the prompt size or both counts are missing.
    """
    prompt = t.get("prompt_tokens")
    cached = t.get("cached_tokens")
    if cached is None and allow_expected:
        cached = t.get("expected_cached_tokens")
    if not isinstance(prompt, int) or isinstance(prompt, bool) or prompt <= 0 or not isinstance(cached, int):
        return None
    return max(0, prompt - cached), cached


def condition_floor(cell: CellDoc, trials: list[dict]) -> tuple[roofline.Floor | None, str]:
    """Roofline floor for the median recomputed/cached tokens of ``trials``."""
    toks = [tt for t in trials if (tt := trial_tokens(t)) is not None]
    if not toks:
        return None, "no prompt/cached token counts"
    return roofline.floor(cell, median([r for r, _ in toks]), median([c for _, c in toks]))


class MeasuredTrials:
    """TTFT summary, verified count and roofline floor of a point's measured trials
    (for dataclasses with ``trials``, ``cell`` and a ``_memo`` dict)."""

    @property
    def summary(self) -> Summary:
        if "summary" not in self._memo:
            self._memo["summary"] = summarize([t.get("ttft_ms") for t in self.trials])
        return self._memo["summary"]

    @property
    def verified(self) -> str:
        return f"{sum(1 for t in self.trials if t.get('cache_verified'))}/{len(self.trials)}"

    @property
    def floor(self) -> tuple[roofline.Floor | None, str]:
        if "floor" not in self._memo:
            self._memo["floor"] = condition_floor(self.cell, self.trials)
        return self._memo["floor"]


# ---------------------------------------------------------------- verification


@dataclass
class Unverified:
    """One measured trial whose cached-token count did not check out."""

    cell_id: str
    condition: str  # "cache_hit" | "cache_miss" | another trial block's name
    trial: int
    cached_tokens: int | None
    expected_cached_tokens: int | None
    cache_granularity: int | None = None


def unverified_trials(cell: CellDoc | dict) -> list[Unverified]:
    """Measured (non-warm-up) trials of a cell, any experiment, with cache_verified false."""
    cell = as_doc(cell)
    out = []
    for cond, trials in cell.trial_blocks():
        for t in measured(trials):
            if not t.get("cache_verified", False):
                out.append(Unverified(
                    cell_id=str(cell.cell_id), condition=cond, trial=t.get("trial"),
                    cached_tokens=t.get("cached_tokens"),
                    expected_cached_tokens=t.get("expected_cached_tokens"),
                    cache_granularity=t.get("cache_granularity"),
                ))
    return out


def verified_count(cell: CellDoc | dict) -> tuple[int, int]:
    """(verified, measured) trials over all of a cell's blocks."""
    ts = [t for _, trials in as_doc(cell).trial_blocks() for t in measured(trials)]
    return sum(1 for t in ts if t.get("cache_verified")), len(ts)


# ---------------------------------------------------------------- run order


def parse_order(entry: str) -> tuple[str, int | None, bool] | None:
    """"cache_hit:3w" -> ("cache_hit", 3, True)."""
    m = re.fullmatch(r"([A-Za-z0-9_=.-]+):(\d+)(w?)", str(entry))
    if not m:
        return None
    return m.group(1), int(m.group(2)), bool(m.group(3))


def order_text(order: list[str]) -> str:
    """The run order in words, e.g. "interleaved: 1 warm-up round (hit, miss), then hit, miss × 10"."""
    parsed = [parse_order(e) for e in order or []]
    if not parsed:
        return "not recorded"
    if any(p is None for p in parsed):
        return "as recorded: " + ", ".join(str(e) for e in order[:8]) + (", …" if len(order) > 8 else "")
    short = [CONDITION_NAMES.get(p[0], p[0]) for p in parsed]
    warm = [s for s, p in zip(short, parsed, strict=True) if p[2]]
    meas = [s for s, p in zip(short, parsed, strict=True) if not p[2]]
    n_warm = sum(1 for p in parsed if p[2])
    head = ", ".join(f"{s}:{p[1]}{'w' if p[2] else ''}" for s, p in zip(short[:4], parsed[:4], strict=True))
    sample = f" ({head}{', …' if len(order) > 4 else ''}; {len(order)} queries)"
    if any(p[2] for p in parsed[n_warm:]):  # warm-ups not all first
        return "as recorded" + sample
    cycle = list(dict.fromkeys(meas))
    k = len(cycle)
    if k > 1 and len(meas) % k == 0 and meas == cycle * (len(meas) // k):
        warm_cycle = list(dict.fromkeys(warm))
        if warm and warm == warm_cycle * (len(warm) // len(warm_cycle)):
            w = len(warm) // len(warm_cycle)
            wtxt = f"{w} warm-up round{'s' if w != 1 else ''} ({', '.join(warm_cycle)}), then "
        elif warm:
            wtxt = f"{len(warm)} warm-up queries, then "
        else:
            wtxt = ""
        return f"interleaved: {wtxt}{', '.join(cycle)} × {len(meas) // k}" + sample
    return ("blocked" if k > 1 else "one condition") + sample


def order_lines(cells: list[CellDoc]) -> str:
    """The trial order, once when every cell ran the same, else per cell."""
    texts = {str(c.cell_id): order_text(c.order or []) for c in cells}
    if len(set(texts.values())) == 1:
        return f"Trial order (all {len(texts)} cells): {next(iter(texts.values()))}."
    return "Trial order per cell:\n\n" + fmt.table([{"cell": k, "order": v} for k, v in sorted(texts.items())])


def stat(stats: dict, metric: str, key: str = "median") -> float | None:
    """One summary value of a condition's stats{}, or None when absent or not finite."""
    return fmt.finite((stats.get(metric) or {}).get(key))
