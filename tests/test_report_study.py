"""A report that shows the study (issue 13 item 6): base line and deltas, short labels, per-algorithm loss panels,
ties and zero variance, the main figure, the power analysis, cancelled runs. Real result.json trees, real plots
(the matplotlib Figures the report returns are read back)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.power import TTestIndPower

from posttrain import report
from test_report import GSM, gsm_metrics, make_result, put, read_csv, run_cli

MC = "synth_mc/acc_norm,none"
MATH = "synth_math/exact_match,strict-match"


def _study(root, *, seeds=3, sd=0.01):
    """dpo / simpo / sft at two scales with the base scored; every task present."""
    rng = np.random.default_rng(3)
    base = {"tiny-s": gsm_metrics(0.30, math_value=0.10, mc_value=0.50),
            "tiny-m": gsm_metrics(0.40, math_value=0.12, mc_value=0.52)}
    centre = {"dpo": 0.05, "simpo": 0.02, "sft": 0.0}
    for scale in ("tiny-s", "tiny-m"):
        for algo, shift in centre.items():
            for s in range(seeds):
                v = round(float(base[scale]["synth_gsm8k"]["exact_match,strict-match"] + shift
                                + rng.normal(0, sd)), 4)
                start = {"dpo": 0.69, "simpo": 3.0, "sft": 1.2}[algo]
                put(root, make_result(algo, scale, s, metrics=gsm_metrics(v, math_value=0.1 + shift,
                                                                          mc_value=0.5 + shift / 2),
                                      base=base[scale], loss_curve=[[k, start * 0.8 ** k] for k in range(1, 5)]))


def test_base_line_and_deltas_in_tables_and_figures(tmp_path):
    _study(tmp_path)
    analysis = report.build(tmp_path, n_resamples=100)
    report.write(tmp_path, analysis)
    text = (tmp_path / "report.md").read_text()
    assert analysis.metrics == [GSM, MATH, MC], "every task's primary metric by default"
    assert "| *base* (untrained) | 0.3000 | 0.4000 |" in text
    cells = analysis.cells.set_index(["metric", "variant", "scale", "lora"])
    dpo = cells.loc[(GSM, "dpo", "tiny-s", "off")]
    assert dpo["base"] == 0.30 and dpo["delta"] == pytest.approx(dpo["mean"] - 0.30)
    assert f"(n=3) Δ {dpo['mean'] - 0.30:+.4f}" in text
    assert "Δ base a / b" in text  # the comparisons table carries the change over the base too
    fig = analysis.figures[f"accuracy {GSM}"]
    for ax, base in zip(fig.axes, (0.30, 0.40)):  # one panel per scale (LoRA off only)
        [line] = [ln for ln in ax.get_lines() if ln.get_label() == "base"]
        assert set(line.get_ydata()) == {base}


def test_main_figure_is_a_task_by_scale_grid_with_the_base(tmp_path):
    _study(tmp_path)
    analysis = report.build(tmp_path, n_resamples=0)
    fig = analysis.figures["main figure"]
    assert len(fig.axes) == 3 * 2  # tasks x scales
    assert [ax.get_title() for ax in fig.axes[:2]] == ["tiny-s", "tiny-m"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["dpo", "sft", "simpo"]
    bases = [[ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_label() == "base"] for ax in fig.axes]
    assert bases == [[0.30], [0.40], [0.10], [0.12], [0.51], [0.53]]  # mc's primary metric: acc_norm = acc + 0.01
    assert (tmp_path / "plots" / "main_figure.png").stat().st_size > 5000


def test_loss_curves_get_one_row_of_panels_per_algorithm(tmp_path):
    _study(tmp_path)
    analysis = report.build(tmp_path, metrics=[GSM], n_resamples=0)
    fig = analysis.figures["training curves"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"{a}, {s}: loss" for a in ("dpo", "sft", "simpo") for s in ("tiny-s", "tiny-m")]
    tops = [ax.get_ylim()[1] for ax in fig.axes[::2]]  # dpo, sft, simpo at tiny-s
    assert tops[2] > 2 * tops[0], "simpo's loss has its own axis, not dpo's"


def test_ties_have_no_winner_and_zero_variance_no_f_test(tmp_path, capsys):
    """Issue 13: all scores tied at 0.46 gave F 0.20, p 0.83, eta^2 0.168 from SS 0 and a bold 'best'."""
    for algo in ("dpo", "kto", "simpo"):
        for s in range(3):
            put(tmp_path, make_result(algo, "tiny-s", s, metrics=gsm_metrics(0.46)))
    code, _, err = run_cli([tmp_path, "--metric", GSM], capsys)
    assert code == 0, err
    text = (tmp_path / "report.md").read_text()
    main = text.split("## Main results")[1].split("## Main figure")[0]
    assert not [line for line in main.splitlines() if line.startswith("| ") and "**" in line]
    assert all(f"| {a} | 0.4600 ± 0.0000 (n=3) ≈ |" in main for a in ("dpo", "kto", "simpo"))
    leverage = text.split("## Leverage")[1].split("## Robust")[0]
    assert "no variance" in leverage and "| seed |" not in leverage and "| variant |" not in leverage
    power = read_csv(tmp_path / "power.csv")
    assert {r["verdict"] for r in power} == {"no variance"}


def test_a_two_way_tie_for_best_with_a_worse_third(tmp_path, capsys):
    for algo, v in (("dpo", 0.50), ("ipo", 0.50), ("kto", 0.30)):
        for s in range(3):
            put(tmp_path, make_result(algo, "tiny-s", s, metrics=gsm_metrics(v + s / 100)))
    code, _, err = run_cli([tmp_path, "--metric", GSM, "--resamples", "0"], capsys)
    assert code == 0, err
    main = (tmp_path / "report.md").read_text().split("## Main figure")[0]
    assert not [line for line in main.splitlines() if line.startswith("| ") and "**" in line]
    assert "| dpo | 0.5100 ± 0.0100 (n=3) ≈ |" in main and "| ipo | 0.5100 ± 0.0100 (n=3) ≈ |" in main
    assert "| kto | 0.3100 ± 0.0100 (n=3) |" in main, "significantly worse than the tied best"


def test_short_labels_drop_the_overrides_every_variant_shares(tmp_path, capsys):
    shared = "eval.limit=50,trainer.max_steps=10"
    for variant, algo, v in ((f"dpo@{shared}", "dpo", 0.3), (f"sft@{shared}", "sft", 0.4),
                             (f"dpo@algo.beta=0.2,{shared}", "dpo", 0.35)):
        for s in range(2):
            put(tmp_path, make_result(algo, "tiny-s", s, variant=variant, metrics=gsm_metrics(v + s / 100),
                                      config_extra={"v": variant}))
    code, _, err = run_cli([tmp_path, "--metric", GSM, "--resamples", "0"], capsys)
    assert code == 0, err
    text = (tmp_path / "report.md").read_text()
    assert f"- Overrides every variant shares (left out of the labels): `{shared}`" in text
    body = text.split("## Main results")[1]
    assert "| dpo | " in body and "| dpo@algo.beta=0.2 | " in body and "| sft | " in body
    assert "eval.limit" not in body
    rows = read_csv(tmp_path / "comparisons.csv")  # the CSVs keep the full names
    assert {r["a"] for r in rows} | {r["b"] for r in rows} == {f"dpo@{shared}", f"sft@{shared}",
                                                                f"dpo@algo.beta=0.2,{shared}"}
    assert {r["variant"] for r in read_csv(tmp_path / "summary.csv")} == {f"dpo@{shared}", f"sft@{shared}",
                                                                           f"dpo@algo.beta=0.2,{shared}"}


def test_power_matches_statsmodels_and_separates_real_from_underpowered_nulls(tmp_path, capsys):
    """Two null pairs: a precise one (sd 0.001: MDE < the effect, a real null) and a noisy one (sd 0.05:
    underpowered); MDE and seeds needed equal statsmodels' solve_power with the same inputs."""
    rng = np.random.default_rng(11)
    for scale, sd in (("tiny-s", 0.001), ("tiny-m", 0.05)):
        for algo in ("dpo", "sft"):
            for s in range(4):
                put(tmp_path, make_result(algo, scale, s, metrics=gsm_metrics(round(0.4 + rng.normal(0, sd), 5))))
    code, _, err = run_cli([tmp_path, "--metric", GSM, "--effect", "0.03", "--resamples", "0"], capsys)
    assert code == 0, err
    rows = {r["scale"]: r for r in read_csv(tmp_path / "power.csv")}
    comp = {r["scale"]: r for r in read_csv(tmp_path / "comparisons.csv")}
    for scale, verdict in (("tiny-s", "real null"), ("tiny-m", "underpowered")):
        r, c = rows[scale], comp[scale]
        assert c["significant"] == "false" and r["verdict"] == verdict
        sd = math.sqrt((float(c["std_a"]) ** 2 + float(c["std_b"]) ** 2) / 2)  # equal n: the mean variance
        assert float(r["pooled_sd"]) == pytest.approx(sd)
        d = TTestIndPower().solve_power(effect_size=None, nobs1=4, ratio=1.0, alpha=0.05, power=0.8)
        assert float(r["mde_d"]) == pytest.approx(d, rel=1e-6) and float(r["mde"]) == pytest.approx(d * sd, rel=1e-6)
        n = TTestIndPower().solve_power(effect_size=0.03 / sd, nobs1=None, ratio=1.0, alpha=0.05, power=0.8) \
            if 0.03 / sd < 3 else 2.0
        assert int(r["seeds_needed"]) == max(2, math.ceil(n))
    assert int(rows["tiny-m"]["seeds_needed"]) > 4
    text = (tmp_path / "report.md").read_text()
    assert "## Power" in text and "1 underpowered" in text


