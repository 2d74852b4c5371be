"""posttrain.stats: every statistic against scipy/statsmodels (or a textbook formula) computed here on fixed data,
and the error rates of the comparison procedure on simulated studies."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests

from posttrain import stats

A = np.array([0.31, 0.35, 0.29, 0.33, 0.36])
B = np.array([0.40, 0.38, 0.45, 0.41])


# ------------------------------------------------------------------------------------------------ Welch


def test_welch_matches_scipy_and_the_welch_satterthwaite_formula():
    w = stats.welch(A, B)
    ref = scipy.stats.ttest_ind(A, B, equal_var=False)
    assert w.t == pytest.approx(ref.statistic) and w.p == pytest.approx(ref.pvalue) and w.df == pytest.approx(ref.df)
    va, vb = A.var(ddof=1) / A.size, B.var(ddof=1) / B.size
    assert w.t == pytest.approx((A.mean() - B.mean()) / math.sqrt(va + vb))
    assert w.df == pytest.approx((va + vb) ** 2 / (va ** 2 / (A.size - 1) + vb ** 2 / (B.size - 1)))
    assert w.p == pytest.approx(2 * scipy.stats.t.sf(abs(w.t), w.df))


def test_welch_many_equals_welch_pair_by_pair():
    rng = np.random.default_rng(0)
    pairs = [(rng.normal(size=n), rng.normal(size=m)) for n, m in ((3, 3), (3, 3), (5, 4), (1, 3), (2, 6))]
    pairs.append(([0.5, 0.5], [0.7, 0.7]))
    for got, (a, b) in zip(stats.welch_many(pairs), pairs):
        want = stats.welch(a, b)
        assert (math.isnan(got.p) and math.isnan(want.p)) or (got.t, got.df, got.p) == pytest.approx(
            (want.t, want.df, want.p))


@pytest.mark.filterwarnings("ignore:Precision loss")
def test_welch_untestable_cases():
    assert not stats.testable([0.5], B)  # n = 1
    assert not stats.testable([0.5, 0.5], [0.6, 0.6, 0.6])  # zero variance in both
    assert stats.testable([0.5, 0.5, 0.5], B)  # zero variance in one group: defined
    for a, b in (([0.5], B), ([0.5, 0.5], [0.6, 0.6])):
        w = stats.welch(a, b)
        assert math.isnan(w.t) and math.isnan(w.df) and math.isnan(w.p)
    w = stats.welch([0.5, 0.5, 0.5], B)
    ref = scipy.stats.ttest_ind([0.5, 0.5, 0.5], B, equal_var=False)
    assert w.p == pytest.approx(ref.pvalue) and w.df == pytest.approx(B.size - 1)
    assert stats.welch([0.1, 0.2, np.nan], [0.3, 0.4]).p == pytest.approx(
        scipy.stats.ttest_ind([0.1, 0.2], [0.3, 0.4], equal_var=False).pvalue)  # NaNs ignored


# ------------------------------------------------------------------------------------------------ Cohen's d


def test_cohen_d_pooled_sd():
    d = stats.cohen_d(A, B)
    pooled = math.sqrt(((A.size - 1) * A.var(ddof=1) + (B.size - 1) * B.var(ddof=1)) / (A.size + B.size - 2))
    assert d == pytest.approx((A.mean() - B.mean()) / pooled)
    # independent route: Student's pooled t = d / sqrt(1/n_a + 1/n_b)
    student = scipy.stats.ttest_ind(A, B, equal_var=True).statistic
    assert d == pytest.approx(student * math.sqrt(1 / A.size + 1 / B.size))
    assert stats.cohen_d([1.0, 3.0], [0.0, 2.0]) == pytest.approx(1 / math.sqrt(2))  # pooled sd sqrt(2)
    assert math.isnan(stats.cohen_d([0.5, 0.5], [0.6, 0.6]))  # pooled sd 0
    assert math.isnan(stats.cohen_d([0.5], [0.6]))


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    low, high = stats.bootstrap_ci(A, B, n_resamples=20_000, rng=1)
    ref = scipy.stats.bootstrap((A, B), lambda x, y, axis: x.mean(axis) - y.mean(axis), n_resamples=20_000,
                                method="percentile", vectorized=True, rng=np.random.default_rng(2))
    # two Monte Carlo estimates of the same percentiles: the 2.5%/97.5% quantiles of a 20k-sample bootstrap
    # distribution wobble by ~0.1 sd of it (sd ~0.013 here), so 0.004 is a generous but meaningful tolerance
    assert low == pytest.approx(ref.confidence_interval.low, abs=0.004)
    assert high == pytest.approx(ref.confidence_interval.high, abs=0.004)
    assert low < A.mean() - B.mean() < high


def test_bootstrap_ci_reproducible_and_degenerate_cases():
    assert stats.bootstrap_ci(A, B, rng=0) == stats.bootstrap_ci(A, B, rng=0)
    assert stats.bootstrap_ci(A, B, rng=0) != stats.bootstrap_ci(A, B, rng=1)
    assert stats.rng_for(0, "m", "1.5b", "dpo").random() == stats.rng_for(0, "m", "1.5b", "dpo").random()
    assert all(math.isnan(v) for v in stats.bootstrap_ci([0.5], B))
    assert all(math.isnan(v) for v in stats.bootstrap_ci(A, B, n_resamples=0))
    assert stats.bootstrap_ci([0.5, 0.5], [0.2, 0.2]) == (pytest.approx(0.3), pytest.approx(0.3))


# ------------------------------------------------------------------------------------------------ corrections


def test_adjust_pvalues_against_statsmodels_and_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.20])
    for method in ("bonferroni", "holm"):
        adj, sig = stats.adjust_pvalues(p, method, alpha=0.05)
        reject, ref, _, _ = multipletests(p, alpha=0.05, method=method)
        assert np.allclose(adj, ref) and (sig == reject).all()
    adj, _ = stats.adjust_pvalues(p, "bonferroni")
    assert np.allclose(adj, np.minimum(1, p * 4))
    adj, _ = stats.adjust_pvalues(p, "holm")  # step-down: sorted p * (m, m-1, ...), running max
    assert np.allclose(adj, [0.04, 0.09, 0.09, 0.20])
    adj, sig = stats.adjust_pvalues(p, "none")
    assert np.allclose(adj, p) and sig.tolist() == [True, True, True, False]
    # untestable pairs (NaN) are not in the family
    adj, sig = stats.adjust_pvalues([0.02, np.nan, 0.01], "bonferroni")
    assert adj[0] == pytest.approx(0.04) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)
    assert sig.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="bonferroni"):
        stats.adjust_pvalues(p, "fdr")


# ------------------------------------------------------------------------------------------------ compare_groups


def _frame(groups: dict[tuple[str, str, str], list[float]]) -> pd.DataFrame:
    rows = [{"variant": v, "scale": s, "lora": lo, "seed": i, "y": x}
            for (v, s, lo), xs in groups.items() for i, x in enumerate(xs)]
    return pd.DataFrame(rows)


def test_compare_groups_pairs_families_and_columns():
    df = _frame({("sft", "1.5b", "off"): list(A), ("dpo", "1.5b", "off"): list(B), ("kto", "1.5b", "off"): [0.3],
                 ("ipo", "1.5b", "off"): [0.33, 0.34, 0.35], ("dpo", "7b", "off"): [0.5, 0.52],
                 ("sft", "7b", "off"): [0.6, 0.61, 0.63]})
    out = stats.compare_groups(df, "y", metric="m", n_resamples=1000)
    assert list(out.columns) == list(stats.COMPARISON_COLUMNS)
    small = out[out["scale"] == "1.5b"]
    assert list(zip(small["a"], small["b"])) == [("dpo", "ipo"), ("dpo", "kto"), ("dpo", "sft"), ("ipo", "kto"),
                                                 ("ipo", "sft"), ("kto", "sft")]
    row = small[(small["a"] == "dpo") & (small["b"] == "sft")].iloc[0]
    ref = scipy.stats.ttest_ind(B, A, equal_var=False)
    assert row["p"] == pytest.approx(ref.pvalue) and row["t"] == pytest.approx(ref.statistic)
    assert row["diff"] == pytest.approx(B.mean() - A.mean()) and row["std_a"] == pytest.approx(B.std(ddof=1))
    assert row["cohen_d"] == pytest.approx(stats.cohen_d(B, A))
    # family = the testable pairs of one (metric, scale, lora): 3 at 1.5b (kto has n = 1), 1 at 7b
    assert row["p_adj"] == pytest.approx(min(1, 3 * ref.pvalue))
    assert small[small["a"].eq("kto") | small["b"].eq("kto")]["p"].isna().all()
    big = out[out["scale"] == "7b"].iloc[0]
    assert big["p_adj"] == pytest.approx(big["p"])
    # baseline: a = the other variant, b = the baseline, diff = mean_a - mean_b
    base = stats.compare_groups(df, "y", baseline="sft", n_resamples=0)
    assert set(zip(base["a"], base["b"])) == {("dpo", "sft"), ("ipo", "sft"), ("kto", "sft")} | {("dpo", "sft")}
    assert np.allclose(base["diff"], base["mean_a"] - base["mean_b"])
    assert base["ci_low"].isna().all()
    assert stats.compare_groups(df, "y", baseline="ipo", n_resamples=0)["scale"].eq("1.5b").all()


# ------------------------------------------------------------------------------------------------ ANOVA


def _factorial_data() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for scale, base in (("3b", 0.6), ("7b", 0.8)):
        for lora, shift in (("off", 0.0), ("on", -0.05)):
            for seed in range(4):
                inter = -0.04 if (scale, lora) == ("7b", "on") else 0.0
                rows.append({"scale": scale, "lora": lora, "seed": seed,
                             "y": base + shift + inter + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


def test_factorial_anova_against_statsmodels_and_hand_sums_of_squares():
    df = _factorial_data()
    out = stats.factorial_anova(df, "y", "scale", "lora").set_index("effect")
    ref = anova_lm(smf.ols("y ~ C(scale) * C(lora)", data=df).fit(), typ=2)
    assert out.loc["scale", "F"] == pytest.approx(ref.loc["C(scale)", "F"])
    assert out.loc["scale:lora", "p"] == pytest.approx(ref.loc["C(scale):C(lora)", "PR(>F)"])
    # balanced 2x2 with n = 4 per cell: textbook sums of squares
    g = df["y"].mean()
    ss_a = 8 * sum((df[df.scale == s]["y"].mean() - g) ** 2 for s in ("3b", "7b"))
    cell = df.groupby(["scale", "lora"])["y"].transform("mean")
    ss_res = ((df["y"] - cell) ** 2).sum()
    ss_cells = 4 * sum((m - g) ** 2 for m in df.groupby(["scale", "lora"])["y"].mean())
    ss_b = 8 * sum((df[df.lora == lo]["y"].mean() - g) ** 2 for lo in ("off", "on"))
    assert out.loc["scale", "sum_sq"] == pytest.approx(ss_a)
    assert out.loc["Residual", "sum_sq"] == pytest.approx(ss_res)
    assert out.loc["scale:lora", "sum_sq"] == pytest.approx(ss_cells - ss_a - ss_b)
    assert out.loc["lora", "partial_eta_sq"] == pytest.approx(ss_b / (ss_b + ss_res))
    assert out.loc["scale", "eta_sq"] == pytest.approx(ss_a / ((df["y"] - g) ** 2).sum())
    assert out.loc["scale:lora", "p"] < 0.01  # the planted interaction is found
    with pytest.raises(ValueError, match="every combination"):
        stats.factorial_anova(df[~((df.scale == "7b") & (df.lora == "on"))], "y")
    with pytest.raises(ValueError, match="replicates"):
        stats.factorial_anova(df[df.seed == 0], "y")


def test_leverage_against_statsmodels_and_shares():
    # a balanced, orthogonal 2 (scale) x 2 (variant) x 2 (LoRA) design with 2 seeds per cell
    df = _factorial_data().assign(variant=lambda d: np.where(d["seed"] < 2, "dpo", "sft"))
    df.loc[df["variant"] == "sft", "y"] += 0.01
    out = stats.leverage(df, "y", ("scale", "variant", "lora")).set_index("factor")
    ref = anova_lm(smf.ols("y ~ C(scale) + C(variant) + C(lora)", data=df).fit(), typ=2)
    total = ((df["y"] - df["y"].mean()) ** 2).sum()
    for factor in ("scale", "variant", "lora"):
        assert out.loc[factor, "share"] == pytest.approx(ref.loc[f"C({factor})", "sum_sq"] / total)
        assert out.loc[factor, "F"] == pytest.approx(ref.loc[f"C({factor})", "F"])
        assert out.loc[factor, "p"] == pytest.approx(ref.loc[f"C({factor})", "PR(>F)"])
        means = df.groupby(factor)["y"].mean()
        assert out.loc[factor, "range"] == pytest.approx(means.max() - means.min())
    assert out["share"].sum() == pytest.approx(1.0)  # orthogonal design: shares + residual's = 1
    assert out.drop(index="Residual")["share"].idxmax() == "scale"
    assert out.loc["scale", "partial_eta_sq"] == pytest.approx(
        ref.loc["C(scale)", "sum_sq"] / (ref.loc["C(scale)", "sum_sq"] + ref.loc["Residual", "sum_sq"]))
    # a factor with one level is left out; no factor varying is an error
    assert "seed" not in set(stats.leverage(df.assign(seed=0), "y", ("scale", "seed"))["factor"])
    with pytest.raises(ValueError, match="two or more levels"):
        stats.leverage(df.assign(k=1), "y", ("k",))


# ------------------------------------------------------------------------------------------------ rankings


def test_kendall_stability_and_inversions():
    means = pd.DataFrame({"0.5b": [0.30, 0.40, 0.35, 0.20], "7b": [0.80, 0.70, 0.75, np.nan]},
                         index=["simpo", "sgrpo", "dpo", "kto"])
    out = stats.kendall_stability(means).iloc[0]
    ref = scipy.stats.kendalltau([0.30, 0.40, 0.35], [0.80, 0.70, 0.75])
    assert out["n"] == 3 and out["tau"] == pytest.approx(ref.statistic) and out["p"] == pytest.approx(ref.pvalue)
    assert out["tau"] == pytest.approx(-1.0)
    lookup = {("0.5b", "sgrpo", "simpo"): (0.001, True), ("7b", "sgrpo", "simpo"): (0.2, False)}
    inv = stats.rank_inversions(means, lambda s, x, y: lookup.get((s, x, y), (0.01, True)))
    assert sorted(zip(inv["x"], inv["y"])) == [("dpo", "sgrpo"), ("dpo", "simpo"), ("sgrpo", "simpo")]
    row = inv[(inv["x"] == "sgrpo") & (inv["y"] == "simpo")].iloc[0]
    assert row["diff_a"] == pytest.approx(0.10) and row["diff_b"] == pytest.approx(-0.10)
    assert row["significant_a"] and not row["significant_b"] and not row["significant_both"]
    assert inv[inv["x"] == "dpo"]["significant_both"].all()
    assert math.isnan(stats.kendall_stability(means.iloc[:1])["tau"].iloc[0])


# ------------------------------------------------------------------------------------------------ rliable


def test_iqm_and_probability_of_improvement():
    x = np.arange(1.0, 9.0)
    assert stats.iqm(x) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert stats.iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25))
    lo, hi = stats.iqm_ci(x, n_resamples=5000, rng=0)
    assert lo < 4.5 < hi
    poi = stats.probability_of_improvement(A, B)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in A for b in B])
    assert poi == pytest.approx(brute)
    assert poi == pytest.approx(scipy.stats.mannwhitneyu(A, B).statistic / (A.size * B.size))
    assert stats.probability_of_improvement([1, 2], [2, 3]) == pytest.approx((0 + 0 + 0.5 + 0) / 4)
    lo, hi = stats.probability_of_improvement_ci([1, 2, 3, 4], [2, 3, 4, 5], n_resamples=4000, rng=0)
    assert 0 <= lo < stats.probability_of_improvement([1, 2, 3, 4], [2, 3, 4, 5]) < hi <= 1
    assert stats.spread(pd.Series({"a": 0.2, "b": 0.5, "c": np.nan})) == {"spread": pytest.approx(0.3), "best": "b",
                                                                         "worst": "a", "n": 2}


# ------------------------------------------------------------------------------------------------ error rates


def _null_studies(n_studies: int, k: int, n: int, seed: int, effect: float = 0.0) -> pd.DataFrame:
    """n_studies independent studies of k variants x n seeds; variant v0 shifted by ``effect`` (0 = the null).

    Each study is one "scale" value, so one compare_groups call corrects each study as its own family."""
    rng = np.random.default_rng(seed)
    y = rng.normal(0.5, 0.02, size=(n_studies, k, n))
    y[:, 0, :] += effect
    study, variant, s = np.meshgrid(np.arange(n_studies), np.arange(k), np.arange(n), indexing="ij")
    return pd.DataFrame({"variant": [f"v{v}" for v in variant.ravel()], "scale": study.ravel().astype(str),
                         "lora": "off", "seed": s.ravel(), "y": y.ravel()})


def test_false_positive_rates_under_the_null():
    """All groups from one distribution: per-comparison rate ~ alpha uncorrected, family-wise <= alpha with
    Bonferroni.

    S = 2000 studies x 6 pairs (4 variants, 5 seeds each), alpha = 0.05. Bounds:
    - Uncorrected per-comparison rate: its mean over 12000 tests has variance at most p(1-p)/S even if the 6
      tests of a study were perfectly correlated (they share groups, so they are positively correlated), i.e.
      sd <= sqrt(0.05 * 0.95 / 2000) = 0.0049; we accept 0.05 +- 0.02 (> 4 sd). Welch's test is very close to
      exact for normal data, so its true size is within a few thousandths of 0.05.
    - Bonferroni family-wise rate: at most alpha in theory (Boole's inequality); the fraction of 2000 independent
      studies with any rejection has sd <= 0.0049, so we accept <= 0.05 + 3 sd = 0.065. It must also stay
      clearly above 0 (Bonferroni with 6 positively correlated tests has FWER ~0.03-0.05), and the uncorrected
      family-wise rate must be well above alpha (1 - 0.95^6 = 0.26 for independent tests; ~0.2 correlated),
      which is what the correction is for.
    The data are fixed by the seed, so the test is deterministic; the bounds hold for any seed.
    """
    alpha, n_studies = 0.05, 2000
    df = _null_studies(n_studies, k=4, n=5, seed=12345)
    out = stats.compare_groups(df, "y", alpha=alpha, correction="bonferroni", n_resamples=0)
    assert len(out) == 6 * n_studies and out["p"].notna().all()
    per_comparison = (out["p"] <= alpha).mean()
    assert abs(per_comparison - alpha) <= 0.02, per_comparison
    fwer_bonferroni = out.groupby("scale")["significant"].any().mean()
    assert 0.01 <= fwer_bonferroni <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_studies), fwer_bonferroni
    fwer_uncorrected = (out["p"] <= alpha).groupby(out["scale"]).any().mean()
    assert fwer_uncorrected >= 0.12, fwer_uncorrected


def test_power_for_a_large_planted_effect():
    """v0 better by 3 sd with 5 seeds (d = 3): Welch + Bonferroni over 6 pairs detects it in nearly every study
    (power ~0.9 for each of the 3 pairs involving v0; we ask >= 0.8 over 300 studies, sd ~0.02)."""
    df = _null_studies(300, k=4, n=5, seed=7, effect=0.06)
    out = stats.compare_groups(df, "y", correction="bonferroni", n_resamples=0)
    involved = out[out["a"] == "v0"]
    assert (involved["significant"]).mean() >= 0.8
    assert (involved["diff"] > 0).all()
    others = out[out["a"] != "v0"]
    assert others["significant"].mean() <= 0.05


# ------------------------------------------------------------------------------------------------ power


def test_minimum_detectable_effect_and_seeds_needed_match_statsmodels():
    from statsmodels.stats.power import TTestIndPower

    solver = TTestIndPower()
    for n_a, n_b, alpha in ((5, 5, 0.05), (3, 5, 0.05 / 3), (10, 10, 0.01)):
        expected = solver.solve_power(effect_size=None, nobs1=n_a, ratio=n_b / n_a, alpha=alpha, power=0.8)
        assert stats.minimum_detectable_d(n_a, n_b, alpha=alpha) == pytest.approx(expected, rel=1e-9)
    for d in (1.0, 0.5, 0.2):
        n = solver.solve_power(effect_size=d, nobs1=None, ratio=1.0, alpha=0.05, power=0.8)
        assert stats.seeds_needed(d) == math.ceil(n)  # 17, 64, 394
    assert [stats.seeds_needed(d) for d in (1.0, 0.5, 0.2)] == [17, 64, 394]
    # where statsmodels' solver stops short (n = 2 at alpha 0.05/6 returned a d of power 0.79), the same power
    # solved with brentq: the noncentral t's upper tail (the lower one is < 1e-15 there) is exactly 0.8
    d = stats.minimum_detectable_d(2, 2, alpha=0.05 / 6)
    t_crit = scipy.stats.t.isf(0.05 / 12, 2)
    assert scipy.stats.nct.sf(t_crit, 2, d * math.sqrt(2 * 2 / 4)) == pytest.approx(0.8, abs=1e-6)
    assert stats.seeds_needed(20.0) == 2 and stats.seeds_needed(0.0) is None
    assert math.isnan(stats.minimum_detectable_d(1, 5))


def test_power_verdicts_and_the_family_level():
    # pooled sd of (n=4, s=0.01) and (n=4, s=0.03): sqrt((3*1e-4 + 3*9e-4) / 6) = sqrt(5e-4)
    assert stats.pooled_sd(4, 0.01, 4, 0.03) == pytest.approx(math.sqrt(5e-4))
    precise = stats.analyse(5, 0.001, 5, 0.001, significant=False, effect=0.02)
    assert precise.verdict == "real null" and precise.mde == pytest.approx(precise.mde_d * 0.001)
    noisy = stats.analyse(5, 0.05, 5, 0.05, significant=False, effect=0.02)
    assert noisy.verdict == "underpowered" and noisy.seeds_needed == stats.seeds_needed(0.02 / 0.05)
    assert stats.analyse(5, 0.05, 5, 0.05, significant=True).verdict == "detected"
    assert stats.analyse(3, 0.0, 3, 0.0, significant=False).verdict == "no variance"
    assert stats.analyse(1, math.nan, 3, 0.1, significant=False).verdict == "too few seeds"
    assert stats.family_alpha(0.05, "bonferroni", 4) == stats.family_alpha(0.05, "holm", 4) == 0.0125
    assert stats.family_alpha(0.05, "none", 4) == 0.05


def test_anova_refuses_constant_data_instead_of_testing_rounding_noise():
    """Issue 13: all scores at 0.46 gave F 0.20, p 0.83 and partial eta^2 0.168 from SS 0.000000."""
    df = pd.DataFrame({"scale": ["a", "a", "b", "b"] * 3, "lora": ["off", "on"] * 6,
                       "variant": ["x"] * 6 + ["y"] * 6, "seed": [0, 1] * 6, "m": [0.46] * 12})
    df["m"] = df["m"] * 1.0000000000000002 ** np.arange(12)  # rounding noise, as means of floats give
    assert stats.no_variance(df["m"])
    with pytest.raises(ValueError, match="no variance"):
        stats.leverage(df, "m")
    with pytest.raises(ValueError, match="no variance"):
        stats.factorial_anova(df, "m", "scale", "lora")
