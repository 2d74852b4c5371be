"""Robust aggregates as rliable reports them (Agarwal et al. 2021): IQM and probability of improvement, with CIs."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import scipy.stats

from posttrain.stats.bootstrap import CONFIDENCE, DEFAULT_RESAMPLES, percentile_bootstrap
from posttrain.stats.tests_two_groups import _arr



def iqm(x: Iterable[float], axis: int | None = None) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% of values (``scipy.stats.trim_mean(x, 0.25)``).

    rliable's recommended aggregate (Agarwal et al. 2021): robust to outlier runs, less noisy than the median.
    """
    if axis is None:
        a = _arr(x)
        return float(scipy.stats.trim_mean(a, 0.25)) if a.size else math.nan
    return scipy.stats.trim_mean(np.asarray(x, dtype=float), 0.25, axis=axis)


def iqm_ci(x: Iterable[float], *, n_resamples: int = DEFAULT_RESAMPLES, rng: np.random.Generator | int = 0,
           confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the IQM, runs resampled with replacement (rliable's bootstrap)."""
    return percentile_bootstrap((x,), lambda a, axis: iqm(a, axis=axis), n_resamples=n_resamples, rng=rng,
                                confidence=confidence)


def probability_of_improvement(x: Iterable[float], y: Iterable[float], axis: int | None = None) -> float | np.ndarray:
    """P(X > Y) + P(X = Y)/2 for a random run X of one algorithm and Y of another (Agarwal et al. 2021).

    The Mann-Whitney U statistic of x against y divided by n_x * n_y (``scipy.stats.mannwhitneyu``).
    """
    if axis is None:
        a, b = _arr(x), _arr(y)
        if a.size == 0 or b.size == 0:
            return math.nan
        return float(scipy.stats.mannwhitneyu(a, b).statistic) / (a.size * b.size)
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return scipy.stats.mannwhitneyu(a, b, axis=axis).statistic / (a.shape[axis] * b.shape[axis])


def probability_of_improvement_ci(x: Iterable[float], y: Iterable[float], *, n_resamples: int = DEFAULT_RESAMPLES,
                                  rng: np.random.Generator | int = 0, confidence: float = CONFIDENCE,
                                  ) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`probability_of_improvement`, each group resampled on its own."""
    return percentile_bootstrap((x, y), lambda a, b, axis: probability_of_improvement(a, b, axis=axis),
                                n_resamples=n_resamples, rng=rng, confidence=confidence)


