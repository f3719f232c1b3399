"""Summaries over cases and paired significance tests between methods (SciPy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class PairedTest:
    """``b − a`` over cases present in both, with a paired t-test and a Wilcoxon signed-rank test.

    ``n`` counts the pairs where both values are finite; p-values are two-sided and NaN when
    a test is undefined (fewer than two pairs, or every difference zero).
    """

    n: int
    mean_a: float
    mean_b: float
    mean_difference: float
    std_difference: float
    t_statistic: float
    t_pvalue: float
    wilcoxon_statistic: float
    wilcoxon_pvalue: float


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, sample standard deviation, n)`` of the finite values; NaN when there are none (std: fewer than 2)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if finite.size == 0:
        return math.nan, math.nan, 0
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan, int(finite.size)


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Paired comparison of two equally long sequences of per-case values (same case at each index)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n == 0:
        return PairedTest(0, *(math.nan,) * 8)
    diff = y - x
    t_stat = t_p = w_stat = w_p = math.nan
    if n >= 2 and np.any(diff != 0):
        t = stats.ttest_rel(y, x)
        t_stat, t_p = float(t.statistic), float(t.pvalue)
        w = stats.wilcoxon(y, x)
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    return PairedTest(
        n=n,
        mean_a=float(x.mean()),
        mean_b=float(y.mean()),
        mean_difference=float(diff.mean()),
        std_difference=float(diff.std(ddof=1)) if n > 1 else math.nan,
        t_statistic=t_stat,
        t_pvalue=t_p,
        wilcoxon_statistic=w_stat,
        wilcoxon_pvalue=w_p,
    )
