"""Ranking stability across scales: Kendall's tau-b, order inversions, and the cross-task spread of means."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import pandas as pd
import scipy.stats





def kendall_stability(means: pd.DataFrame) -> pd.DataFrame:
    """Kendall's tau-b (``scipy.stats.kendalltau``) between the rankings of every pair of columns.

    ``means``: rows = groups (algorithms), columns = scales in order, values = mean score (NaN = absent).
    Each pair of scales uses the groups present at both. Returns rows scale_a, scale_b (scale_a before
    scale_b), n (groups compared), tau, p; tau and p are NaN with fewer than two groups.
    """
    rows = []
    cols = list(means.columns)
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            both = means[[cols[i], cols[j]]].dropna()
            tau = p = math.nan
            if len(both) >= 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = scipy.stats.kendalltau(both[cols[i]], both[cols[j]])
                tau, p = float(res.statistic), float(res.pvalue)
            rows.append({"scale_a": cols[i], "scale_b": cols[j], "n": len(both), "tau": tau, "p": p})
    return pd.DataFrame(rows, columns=["scale_a", "scale_b", "n", "tau", "p"])


def rank_inversions(means: pd.DataFrame, significant: Callable[[object, str, str], tuple[float, bool]] | None = None,
                    ) -> pd.DataFrame:
    """Pairs of groups whose order inverts between two scales (columns of ``means``).

    For every pair of columns (scale_a before scale_b) and every pair of groups (x, y) present at both, an
    inversion is sign(mean_x - mean_y) at scale_a == -sign(...) at scale_b (exact ties are not inversions).
    ``significant(scale, x, y)`` -> (p_adj, significant) looks up the test of the pair at one scale; the result
    has its p_adj and whether the inversion is significant at both ends.
    """
    rows = []
    cols = list(means.columns)
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            sa, sb = cols[i], cols[j]
            both = means[[sa, sb]].dropna()
            names = sorted(both.index, key=str)
            for u in range(len(names)):
                for v in range(u + 1, len(names)):
                    x, y = names[u], names[v]
                    da = both.at[x, sa] - both.at[y, sa]
                    db = both.at[x, sb] - both.at[y, sb]
                    if da == 0 or db == 0 or np.sign(da) == np.sign(db):
                        continue
                    row = {"scale_a": sa, "scale_b": sb, "x": x, "y": y, "diff_a": float(da), "diff_b": float(db)}
                    if significant is not None:
                        pa, siga = significant(sa, x, y)
                        pb, sigb = significant(sb, x, y)
                        row.update(p_adj_a=pa, p_adj_b=pb, significant_a=bool(siga), significant_b=bool(sigb),
                                   significant_both=bool(siga and sigb))
                    rows.append(row)
    columns = ["scale_a", "scale_b", "x", "y", "diff_a", "diff_b"]
    if significant is not None:
        columns += ["p_adj_a", "p_adj_b", "significant_a", "significant_b", "significant_both"]
    return pd.DataFrame(rows, columns=columns)


def spread(means: pd.Series) -> dict:
    """Max minus min of group means (the cross-algorithm spread of one task), with the groups at both ends."""
    m = means.dropna()
    if m.empty:
        return {"spread": math.nan, "best": None, "worst": None, "n": 0}
    return {"spread": float(m.max() - m.min()), "best": m.idxmax(), "worst": m.idxmin(), "n": int(m.size)}
