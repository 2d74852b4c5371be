"""Power analysis of a two-group comparison (statsmodels ``TTestIndPower``): is a null result a real null?

For a pair of groups with n_a and n_b seeds, at the family's significance level and a chosen power (0.8):

- the minimum detectable effect (MDE): the smallest standardised difference d (Cohen 1988) a two-sided
  two-sample t-test detects with that power, ``TTestIndPower().solve_power(nobs1=n_a, ratio=n_b/n_a, ...)``;
  times the pair's pooled sd it is in the metric's units;
- the seeds per group needed to detect a chosen effect (in the metric's units, turned into d with the same
  pooled sd), ``solve_power(effect_size=d, ...)`` rounded up.

A non-significant pair whose MDE is at most the chosen effect is a real null (the study could have seen that
effect and did not); one whose MDE is larger is underpowered. The pooled t-test is the standard planning
approximation of Welch's test (equal in the balanced case the study runs). docs/design.md, "Report".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.stats

import statsmodels.tools.sm_exceptions  # noqa: F401 - imported first: its import-time simplefilter("always",
# ConvergenceWarning) would otherwise land inside _solve's catch_warnings and override its "ignore"
from statsmodels.stats.power import TTestIndPower

DEFAULT_POWER = 0.8
#: Default --effect: 0.02 of an accuracy metric (2 points), the size of difference the study's question is about.
DEFAULT_EFFECT = 0.02
#: Seeds per group past which "seeds needed" is shown as "> MAX_SEEDS".
MAX_SEEDS = 10_000


@dataclass(frozen=True)
class Power:
    """The power analysis of one comparison. NaN/None where undefined (n < 2 in a group, zero pooled sd)."""

    mde_d: float        # minimum detectable Cohen's d at (n_a, n_b)
    mde: float          # the same in the metric's units (mde_d * pooled sd); NaN when sd is NaN
    sd: float           # pooled sample sd of the two groups
    seeds_needed: int | None  # seeds per group to detect ``effect`` (None when undefined, MAX_SEEDS + 1 past it)
    effect: float
    verdict: str        # "detected" | "real null" | "underpowered" | "no variance" | "too few seeds"


def pooled_sd(n_a: int, sd_a: float, n_b: int, sd_b: float) -> float:
    """sqrt(((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a+n_b-2)), as in Cohen's d; NaN for n_a + n_b < 3."""
    if n_a + n_b < 3:
        return math.nan
    ss = (n_a - 1) * (sd_a ** 2 if n_a > 1 else 0.0) + (n_b - 1) * (sd_b ** 2 if n_b > 1 else 0.0)
    return math.sqrt(ss / (n_a + n_b - 2))


def _solve(**kwargs) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels warns and returns NaN when its root finder gives up
        return float(TTestIndPower().solve_power(alternative="two-sided", **kwargs))


def _power(d: float, n_a, ratio: float, alpha: float):
    """statsmodels' power of the two-sided two-sample t-test; where it is NaN (scipy's noncentral t lower tail
    underflows at a large noncentrality with few degrees of freedom) the upper tail alone, which is then the
    whole power to 1e-15: ``scipy.stats.nct.sf(t_crit, df, d * sqrt(n_a n_b / (n_a + n_b)))``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = np.asarray(TTestIndPower().power(effect_size=d, nobs1=n_a, ratio=ratio, alpha=alpha,
                                             alternative="two-sided"), dtype=float)
        if np.isnan(p).any():
            n_a = np.asarray(n_a, dtype=float)
            n_b = n_a * ratio
            df = n_a + n_b - 2
            upper = scipy.stats.nct.sf(scipy.stats.t.isf(alpha / 2, df), df, d * np.sqrt(n_a * n_b / (n_a + n_b)))
            p = np.where(np.isnan(p), upper, p)
    return p if p.ndim else float(p)


def minimum_detectable_d(n_a: int, n_b: int, *, alpha: float = 0.05, power: float = DEFAULT_POWER) -> float:
    """Smallest Cohen's d a two-sided two-sample t-test at ``alpha`` detects with ``power`` (NaN for n < 2).

    ``TTestIndPower().solve_power``; where its root finder gives up or stops short (very few seeds at a small
    alpha: measured, n = 2 at alpha 0.05/6 returned a d of power 0.79), the same power function solved with
    ``scipy.optimize.brentq``.
    """
    if n_a < 2 or n_b < 2:
        return math.nan
    def gap(x):
        return float(_power(x, n_a, n_b / n_a, alpha)) - power

    d = _solve(effect_size=None, nobs1=n_a, ratio=n_b / n_a, alpha=alpha, power=power)
    if math.isfinite(d) and abs(gap(d)) < 1e-6:
        return d
    try:
        return float(scipy.optimize.brentq(gap, 1e-6, 40.0, xtol=1e-12))
    except ValueError:  # not reached below d = 40: nothing a study would call detectable
        return math.inf


def seeds_needed(d: float, *, alpha: float = 0.05, power: float = DEFAULT_POWER) -> int | None:
    """Seeds per group (equal groups) to detect Cohen's d with ``power`` at ``alpha``: ceil of statsmodels' n
    (at least 2; ``MAX_SEEDS + 1`` past MAX_SEEDS). Where the solver gives up, the smallest n in 2..MAX_SEEDS whose
    power reaches ``power``."""
    if not math.isfinite(d) or d == 0:
        return None
    small = np.arange(2, 101)  # the solver's root search fails near n = 2; power is monotone in n, so scan first
    reached = np.nonzero(_power(abs(d), small, 1.0, alpha) >= power)[0]
    if reached.size:
        return int(small[reached[0]])
    n = _solve(effect_size=abs(d), nobs1=None, ratio=1.0, alpha=alpha, power=power)
    if math.isfinite(n):
        return max(2, math.ceil(n)) if n <= MAX_SEEDS else MAX_SEEDS + 1
    grid = np.arange(2, MAX_SEEDS + 1)
    reached = np.nonzero(_power(abs(d), grid, 1.0, alpha) >= power)[0]
    return int(grid[reached[0]]) if reached.size else MAX_SEEDS + 1


def analyse(n_a: int, sd_a: float, n_b: int, sd_b: float, *, significant: bool, effect: float = DEFAULT_EFFECT,
            alpha: float = 0.05, power: float = DEFAULT_POWER) -> Power:
    """The :class:`Power` of one comparison; ``alpha`` is the level each test of its family is held to."""
    sd = pooled_sd(n_a, sd_a, n_b, sd_b)
    mde_d = minimum_detectable_d(n_a, n_b, alpha=alpha, power=power)
    if n_a < 2 or n_b < 2 or not math.isfinite(sd):
        return Power(mde_d, math.nan, sd, None, effect, "too few seeds")
    if sd == 0:
        return Power(mde_d, math.nan, sd, None, effect, "no variance")
    mde = mde_d * sd
    verdict = "detected" if significant else ("real null" if mde <= abs(effect) else "underpowered")
    return Power(mde_d, mde, sd, seeds_needed(effect / sd, alpha=alpha, power=power), effect, verdict)


def family_alpha(alpha: float, correction: str, family_size: int) -> float:
    """The level one test of a family is held to: alpha/m for Bonferroni and Holm (its first step), else alpha."""
    if correction in ("bonferroni", "holm") and family_size > 1:
        return alpha / family_size
    return alpha
