"""comparisons.csv: every pair of variants within a (scale, LoRA) cell, Welch + correction + d + bootstrap CI."""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.stats

from posttrain.stats.bootstrap import DEFAULT_RESAMPLES, bootstrap_ci, rng_for
from posttrain.stats.tests_two_groups import Welch, _arr, adjust_pvalues, cohen_d, sample_std, testable, welch

#: Columns of comparisons.csv, in order (the issue's contract).
COMPARISON_COLUMNS = (
    "metric", "scale", "lora", "a", "b", "n_a", "n_b", "mean_a", "mean_b", "std_a", "std_b", "diff",
    "t", "df", "p", "p_adj", "significant", "cohen_d", "ci_low", "ci_high",
)



def welch_many(pairs: Sequence[tuple[Iterable[float], Iterable[float]]]) -> list[Welch]:
    """:func:`welch` for many pairs at once: the same scipy call, vectorised over pairs of equal group sizes.

    Gives exactly what :func:`welch` gives pair by pair, in a handful of scipy calls instead of one per pair
    (a study of hundreds of pairs, or the simulations in the tests).
    """
    arrays = [(_arr(a), _arr(b)) for a, b in pairs]
    out = [Welch(math.nan, math.nan, math.nan)] * len(arrays)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (a, b) in enumerate(arrays):
        if testable(a, b):
            by_shape.setdefault((a.size, b.size), []).append(i)
    for index in by_shape.values():
        a = np.stack([arrays[i][0] for i in index])
        b = np.stack([arrays[i][1] for i in index])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = scipy.stats.ttest_ind(a, b, axis=1, equal_var=False)
        for j, i in enumerate(index):
            out[i] = Welch(float(res.statistic[j]), float(res.df[j]), float(res.pvalue[j]))
    return out


def compare_pair(a: Iterable[float], b: Iterable[float], *, n_resamples: int = DEFAULT_RESAMPLES,
                 rng: np.random.Generator | int = 0, test: Welch | None = None) -> dict:
    """Every per-pair quantity of comparisons.csv except the family-dependent p_adj and significant.

    ``test``: the pair's :func:`welch` result when already computed (see :func:`welch_many`).
    """
    a, b = _arr(a), _arr(b)
    w = test if test is not None else welch(a, b)
    mean_a = float(a.mean()) if a.size else math.nan
    mean_b = float(b.mean()) if b.size else math.nan
    low, high = bootstrap_ci(a, b, n_resamples=n_resamples, rng=rng)
    return {
        "n_a": int(a.size), "n_b": int(b.size), "mean_a": mean_a, "mean_b": mean_b,
        "std_a": sample_std(a), "std_b": sample_std(b), "diff": mean_a - mean_b,
        "t": w.t, "df": w.df, "p": w.p, "cohen_d": cohen_d(a, b), "ci_low": low, "ci_high": high,
    }


def compare_groups(
    df: pd.DataFrame,
    value: str,
    *,
    group: str = "variant",
    by: Sequence[str] = ("scale", "lora"),
    baseline: str | None = None,
    alpha: float = 0.05,
    correction: str = "bonferroni",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    metric: str | None = None,
) -> pd.DataFrame:
    """Pairwise comparisons of ``value`` between the ``group``s within each cell of ``by``.

    One row per compared pair, columns :data:`COMPARISON_COLUMNS` (``by`` must be ("scale", "lora") for those
    names; other ``by`` columns are kept under their own names). With ``baseline`` each other group is compared
    with it (a = the group, b = the baseline; cells without the baseline give no rows); without, every pair,
    a before b alphabetically. diff = mean_a - mean_b; t/df/p from Welch's test; p_adj and significant from
    :func:`adjust_pvalues` over the family = all testable comparisons of one cell; ci_low/ci_high the
    percentile bootstrap interval of diff (``n_resamples`` = 0 skips it), each pair with its own stream from
    :func:`rng_for` (``seed``, metric, cell, a, b). NaN values of ``value`` are ignored.
    """
    by = list(by)
    metric = value if metric is None else metric
    data = df[[group, *by, value]].dropna(subset=[value])
    families: list[list[tuple[dict, np.ndarray, np.ndarray]]] = []
    for cell, sub in data.groupby(by, sort=False, dropna=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        values = {str(g): s[value].to_numpy(dtype=float) for g, s in sub.groupby(group, sort=False)}
        names = sorted(values)
        if baseline is not None:
            if baseline not in values:
                continue
            pairs = [(name, baseline) for name in names if name != baseline]
        else:
            pairs = [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]
        families.append([({"metric": metric, **dict(zip(by, cell)), "a": a, "b": b, "_cell": cell},
                          values[a], values[b]) for a, b in pairs])
    tests = iter(welch_many([(x, y) for family in families for _, x, y in family]))
    rows: list[dict] = []
    for family in families:
        for row, x, y in family:
            cell = row.pop("_cell")
            row.update(compare_pair(x, y, n_resamples=n_resamples, test=next(tests),
                                    rng=rng_for(seed, metric, *cell, row["a"], row["b"])))
        p_adj, significant = adjust_pvalues([row["p"] for row, _, _ in family], correction, alpha)
        for (row, _, _), pa, sig in zip(family, p_adj, significant):
            row["p_adj"] = float(pa)
            row["significant"] = bool(sig)
            rows.append(row)
    columns = ["metric", *by, *[c for c in COMPARISON_COLUMNS if c not in ("metric", "scale", "lora")]]
    return pd.DataFrame(rows, columns=columns)


