"""invalidation cells -> ``Row`` (hit vs miss, bootstrap CIs, Mann-Whitney U, roofline floor), and the
warm-up ``Cascade`` read from the run order."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmatrix.analysis import roofline
from kvmatrix.analysis.fmt import finite, unknown
from kvmatrix.analysis.labels import config_key, phase_key, series_labels
from kvmatrix.analysis.load import ok_cells
from kvmatrix.analysis.stats import Comparison, Summary, compare, summarize
from kvmatrix.analysis.trials import (
    CONDITION_NAMES,
    condition_floor,
    median,
    parse_order,
    stat,
    unverified_trials,
)
from kvmatrix.runners.document import CellDoc, measured
from kvmatrix.runners.results import STAT_FIELDS, describe

NAME = "invalidation"


@dataclass
class Row:
    """One ok invalidation cell as the report and the figures see it."""

    cell_id: str
    phase: str
    series: str  # backend label, unique per (phase, config)
    a: int | None
    b: int | None
    hit: dict  # the condition's stats{} (see condition_stats)
    miss: dict
    degradation_pct: float | None  # as recorded: (mean miss - mean hit) / mean hit
    max_output_tokens: int | None = None
    unverified: int = 0  # measured trials with cache_verified false
    warmups: tuple[int, int] = (0, 0)  # warm-up trials (hit, miss)
    trials: dict[str, list[dict]] = field(default_factory=dict, repr=False)  # "hit"/"miss" -> measured trials
    cell: CellDoc = field(default_factory=CellDoc, repr=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def config(self) -> str:
        return f"{unknown(self.a)}/{unknown(self.b)}"

    @property
    def name(self) -> str:
        """Phase and backend label, as figures name a series."""
        return f"{self.phase} {self.series}"

    @property
    def order(self) -> list[str]:
        return list(self.cell.order or [])

    def values(self, cond: str, metric: str = "ttft_ms") -> list:
        return [t.get(metric) for t in self.trials.get(cond, [])]

    def summary(self, cond: str, metric: str = "ttft_ms") -> Summary:
        """Summary (median with bootstrap CI, ...) of a metric over the measured trials of hit/miss."""
        key = ("summary", cond, metric)
        if key not in self._memo:
            self._memo[key] = summarize(self.values(cond, metric))
        return self._memo[key]

    def comparison(self, metric: str = "ttft_ms") -> Comparison:
        """Miss versus hit: difference of medians, relative change, Mann-Whitney U."""
        key = ("compare", metric)
        if key not in self._memo:
            self._memo[key] = compare(self.values("hit", metric), self.values("miss", metric))
        return self._memo[key]

    @property
    def floor(self) -> tuple[roofline.Floor | None, str]:
        """Roofline floor of the miss's recomputed tokens (medians over the measured miss trials)."""
        if "floor" not in self._memo:
            self._memo["floor"] = condition_floor(self.cell, self.trials.get("miss", []))
        return self._memo["floor"]

    @property
    def floor_ratio(self) -> float | None:
        """Miss TTFT median / roofline floor."""
        return roofline.ratio(self.summary("miss").median, self.floor[0])

    @property
    def model(self) -> str:
        """The model's name ("?" when not recorded)."""
        return str(self.cell.model.name or "?")

    @property
    def requested(self) -> dict:
        return self.cell.runtime.requested


def condition_stats(cell: CellDoc, condition: str) -> dict:
    """The condition's stats{}: recomputed from its measured trials where it has any (the runner's
    ``describe`` on the same values), the recorded stats otherwise; counts as recorded."""
    out = dict(cell.stats(condition))
    ms = measured(cell.trials(condition))
    if ms:
        for f in STAT_FIELDS:
            out[f] = describe([t.get(f) for t in ms])
    return out


