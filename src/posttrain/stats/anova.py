"""ANOVA over runs: the scale x LoRA factorial and the leverage (variance share) of each factor (statsmodels)."""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

#: The reason an ANOVA is not run on constant data: F, p and eta^2 of rounding noise mean nothing (issue 13).
NO_VARIANCE = "no variance: every run scored the same, so there is no F test and no share of variance"


def no_variance(y) -> bool:
    """Whether the values are all equal (up to float rounding: a spread of at most 1e-12 of their magnitude)."""
    a = np.asarray(y, dtype=float)
    a = a[np.isfinite(a)]
    return a.size == 0 or float(np.ptp(a)) <= 1e-12 * max(1.0, float(np.abs(a).max()))


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
    if no_variance(data["y"]):
        raise ValueError(NO_VARIANCE)
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
    if no_variance(data["y"]):
        raise ValueError(NO_VARIANCE)
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


