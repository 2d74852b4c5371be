"""Statistics for comparing post-training runs: pure functions over numpy arrays and pandas frames.

Nothing here reads files or knows the result.json layout; :mod:`posttrain.report` loads runs into a
DataFrame (one row per run) and calls these. Test statistics come from scipy and statsmodels, never
hand-written formulas:

- Welch's unequal-variances t-test (Welch 1947, "The generalization of 'Student's' problem when several
  different population variances are involved", Biometrika 34) via ``scipy.stats.ttest_ind(equal_var=False)``.
- Family-wise correction (Bonferroni; Holm 1979, "A simple sequentially rejective multiple test procedure")
  via ``statsmodels.stats.multitest.multipletests``.
- Cohen's d with the pooled sample standard deviation (Cohen 1988, *Statistical Power Analysis*).
- Percentile bootstrap intervals (Efron & Tibshirani 1993), each group resampled on its own, with a numpy
  ``Generator`` seeded explicitly so reports are reproducible.
- Two-way ANOVA with interaction (statsmodels ``ols`` + ``anova_lm``) and partial eta squared.
- Kendall's tau-b between per-scale rankings (``scipy.stats.kendalltau``).
- Robust aggregates as rliable reports them (Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of
  the Statistical Precipice", NeurIPS): interquartile mean (``scipy.stats.trim_mean(x, 0.25)``) and the
  probability of improvement P(X > Y) (the normalised Mann-Whitney U, ``scipy.stats.mannwhitneyu``), both with
  percentile-bootstrap intervals.
"""

from __future__ import annotations

import gc
import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.stats
from statsmodels.stats.multitest import multipletests

#: Columns of comparisons.csv, in order (the issue's contract).
COMPARISON_COLUMNS = (
    "metric", "scale", "lora", "a", "b", "n_a", "n_b", "mean_a", "mean_b", "std_a", "std_b", "diff",
    "t", "df", "p", "p_adj", "significant", "cohen_d", "ci_low", "ci_high",
)
CORRECTIONS = ("bonferroni", "holm", "none")
DEFAULT_RESAMPLES = 10_000
CONFIDENCE = 0.95


# --------------------------------------------------------------------------------------------------- basics


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


# ------------------------------------------------------------------------------------------- comparisons


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


# ------------------------------------------------------------------------------------------------ factorial


def factorial_anova(df: pd.DataFrame, value: str, a: str = "scale", b: str = "lora", *, typ: int = 2) -> pd.DataFrame:
    """Two-way ANOVA with interaction, ``value ~ C(a) * C(b)`` (statsmodels ``ols`` + ``anova_lm``).

    Type II sums of squares by default (for a balanced design every type agrees). Returns one row per effect
    (``a``, ``b``, ``a:b``, ``Residual``) with sum_sq, df, F, p and partial eta squared
    (SS_effect / (SS_effect + SS_residual); Cohen 1973) and eta squared (SS_effect / SS_total).
    Raises ValueError when the design cannot be fitted (fewer than two levels of a factor, an empty cell, or
    no residual degrees of freedom).
    """
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    data = pd.DataFrame({"y": df[value].astype(float), "A": df[a].astype(str), "B": df[b].astype(str)}).dropna()
    if data["A"].nunique() < 2 or data["B"].nunique() < 2:
        raise ValueError(f"a factorial needs two or more levels of both {a} and {b}")
    cells = data.groupby(["A", "B"]).size()
    if len(cells) < data["A"].nunique() * data["B"].nunique():
        raise ValueError("a factorial needs every combination of levels")
    if len(data) <= len(cells):
        raise ValueError("a factorial needs replicates (no residual degrees of freedom)")
    model = ols("y ~ C(A) * C(B)", data=data).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = anova_lm(model, typ=typ)
    ss_res = float(table.loc["Residual", "sum_sq"])
    ss_total = float(((data["y"] - data["y"].mean()) ** 2).sum())
    names = {"C(A)": a, "C(B)": b, "C(A):C(B)": f"{a}:{b}", "Residual": "Residual"}
    out = pd.DataFrame({
        "effect": [names[i] for i in table.index],
        "sum_sq": table["sum_sq"].to_numpy(float),
        "df": table["df"].to_numpy(float),
        "F": table["F"].to_numpy(float),
        "p": table["PR(>F)"].to_numpy(float),
    })
    out["partial_eta_sq"] = [math.nan if e == "Residual" else s / (s + ss_res) if s + ss_res > 0 else math.nan
                             for e, s in zip(out["effect"], out["sum_sq"])]
    out["eta_sq"] = out["sum_sq"] / ss_total if ss_total > 0 else math.nan
    return out