def test_cancelled_runs_are_listed_with_the_failed_and_not_used(tmp_path, capsys):
    from posttrain.report.format import CANCELLED

    for algo, v in (("dpo", 0.3), ("sft", 0.4)):
        for s in range(2):
            put(tmp_path, make_result(algo, "tiny-s", s, metrics=gsm_metrics(v + s / 100)))
    cancelled = make_result("dpo", "tiny-s", 2, status=CANCELLED,
                            error={"type": "KeyboardInterrupt", "message": "cancelled at step 31", "traceback": ""})
    put(tmp_path, cancelled)
    code, _, err = run_cli([tmp_path, "--metric", GSM, "--resamples", "0"], capsys)
    assert code == 0, err
    text = (tmp_path / "report.md").read_text()
    assert "1 failed or unfinished (1 cancelled)" in text and "unknown status" not in text
    assert f"| `dpo/tiny-s/lora-off/seed-2/result.json` | {CANCELLED} |" in text
    assert "| dpo | 0.3050 ± 0.0071 (n=2, 1 failed) |" in text  # the statistics use the two completed seeds


@pytest.mark.parametrize("args", [["--effect", "0"], ["--power", "1.5"]])
def test_bad_power_options_are_one_line(tmp_path, capsys, args):
    put(tmp_path, make_result("dpo", "tiny-s", 0, metrics=gsm_metrics(0.3)))
    code, _, err = run_cli([tmp_path, *args], capsys)
    assert code == 2 and err.count("\n") == 1 and args[0] in err


def test_cells_table_is_one_row_per_group(tmp_path):
    _study(tmp_path, seeds=2)
    cells = report.build(tmp_path, n_resamples=0).cells
    assert isinstance(cells, pd.DataFrame) and len(cells) == 3 * 3 * 2  # metrics x variants x scales
    assert (cells["n"] == 2).all()


def test_the_interaction_plot_carries_the_base_per_scale(tmp_path):
    import shutil

    from test_report import GOLDEN_TREE

    shutil.copytree(GOLDEN_TREE, tmp_path / "tree")
    analysis = report.build(tmp_path / "tree", metrics=[GSM], n_resamples=0)
    [ax] = analysis.figures[f"interaction {GSM}"].axes  # dpo: the one variant with LoRA on and off
    [line] = [ln for ln in ax.get_lines() if ln.get_label() == "base"]
    assert list(line.get_ydata()) == [0.35, 0.44]  # golden_tree's base at tiny-s, tiny-m
