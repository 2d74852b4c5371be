"""Percentile bootstrap intervals (Efron & Tibshirani 1993), each group resampled on its own, seeded per key."""

from __future__ import annotations

import math
import warnings
import zlib
from typing import Callable, Iterable, Sequence

import numpy as np

from posttrain.stats.tests_two_groups import _arr

DEFAULT_RESAMPLES = 10_000
CONFIDENCE = 0.95


def rng_for(seed: int, *key: object) -> np.random.Generator:
    """A Generator seeded by ``seed`` and a stable hash of ``key``.

    Each interval gets its own stream, so one pair's interval does not change when other runs or pairs are
    added to the directory, and the same inputs always give the same report.
    """
    digest = zlib.crc32("\x1f".join(map(str, key)).encode())
    return np.random.default_rng([int(seed), digest])


def percentile_bootstrap(
    samples: Sequence[Iterable[float]],
    statistic: Callable[..., np.ndarray],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    rng: np.random.Generator | int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993) of ``statistic(*samples, axis=-1)``.

    Each sample is resampled with replacement on its own (independent groups, like
    ``scipy.stats.bootstrap(..., method="percentile")``); ``statistic`` must accept arrays of shape
    (n_resamples, n_i) and reduce along ``axis``. Returns (NaN, NaN) when a sample has fewer than two values or
    ``n_resamples`` is 0.
    """
    arrays = [_arr(s) for s in samples]
    if n_resamples <= 0 or any(a.size < 2 for a in arrays):
        return math.nan, math.nan
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    resampled = [a[gen.integers(0, a.size, size=(n_resamples, a.size))] for a in arrays]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.asarray(statistic(*resampled, axis=-1), dtype=float)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _mean_diff(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def bootstrap_ci(
    a: Iterable[float],
    b: Iterable[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    rng: np.random.Generator | int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """95% percentile bootstrap interval of mean(a) - mean(b), each group resampled on its own."""
    return percentile_bootstrap((a, b), _mean_diff, n_resamples=n_resamples, rng=rng, confidence=confidence)

