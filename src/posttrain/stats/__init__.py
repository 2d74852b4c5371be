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
- Power analysis (statsmodels ``TTestIndPower``): the minimum detectable effect at the run's seeds and the seeds
  needed for a chosen effect (:mod:`posttrain.stats.power`).

Modules: tests_two_groups (Welch, Cohen's d, corrections), bootstrap, comparisons (comparisons.csv), anova
(factorial, leverage), ranking (Kendall, inversions, spread), robust (rliable), power. This package re-exports
them all, so ``from posttrain import stats; stats.welch(...)`` works as before.
"""

from __future__ import annotations

from posttrain.stats.anova import NO_VARIANCE, factorial_anova, leverage, no_variance
from posttrain.stats.bootstrap import (CONFIDENCE, DEFAULT_RESAMPLES, _mean_diff, bootstrap_ci, percentile_bootstrap,
                                       rng_for)
from posttrain.stats.comparisons import COMPARISON_COLUMNS, compare_groups, compare_pair, welch_many
from posttrain.stats.power import (DEFAULT_EFFECT, DEFAULT_POWER, Power, analyse, family_alpha, minimum_detectable_d,
                                   pooled_sd, seeds_needed)
from posttrain.stats.ranking import kendall_stability, rank_inversions, spread
from posttrain.stats.robust import iqm, iqm_ci, probability_of_improvement, probability_of_improvement_ci
from posttrain.stats.tests_two_groups import (CORRECTIONS, Welch, _arr, adjust_pvalues, cohen_d, sample_std, testable,
                                              welch)

__all__ = ["COMPARISON_COLUMNS", "CONFIDENCE", "CORRECTIONS", "DEFAULT_EFFECT", "DEFAULT_POWER", "DEFAULT_RESAMPLES",
           "NO_VARIANCE", "no_variance", "Power", "Welch", "adjust_pvalues", "analyse", "bootstrap_ci", "cohen_d",
           "compare_groups", "compare_pair", "factorial_anova", "family_alpha", "iqm", "iqm_ci", "kendall_stability",
           "leverage", "minimum_detectable_d", "percentile_bootstrap", "pooled_sd", "probability_of_improvement",
           "probability_of_improvement_ci", "rank_inversions", "rng_for", "sample_std", "seeds_needed", "spread",
           "testable", "welch", "welch_many", "_arr", "_mean_diff"]
