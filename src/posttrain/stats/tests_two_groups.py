"""Two-group tests: Welch's t-test, Cohen's d, family-wise correction of p-values (docs/design.md "Report").

Welch (1947) via ``scipy.stats.ttest_ind(equal_var=False)``; Holm (1979) / Bonferroni via statsmodels'
``multipletests``; Cohen's d with the pooled sample sd (Cohen 1988).
"""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import scipy.stats
from statsmodels.stats.multitest import multipletests

CORRECTIONS = ("bonferroni", "holm", "none")



def _arr(x: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(x) if not isinstance(x, (np.ndarray, pd.Series)) else x, dtype=float)
    return a[np.isfinite(a)]


def sample_std(x: Iterable[float]) -> float:
    """Sample standard deviation (ddof=1); NaN for fewer than two values."""
    a = _arr(x)
    return float(np.std(a, ddof=1)) if a.size >= 2 else math.nan


def testable(a: Iterable[float], b: Iterable[float]) -> bool:
    """Whether Welch's test is defined: both groups have n >= 2 and not both have zero variance.

    One constant group is fine (its variance term is 0, the other carries the test); two constant groups give
    t = +-inf or 0/0, which is not a test result.
    """
    a, b = _arr(a), _arr(b)
    if a.size < 2 or b.size < 2:
        return False
    return not (np.ptp(a) == 0 and np.ptp(b) == 0)


@dataclass(frozen=True)
class Welch:
    """Welch's t-test result: statistic t, Welch-Satterthwaite degrees of freedom df, two-sided p."""

    t: float
    df: float
    p: float


def welch(a: Iterable[float], b: Iterable[float]) -> Welch:
    """Welch's unequal-variances t-test of mean(a) - mean(b) (Welch 1947), two-sided.

    ``scipy.stats.ttest_ind(a, b, equal_var=False)``; t > 0 when a's mean is larger. NaNs in all three fields
    when the pair is not :func:`testable` (n < 2 in a group, or zero variance in both).
    """
    a, b = _arr(a), _arr(b)
    if not testable(a, b):
        return Welch(math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "precision loss" on near-identical data
        res = scipy.stats.ttest_ind(a, b, equal_var=False)
    return Welch(float(res.statistic), float(res.df), float(res.pvalue))


def cohen_d(a: Iterable[float], b: Iterable[float]) -> float:
    """Cohen's d = (mean(a) - mean(b)) / s_pooled, s_pooled^2 = ((n_a-1)s_a^2 + (n_b-1)s_b^2) / (n_a+n_b-2).

    Sample variances (ddof=1), as Cohen (1988) defines the pooled standard deviation. NaN when it is undefined
    (n_a + n_b < 3, an empty group) or zero.
    """
    a, b = _arr(a), _arr(b)
    na, nb = a.size, b.size
    if na == 0 or nb == 0 or na + nb < 3:
        return math.nan
    ss = (np.var(a, ddof=1) * (na - 1) if na > 1 else 0.0) + (np.var(b, ddof=1) * (nb - 1) if nb > 1 else 0.0)
    pooled = math.sqrt(ss / (na + nb - 2))
    if pooled == 0:
        return math.nan
    return float((a.mean() - b.mean()) / pooled)


def adjust_pvalues(p: Iterable[float], method: str = "bonferroni",
                   alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Family-wise correction of p-values: returns (p_adj, significant).

    ``method``: "bonferroni", "holm" (``statsmodels.stats.multitest.multipletests``) or "none" (p_adj = p).
    NaN entries (pairs that cannot be tested) are left NaN, are never significant and do not count towards the
    family size. significant = p_adj <= alpha (statsmodels' rejection rule).
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; known: {', '.join(CORRECTIONS)}")
    p = np.asarray(list(p), dtype=float)
    p_adj = np.full(p.shape, math.nan)
    significant = np.zeros(p.shape, dtype=bool)
    ok = np.isfinite(p)
    if ok.any():
        if method == "none":
            p_adj[ok] = p[ok]
            significant[ok] = p[ok] <= alpha
        else:
            # statsmodels' Holm branch calls gc.collect(), a full collection costing ~0.3 s per family in a
            # process holding pandas/matplotlib; freezing the existing objects first makes it cheap.
            gc.freeze()
            try:
                reject, corrected, _, _ = multipletests(p[ok], alpha=alpha, method=method)
            finally:
                gc.unfreeze()
            p_adj[ok] = corrected
            significant[ok] = reject
    return p_adj, significant


