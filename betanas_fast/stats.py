"""The statistics of the studies and of latency validation, in numpy: Kendall's τ-b, Spearman's ρ, a percentile bootstrap over seeds, and the
one-sided two-sample tests (Mann–Whitney U and a permutation test on the mean difference), exact where
the number of label assignments allows, seeded Monte Carlo otherwise."""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence, Tuple

import numpy as np

# Exact permutation distributions up to this many label assignments (C(20, 10) = 184,756), else Monte Carlo.
EXACT_LIMIT = 200_000
MONTE_CARLO_DRAWS = 100_000


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b: (concordant − discordant) / sqrt((n0 − tied in x)(n0 − tied in y)) over the n0 pairs;
    a pair tied in x or y counts as neither. NaN when either ranking is all ties (as scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"τ-b needs two rankings of the same items, got shapes {x.shape} and {y.shape}")
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    pairs = len(i)
    denominator = math.sqrt(float(pairs - np.count_nonzero(dx == 0)) * float(pairs - np.count_nonzero(dy == 0)))
    return float("nan") if denominator == 0 else float((dx * dy).sum() / denominator)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the mid-ranks (ties share their mean rank); NaN when either
    ranking is all ties."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"ρ needs two rankings of the same items, got shapes {x.shape} and {y.shape}")
    rx, ry = _midranks(x) - (len(x) + 1) / 2, _midranks(y) - (len(y) + 1) / 2
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float("nan") if denominator == 0 else float((rx * ry).sum() / denominator)


@dataclass
class Interval:
    low: float
    high: float
    level: float
    resamples: int
    undefined: int  # resamples whose statistic was NaN (left out of the percentiles)

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_interval(statistic: Callable[[np.ndarray], float], units: int, resamples: int = 10_000,
                       level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap: `statistic(indices)` of `resamples` draws of `units` unit indices (seeds, nets) with
    replacement, from a seeded generator; the central `level` interval of the defined values."""
    if units < 1:
        raise ValueError("the bootstrap needs at least one unit")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, units, units)) for _ in range(resamples)], dtype=np.float64)
    defined = values[~np.isnan(values)]
    if not len(defined):
        return Interval(float("nan"), float("nan"), level, resamples, resamples)
    low, high = np.quantile(defined, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(float(low), float(high), level, resamples, int(resamples - len(defined)))


@dataclass
class TestResult:
    statistic: float
    p_value: float
    method: str  # "exact" (every label assignment) or "monte carlo (N draws)"

    def to_dict(self) -> dict:
        return asdict(self)


def _group_sums(values: np.ndarray, n_first: int, seed: int) -> Tuple[np.ndarray, str]:
    """The sum of the first group's `values` under every assignment of n_first of them to the first group
    (exact), or under MONTE_CARLO_DRAWS seeded random assignments."""
    total = len(values)
    if math.comb(total, n_first) <= EXACT_LIMIT:
        picks = np.array(list(itertools.combinations(range(total), n_first)), dtype=np.int64).reshape(-1, n_first)
        return values[picks].sum(1), "exact"
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((MONTE_CARLO_DRAWS, total)), axis=1)[:, :n_first]
    return values[picks].sum(1), f"monte carlo ({MONTE_CARLO_DRAWS} draws)"


def _greater_p(values: np.ndarray, n_first: int, seed: int) -> Tuple[float, str]:
    """One-sided p of "the first n_first values are larger": the share of label assignments whose first-group
    sum is at least the observed one (Monte Carlo: (1 + count) / (1 + draws), never 0)."""
    observed = values[:n_first].sum()
    sums, method = _group_sums(values, n_first, seed)
    atol = 1e-9 * max(1.0, float(np.abs(values).sum()))
    hits = int(np.count_nonzero(sums >= observed - atol))
    p = hits / len(sums) if method == "exact" else (hits + 1) / (len(sums) + 1)
    return float(p), method


def _midranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_v = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_v[end] != sorted_v[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # 1-based mean rank of the tie group
            start = end
    return ranks


def _two_samples(a, b) -> Tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) < 1 or len(b) < 1:
        raise ValueError("both samples need at least one value")
    return a, b


def smallest_p(n_first: int, n_second: int) -> float:
    """The smallest p-value an exact one-sided rank or permutation test of n_first against n_second values can
    give: one relabelling of C(n_first + n_second, n_first) is the most extreme (no ties)."""
    return 1.0 / math.comb(n_first + n_second, n_first)


def mann_whitney_greater(a: Sequence[float], b: Sequence[float], seed: int = 0) -> TestResult:
    """One-sided Mann–Whitney U test of "a tends to be larger than b". U = #{a_i > b_j} + ½ #{a_i = b_j};
    its p-value is taken from the permutation distribution of the rank sum (mid-ranks for ties), exact for
    up to EXACT_LIMIT label assignments: the exact test, conditional on the ties."""
    a, b = _two_samples(a, b)
    ranks = _midranks(np.concatenate([a, b]))
    u = float(ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2)
    p, method = _greater_p(ranks, len(a), seed)
    return TestResult(u, p, method)


def permutation_greater(a: Sequence[float], b: Sequence[float], seed: int = 0) -> TestResult:
    """One-sided permutation test of "mean(a) > mean(b)": the share of relabellings of the pooled values whose
    mean difference is at least the observed one (exact, or Monte Carlo beyond EXACT_LIMIT)."""
    a, b = _two_samples(a, b)
    p, method = _greater_p(np.concatenate([a, b]), len(a), seed)
    return TestResult(float(a.mean() - b.mean()), p, method)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else 0.0)