# ---------------------------------------------------------------------------------------- ranking stability


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


# ----------------------------------------------------------------------------------------- robust (rliable)


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


# --------------------------------------------------------------------------------------- leverage, spread


def leverage(df: pd.DataFrame, value: str,
             factors: Sequence[str] = ("scale", "variant", "lora", "seed")) -> pd.DataFrame:
    """How much of the variance of ``value`` each factor explains: a main-effects ANOVA.

    Fits ``value ~ C(f1) + C(f2) + ...`` over the factors with two or more levels (statsmodels ``ols`` +
    ``anova_lm``, Type II sums of squares, so the order of factors does not matter) and returns per factor:
    levels, sum_sq, df, F, p, share = SS_factor / SS_total (eta squared; for a balanced design the shares and the
    residual's sum to 1, for an unbalanced one they need not), partial eta squared, and range = max - min of
    the factor's marginal level means (in the metric's units). A row "Residual" closes the table. A factor
    aliased with the others (e.g. a variant run at one scale only) gets only the variance it explains beyond them.
    Raises ValueError when no factor varies or no residual degrees of freedom remain.
    """
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    data = pd.DataFrame({"y": df[value].astype(float)})
    for f in factors:
        data[f"f{len(data.columns) - 1}"] = df[f].astype(str)
    data = data.dropna()
    names = {f"f{i}": f for i, f in enumerate(factors)}
    used = [c for c in data.columns if c != "y" and data[c].nunique() >= 2]
    if not used:
        raise ValueError("no factor has two or more levels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # aliased factors (e.g. a variant run at one scale only) warn
        model = ols("y ~ " + " + ".join(f"C({c})" for c in used), data=data).fit()
        if model.df_resid <= 0:
            raise ValueError("no residual degrees of freedom (one run per combination of factors)")
        table = anova_lm(model, typ=2)
    ss_total = float(((data["y"] - data["y"].mean()) ** 2).sum())
    ss_res = float(table.loc["Residual", "sum_sq"])
    rows = []
    for c in used:
        s = float(table.loc[f"C({c})", "sum_sq"])
        level_means = data.groupby(c)["y"].mean()
        rows.append({
            "factor": names[c], "levels": int(data[c].nunique()), "sum_sq": s,
            "df": float(table.loc[f"C({c})", "df"]), "F": float(table.loc[f"C({c})", "F"]),
            "p": float(table.loc[f"C({c})", "PR(>F)"]),
            "share": s / ss_total if ss_total > 0 else math.nan,
            "partial_eta_sq": s / (s + ss_res) if s + ss_res > 0 else math.nan,
            "range": float(level_means.max() - level_means.min()),
        })
    rows.append({"factor": "Residual", "levels": math.nan, "sum_sq": ss_res, "df": float(model.df_resid),
                 "F": math.nan, "p": math.nan, "share": ss_res / ss_total if ss_total > 0 else math.nan,
                 "partial_eta_sq": math.nan, "range": math.nan})
    return pd.DataFrame(rows)


def spread(means: pd.Series) -> dict:
    """Max minus min of group means (the cross-algorithm spread of one task), with the groups at both ends."""
    m = means.dropna()
    if m.empty:
        return {"spread": math.nan, "best": None, "worst": None, "n": 0}
    return {"spread": float(m.max() - m.min()), "best": m.idxmax(), "worst": m.idxmin(), "n": int(m.size)}
