"""Statistics for the report, from ``scipy.stats`` (analysis side only; the runners never import this).

- ``summarize``: n, median with a bootstrap 95 % CI, mean, stdev, CV, p95, min, max.
- ``compare``: difference of medians (b - a) and the relative change, each with a bootstrap 95 % CI,
  a two-sided Mann-Whitney U test and Cliff's delta (effect size of b versus a).
- ``tukey``: Tukey fences (Q1 - 1.5 IQR, Q3 + 1.5 IQR) and the values beyond them.
- ``linear_fit``: least-squares line with R².

Bootstrap: ``scipy.stats.bootstrap`` with ``N_BOOT`` resamples and bias-corrected and accelerated (BCa)
intervals, a fresh ``numpy.random.default_rng(SEED)`` per call, so every number in a report is reproducible
from the result JSON alone (with the same scipy version). Two samples (``compare``) are resampled
independently. Where BCa is undefined (fewer than 2 values, a constant sample, or a degenerate jackknife
that makes the acceleration 0/0) the percentile interval of the same resamples is used instead, and the
result says so (``ci_method``: ``"BCa"`` or ``"percentile"``).

Mann-Whitney U: ``scipy.stats.mannwhitneyu`` two-sided; the exact null distribution when there are no ties
and both samples have at most ``EXACT_MAX_N`` values (the exact distribution costs about 0.04 s at
100 vs 100 and grows quickly beyond), otherwise the normal approximation with tie and continuity correction.
scipy's own ``method="auto"`` would use the normal approximation for 10 vs 10, whose p bottoms out at
1.83e-04 under complete separation where the exact p is 2 / C(20, 10) = 1.08e-05. The method used is
carried by every result (``MannWhitney.method``: ``"exact"`` or ``"asymptotic"``).

Cliff's delta: (#(b > a) - #(b < a)) / (m n) over all pairs, in [-1, 1]; magnitude labels after Romano et
al. (2006): negligible < 0.147 <= small < 0.33 <= medium < 0.474 <= large.

Percentiles (p95, Tukey quartiles) interpolate linearly (numpy's default, the same as
``kvmatrix.runners.results.percentile``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from kvmatrix.analysis.fmt import fmt_p  # noqa: F401 - the p-value format lives with the others

N_BOOT = 10_000
SEED = 20240611
CI_LEVEL = 95.0
#: exact Mann-Whitney p when there are no ties and both samples have at most this many values
EXACT_MAX_N = 100
TUKEY_K = 1.5
#: Cliff's delta magnitude thresholds (Romano et al. 2006): below each bound, its label
DELTA_LABELS = ((0.147, "negligible"), (0.33, "small"), (0.474, "medium"))
_CHUNK = 2_000_000  # values per bootstrap batch (bounds memory for large samples)


def method_text() -> str:
    """One sentence stating exactly which statistics the report shows (for its header)."""
    return (
        f"Medians with 95% BCa bootstrap CIs (scipy.stats.bootstrap, {N_BOOT:,} resamples, seed {SEED}; "
        "the percentile interval of the same resamples where BCa is undefined: fewer than 2 values, "
        "a constant sample or a degenerate jackknife); miss vs hit as the difference of medians in ms and "
        "the relative change, each with a two-sample BCa CI (the two samples resampled independently); "
        "p = two-sided Mann-Whitney U (scipy.stats.mannwhitneyu: exact null distribution when there are no "
        f"ties and both samples have ≤ {EXACT_MAX_N} values, else the normal approximation with tie and "
        "continuity correction; marked per comparison); effect size = Cliff's delta, "
        "P(miss > hit) - P(miss < hit) over all pairs of trials (|δ| < 0.147 negligible, < 0.33 small, "
        "< 0.474 medium, else large)."
    )


METHOD_TEXT = method_text()


def clean(values) -> np.ndarray:
    """The finite numbers of ``values`` as a float array (None, NaN, inf dropped)."""
    out = []
    for v in values if values is not None else ():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return np.asarray(out, dtype=float)


# ---------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval and how it was computed ("BCa" or "percentile")."""

    low: float
    high: float
    method: str

    @property
    def bounds(self) -> tuple[float, float]:
        return self.low, self.high


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, *, n_boot: int, seed: int,
               level: float) -> list[Interval]:
    """BCa intervals of ``statistic(*samples)`` (samples resampled independently), one per statistic value.

    ``statistic`` takes ``axis`` and returns one value or a stack of values (leading axis); each value whose
    BCa interval is undefined (NaN) gets the percentile interval of the same resamples instead. Every sample
    must have at least 2 values and not all samples may be constant (the callers check).
    """
    from scipy import stats as sps  # noqa: PLC0415 - scipy only where statistics are computed

    batch = max(1, _CHUNK // sum(len(s) for s in samples))
    conf = level / 100
    with warnings.catch_warnings():  # BCa on degenerate data warns and returns NaN: handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", getattr(sps, "DegenerateDataWarning", RuntimeWarning))
        res = sps.bootstrap(samples, statistic, n_resamples=n_boot, batch=batch, method="BCa",
                            confidence_level=conf, rng=np.random.default_rng(seed))
        lo = np.atleast_1d(np.asarray(res.confidence_interval.low, dtype=float))
        hi = np.atleast_1d(np.asarray(res.confidence_interval.high, dtype=float))
        bca = np.isfinite(lo) & np.isfinite(hi)
        if not bca.all():
            pct = sps.bootstrap(samples, statistic, n_resamples=0, bootstrap_result=res, method="percentile",
                                confidence_level=conf, rng=np.random.default_rng(seed))
            lo = np.where(bca, lo, np.atleast_1d(pct.confidence_interval.low))
            hi = np.where(bca, hi, np.atleast_1d(pct.confidence_interval.high))
    return [Interval(float(lo_), float(hi_), "BCa" if ok else "percentile") for lo_, hi_, ok in zip(lo, hi, bca, strict=True)]


def bootstrap_interval(values, fn=np.median, *, n_boot: int = N_BOOT, seed: int = SEED,
                       level: float = CI_LEVEL) -> Interval | None:
    """Bootstrap CI of ``fn`` (default: the median; it may take ``axis``) with its method; None when empty.

    A single value or a constant sample gives the degenerate interval (v, v), method "percentile".
    """
    x = clean(values)
    if len(x) == 0:
        return None
    if len(x) == 1 or np.all(x == x[0]):
        v = float(fn(x))
        return Interval(v, v, "percentile")
    return _bootstrap((x,), fn, n_boot=n_boot, seed=seed, level=level)[0]


def bootstrap_ci(values, fn=np.median, *, n_boot: int = N_BOOT, seed: int = SEED,
                 level: float = CI_LEVEL) -> tuple[float, float] | None:
    """(low, high) of ``bootstrap_interval``: BCa bootstrap CI of ``fn``; None for an empty sample."""
    iv = bootstrap_interval(values, fn, n_boot=n_boot, seed=seed, level=level)
    return None if iv is None else iv.bounds


@dataclass(frozen=True)
class Summary:
    """Descriptive statistics of one sample; ``ci`` is the bootstrap CI of the median."""

    n: int
    median: float | None = None
    ci: tuple[float, float] | None = None
    mean: float | None = None
    stdev: float | None = None  # sample standard deviation (ddof=1); 0 for n=1
    cv: float | None = None  # stdev / mean; None when the mean is 0
    p95: float | None = None
    min: float | None = None
    max: float | None = None
    ci_method: str | None = None  # "BCa" | "percentile" (see bootstrap_interval); None without a CI

    @property
    def err(self) -> tuple[float, float] | None:
        """(lower, upper) error-bar arms from the median to the CI bounds."""
        if self.median is None or self.ci is None:
            return None
        return max(0.0, self.median - self.ci[0]), max(0.0, self.ci[1] - self.median)


def summarize(values, *, n_boot: int = N_BOOT, seed: int = SEED) -> Summary:
    """n, median [95 % BCa bootstrap CI], mean, stdev, CV, p95, min, max of the finite values."""
    x = clean(values)
    n = len(x)
    if n == 0:
        return Summary(0)
    mean = float(np.mean(x))
    sd = float(np.std(x, ddof=1)) if n > 1 else 0.0
    iv = bootstrap_interval(x, n_boot=n_boot, seed=seed)
    return Summary(
        n=n, median=float(np.median(x)), ci=iv.bounds,
        mean=mean, stdev=sd, cv=(sd / mean) if mean else None,
        p95=float(np.percentile(x, 95)), min=float(np.min(x)), max=float(np.max(x)), ci_method=iv.method,
    )


# ---------------------------------------------------------------- Mann-Whitney U, Cliff's delta


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span (``scipy.stats.rankdata``, method "average")."""
    from scipy import stats as sps  # noqa: PLC0415

    return sps.rankdata(np.asarray(x, dtype=float)).astype(float)


@dataclass(frozen=True)
class MannWhitney:
    u: float  # U of the first sample: #(a > b) + ties / 2
    p: float  # two-sided
    method: str  # "exact" | "asymptotic" (normal approximation, tie and continuity corrected)


def mann_whitney(a, b) -> MannWhitney | None:
    """Two-sided Mann-Whitney U test of samples ``a`` and ``b``; None if either is empty.

    Exact when there are no ties and both samples have at most ``EXACT_MAX_N`` values, else asymptotic.
    """
    from scipy import stats as sps  # noqa: PLC0415

    x, y = clean(a), clean(b)
    if len(x) == 0 or len(y) == 0:
        return None
    both = np.concatenate([x, y])
    ties = len(np.unique(both)) < len(both)
    method = "exact" if not ties and max(len(x), len(y)) <= EXACT_MAX_N else "asymptotic"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = sps.mannwhitneyu(x, y, alternative="two-sided", method=method, use_continuity=True)
    p = float(r.pvalue)
    return MannWhitney(float(r.statistic), 1.0 if not math.isfinite(p) else min(1.0, p), method)


def cliffs_delta(a, b) -> float | None:
    """Cliff's delta of ``b`` versus ``a``: (#(b > a) - #(b < a)) / (len(a) len(b)); None if either is empty.

    +1: every b above every a; 0: as often above as below; -1: every b below every a.
    """
    x, y = np.sort(clean(a)), clean(b)
    if len(x) == 0 or len(y) == 0:
        return None
    above = np.searchsorted(x, y, side="left").sum()  # pairs with b > a
    below = (len(x) - np.searchsorted(x, y, side="right")).sum()  # pairs with b < a
    return float((above - below) / (len(x) * len(y)))


def delta_magnitude(delta: float | None) -> str | None:
    """"negligible" | "small" | "medium" | "large" for |delta| (Romano et al. 2006); None for None."""
    if delta is None:
        return None
    d = abs(delta)
    return next((label for bound, label in DELTA_LABELS if d < bound), "large")


# ---------------------------------------------------------------- two-sample comparison


def _diff_medians(a, b, axis=-1):
    """median(b) - median(a)."""
    return np.median(b, axis=axis) - np.median(a, axis=axis)


def _diff_rel_medians(a, b, axis=-1):
    """Stack of median(b) - median(a) and the same in % of median(a)."""
    ma = np.median(a, axis=axis)
    d = np.median(b, axis=axis) - ma
    return np.stack([d, d / ma * 100])


@dataclass(frozen=True)
class Comparison:
    """b versus a (for the report: miss versus hit)."""

    n_a: int
    n_b: int
    diff: float | None = None  # median(b) - median(a)
    diff_ci: tuple[float, float] | None = None
    rel_pct: float | None = None  # (median(b) - median(a)) / median(a) * 100
    rel_ci: tuple[float, float] | None = None
    test: MannWhitney | None = None
    delta: float | None = None  # Cliff's delta of b versus a
    ci_method: str | None = None  # of diff_ci: "BCa" | "percentile"
    rel_ci_method: str | None = None  # of rel_ci

    @property
    def p(self) -> float | None:
        return None if self.test is None else self.test.p

    @property
    def method(self) -> str | None:
        """The Mann-Whitney method used: "exact" | "asymptotic"; None without a test."""
        return None if self.test is None else self.test.method

    @property
    def magnitude(self) -> str | None:
        """Cliff's delta magnitude label ("negligible" .. "large")."""
        return delta_magnitude(self.delta)


def _two_sample(x: np.ndarray, y: np.ndarray, statistic, values: list[float], *, n_boot: int,
                seed: int) -> list[Interval]:
    """Bootstrap CIs of ``statistic(x, y)`` (one per value), x and y resampled independently.

    A sample of one value stays fixed (every resample of it is itself), so the other is bootstrapped alone;
    when neither sample can vary every interval is (value, value), method "percentile".
    """
    def fixed(s):
        return len(s) < 2 or bool(np.all(s == s[0]))

    if fixed(x) and fixed(y):
        return [Interval(v, v, "percentile") for v in values]
    kw = {"n_boot": n_boot, "seed": seed, "level": CI_LEVEL}
    if len(x) == 1:
        return _bootstrap((y,), lambda s, axis=-1: statistic(x, s, axis=axis), **kw)
    if len(y) == 1:
        return _bootstrap((x,), lambda s, axis=-1: statistic(s, y, axis=axis), **kw)
    return _bootstrap((x, y), statistic, **kw)


def compare(a, b, *, n_boot: int = N_BOOT, seed: int = SEED) -> Comparison:
    """Difference of medians (b - a) and relative change with BCa bootstrap CIs, Mann-Whitney U, Cliff's delta.

    a and b are resampled independently (the conditions are separate trials); the relative change only
    when every value of a is positive (so every resampled median of a is).
    """
    x, y = clean(a), clean(b)
    if len(x) == 0 or len(y) == 0:
        return Comparison(len(x), len(y))
    ma, mb = float(np.median(x)), float(np.median(y))
    diff = mb - ma
    if np.all(x > 0):  # diff and relative change from the same resamples
        rel = diff / ma * 100
        diff_iv, rel_iv = _two_sample(x, y, _diff_rel_medians, [diff, rel], n_boot=n_boot, seed=seed)
    else:
        rel = rel_iv = None
        (diff_iv,) = _two_sample(x, y, _diff_medians, [diff], n_boot=n_boot, seed=seed)
    return Comparison(len(x), len(y), diff, diff_iv.bounds, rel, None if rel_iv is None else rel_iv.bounds,
                      mann_whitney(x, y), cliffs_delta(x, y), diff_iv.method,
                      None if rel_iv is None else rel_iv.method)


# ---------------------------------------------------------------- outliers, fits


@dataclass(frozen=True)
class Fences:
    low: float
    high: float
    flagged: tuple[int, ...]  # indexes into the values as given (non-finite values never flagged)


def tukey(values, k: float = TUKEY_K) -> Fences | None:
    """Tukey fences of the finite values; None when fewer than 4 values."""
    vals = list(values)
    x = clean(vals)
    if len(x) < 4:
        return None
    q1, q3 = np.percentile(x, [25, 75])
    iqr = q3 - q1
    low, high = float(q1 - k * iqr), float(q3 + k * iqr)
    flagged = tuple(
        i for i, v in enumerate(vals)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v < low or v > high)
    )
    return Fences(low, high, flagged)


@dataclass(frozen=True)
class Fit:
    slope: float
    intercept: float
    r2: float | None  # None when y has no variance
    n: int


def linear_fit(x, y) -> Fit | None:
    """Least-squares line y = slope * x + intercept; None with < 2 points or a single x value."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if len(xs) < 2 or np.all(xs == xs[0]):
        return None
    slope, intercept = np.polyfit(xs, ys, 1)
    ss_tot = float(np.sum((ys - ys.mean()) ** 2))
    ss_res = float(np.sum((ys - (slope * xs + intercept)) ** 2))
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else None
    return Fit(float(slope), float(intercept), r2, len(xs))