def build(cells) -> list[Row]:
    """Rows for the ok invalidation cells, ordered by phase, backend label, then config."""
    ok = ok_cells(cells, NAME)
    labels = series_labels(ok)
    rows = []
    for i, c in enumerate(ok):
        rows.append(Row(
            cell_id=str(c.cell_id), phase=str(c.phase or "?"), series=labels[i],
            a=c.config.context_size_a, b=c.config.context_size_b,
            hit=condition_stats(c, "cache_hit"), miss=condition_stats(c, "cache_miss"),
            degradation_pct=finite(c.ttft_degradation_pct),
            max_output_tokens=c.config.max_output_tokens,
            unverified=len(unverified_trials(c)),
            warmups=tuple(cond.warmups if (cond := c.condition(k)) else 0 for k in CONDITION_NAMES),
            trials={short: measured(c.trials(k)) for k, short in CONDITION_NAMES.items()},
            cell=c,
        ))
    rows.sort(key=lambda r: (phase_key(r.phase), r.series, config_key(r.a, r.b)))
    return rows


# ---------------------------------------------------------------- where the TTFT goes


def max_tokens(rows: list[Row]) -> str:
    """The generated tokens per run when every row agrees, else "N"."""
    n = {r.max_output_tokens for r in rows}
    return str(n.pop()) if len(n) == 1 and None not in n else "N"



def computation_ms(stats: dict) -> tuple[float | None, str]:
    """Prompt computation time: engine prompt time when reported, else non-streaming TTFT."""
    eng = stat(stats, "engine_prompt_ms")
    if eng is not None:
        return eng, "engine"
    return stat(stats, "ttft_non_streaming_ms"), "non-streaming"


def ttft_split(stats: dict) -> tuple[float, float] | None:
    """(computation, overhead) in ms; overhead = max(0, TTFT median - computation)."""
    ttft = stat(stats, "ttft_ms")
    comp, _ = computation_ms(stats)
    if ttft is None and comp is None:
        return None
    comp = comp if comp is not None else ttft
    return comp, max(0.0, (ttft if ttft is not None else comp) - comp)


# ---------------------------------------------------------------- warm-up cascade


@dataclass
class Cascade:
    """Warm-ups of an invalidation cell split by the condition of the query that preceded them."""

    row: Row
    after: dict[str, list[dict]]  # "hit"/"miss" -> trials whose warm-up followed that condition
    excluded: int  # the first query (cold) and warm-up trials

    def summary(self, prev: str) -> Summary:
        return summarize([t.get("warmup_time_ms") for t in self.after.get(prev, [])])

    def tokens(self, prev: str) -> tuple[float | None, float | None] | None:
        """(median cached, median recomputed) tokens of those warm-ups; None when not recorded.
        Recomputed is None when only the cached count was recorded."""
        trials = [t for t in self.after.get(prev, []) if isinstance(t.get("warmup_cached_tokens"), int)]
        if not trials:
            return None
        cached = median([t["warmup_cached_tokens"] for t in trials])
        rec = [t["warmup_prompt_tokens"] - t["warmup_cached_tokens"] for t in trials
               if isinstance(t.get("warmup_prompt_tokens"), int)]
        return cached, median(rec)


def cascade(row: Row) -> tuple[Cascade | None, str]:
    """Attribute each measured trial's warm-up to the condition of the query run just before it."""
    order = [parse_order(e) for e in row.order]
    if not order or any(o is None for o in order):
        return None, "no trial order recorded" if not order else "trial order not understood"
    index = {}
    for cond in CONDITION_NAMES:
        for t in row.cell.trials(cond):
            index[(cond, t.get("trial"), bool(t.get("warmup")))] = t
    after: dict[str, list[dict]] = {"hit": [], "miss": []}
    excluded = 0
    for prev, cur in zip([None, *order[:-1]], order, strict=True):
        t = index.get(cur)
        if prev is None or cur[2] or t is None or prev[0] not in CONDITION_NAMES:
            excluded += 1
            continue
        if finite(t.get("warmup_time_ms")) is not None:
            after[CONDITION_NAMES[prev[0]]].append(t)
    if not after["hit"] and not after["miss"]:
        return None, "no warm-up times"
    return Cascade(row, after, excluded), ""
