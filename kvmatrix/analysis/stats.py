"""Statistics for the report, numpy only (no scipy).

- ``summarize``: n, median with a bootstrap 95 % CI, mean, stdev, CV, p95, min, max.
- ``compare``: difference of medians (b - a) and the relative change, each with
  a bootstrap 95 % CI, plus a two-sided Mann-Whitney U p-value.
- ``tukey``: Tukey fences (Q1 - 1.5 IQR, Q3 + 1.5 IQR) and the values beyond them.
- ``linear_fit``: least-squares line with R².

Bootstrap: ``N_BOOT`` resamples with replacement, percentile method, a fresh
``numpy.random.default_rng(SEED)`` per call, so every number in a report is
reproducible from the result JSON alone. Percentiles interpolate linearly
(numpy's default, the same as ``kvmatrix.runners.results.percentile``).

Mann-Whitney U: exact null distribution when there are no ties and the smaller
sample has at most ``EXACT_MAX_N`` values; otherwise the normal approximation
with tie correction and continuity correction (the same choices as
``scipy.stats.mannwhitneyu(..., method="auto")``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvmatrix.analysis.fmt import fmt_p  # noqa: F401 - the p-value format lives with the others

N_BOOT = 10_000
SEED = 20240611
CI_LEVEL = 95.0
EXACT_MAX_N = 8
TUKEY_K = 1.5
_CHUNK = 2_000_000  # values per bootstrap chunk (bounds memory for large samples)


def clean(values) -> np.ndarray:
    """The finite numbers of ``values`` as a float array (None, NaN, inf dropped)."""
    out = []
    for v in values if values is not None else ():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return np.asarray(out, dtype=float)


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

    @property
    def err(self) -> tuple[float, float] | None:
        """(lower, upper) error-bar arms from the median to the CI bounds."""
        if self.median is None or self.ci is None:
            return None
        return max(0.0, self.median - self.ci[0]), max(0.0, self.ci[1] - self.median)


def _resample_stat(x: np.ndarray, rng: np.random.Generator, n_boot: int, fn) -> np.ndarray:
    """``fn`` of ``n_boot`` resamples (rows) of ``x``, drawn in chunks."""
    n = len(x)
    per = max(1, _CHUNK // n)
    out = np.empty(n_boot)
    done = 0
    while done < n_boot:
        k = min(per, n_boot - done)
        idx = rng.integers(0, n, size=(k, n))
        out[done:done + k] = fn(x[idx], axis=1)
        done += k
    return out


def _ci(boot: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    tail = (100.0 - level) / 2
    lo, hi = np.percentile(boot, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_ci(values, fn=np.median, *, n_boot: int = N_BOOT, seed: int = SEED,
                 level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap CI of ``fn`` (default: the median); None for an empty sample."""
    x = clean(values)
    if len(x) == 0:
        return None
    if len(x) == 1 or np.all(x == x[0]):
        v = float(fn(x))
        return v, v
    return _ci(_resample_stat(x, np.random.default_rng(seed), n_boot, fn), level)


def summarize(values, *, n_boot: int = N_BOOT, seed: int = SEED) -> Summary:
    """n, median [95 % bootstrap CI], mean, stdev, CV, p95, min, max of the finite values."""
    x = clean(values)
    n = len(x)
    if n == 0:
        return Summary(0)
    mean = float(np.mean(x))
    sd = float(np.std(x, ddof=1)) if n > 1 else 0.0
    return Summary(
        n=n, median=float(np.median(x)), ci=bootstrap_ci(x, n_boot=n_boot, seed=seed),
        mean=mean, stdev=sd, cv=(sd / mean) if mean else None,
        p95=float(np.percentile(x, 95)), min=float(np.min(x)), max=float(np.max(x)),
    )


# ---------------------------------------------------------------- Mann-Whitney U


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # average of ranks i+1 .. j+1
        i = j + 1
    return ranks


def _norm_sf(z: float) -> float:
    """Upper tail of the standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def _exact_counts(m: int, n: int) -> np.ndarray:
    """Number of arrangements giving U = 0 .. m*n for samples of sizes m and n (no ties).

    Recurrence f(m, n, u) = f(m-1, n, u-n) + f(m, n-1, u), built up over m.
    """
    # table[j] = counts for sizes (i, j) at the current i
    table = [np.zeros(1, dtype=float) + 1 for _ in range(n + 1)]  # i = 0: one way, U = 0
    for i in range(1, m + 1):
        new = [np.ones(1)]  # j = 0: one way, U = 0
        for j in range(1, n + 1):
            c = np.zeros(i * j + 1)
            a = table[j]  # f(i-1, j, u - j): the largest value belongs to sample 1
            c[j:j + len(a)] += a
            b = new[j - 1]  # f(i, j-1, u): the largest value belongs to sample 2
            c[:len(b)] += b
            new.append(c)
        table = new
    return table[n]


@dataclass(frozen=True)
class MannWhitney:
    u: float  # U of the first sample
    p: float  # two-sided
    method: str  # "exact" | "normal"


def mann_whitney(a, b) -> MannWhitney | None:
    """Two-sided Mann-Whitney U test of samples ``a`` and ``b``; None if either is empty."""
    x, y = clean(a), clean(b)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return None
    both = np.concatenate([x, y])
    ranks = rankdata(both)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    mu = n1 * n2 / 2
    _, counts = np.unique(both, return_counts=True)
    ties = bool(np.any(counts > 1))
    if not ties and min(n1, n2) <= EXACT_MAX_N:
        dist = _exact_counts(n1, n2)
        total = dist.sum()
        k = int(round(u1))
        lower = dist[: k + 1].sum() / total
        upper = dist[k:].sum() / total
        return MannWhitney(u1, float(min(1.0, 2 * min(lower, upper))), "exact")
    big_n = n1 + n2
    tie_term = float(np.sum(counts.astype(float) ** 3 - counts)) / (big_n * (big_n - 1))
    var = n1 * n2 / 12 * ((big_n + 1) - tie_term)
    if var <= 0:  # every value identical: no evidence of a difference
        return MannWhitney(u1, 1.0, "normal")
    z = max(0.0, abs(u1 - mu) - 0.5) / math.sqrt(var)
    return MannWhitney(u1, min(1.0, 2 * _norm_sf(z)), "normal")


# ---------------------------------------------------------------- two-sample comparison


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

    @property
    def p(self) -> float | None:
        return None if self.test is None else self.test.p


def compare(a, b, *, n_boot: int = N_BOOT, seed: int = SEED) -> Comparison:
    """Difference of medians (b - a) and relative change with bootstrap CIs, and Mann-Whitney U.

    a and b are resampled independently (the conditions are separate trials).
    """
    x, y = clean(a), clean(b)
    if len(x) == 0 or len(y) == 0:
        return Comparison(len(x), len(y))
    ma, mb = float(np.median(x)), float(np.median(y))
    rng = np.random.default_rng(seed)
    bx = _resample_stat(x, rng, n_boot, np.median)
    by = _resample_stat(y, rng, n_boot, np.median)
    diff_ci = _ci(by - bx)
    rel = rel_ci = None
    if ma > 0 and np.all(bx > 0):
        rel = (mb - ma) / ma * 100
        rel_ci = _ci((by - bx) / bx * 100)
    return Comparison(len(x), len(y), mb - ma, diff_ci, rel, rel_ci, mann_whitney(x, y))


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
