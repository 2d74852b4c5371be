"""posttrain.report: the CLI end to end on synthetic result.json trees (docs/design.md's schema).

The golden test compares report.md on the checked-in tree tests/data/report_golden/tree with
tests/data/report_golden/report.md. After a deliberate change to the report, regenerate it with
    POSTTRAIN_REGEN_GOLDEN=1 python -m pytest tests/test_report.py -k golden
and review the diff. The tree itself comes from `golden_tree()` below (regenerate with
    POSTTRAIN_REGEN_GOLDEN=tree python -m pytest tests/test_report.py -k golden).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from posttrain import report
from posttrain.results import REQUIRED_KEYS, write_result

DATA = Path(__file__).parent / "data" / "report_golden"
GOLDEN_TREE = DATA / "tree"
GOLDEN_MD = DATA / "report.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GSM = "synth_gsm8k/exact_match,strict-match"


# ------------------------------------------------------------------------------------------ tree helpers


def make_result(algo, scale, seed, *, lora=False, variant=None, status="completed", metrics=None,
                loss_curve=None, reward_curve=None, error=None, config_extra=None, config_hash=None,
                base=None) -> dict:
    """A valid result.json payload (docs/design.md "Contracts"): every required key, metrics {task: {metric: v}}."""
    config = {"algo": {"name": algo, "beta": 0.1}, "scale": {"name": scale}, "seed": seed,
              "lora": {"enabled": bool(lora)}, **(config_extra or {})}
    digest = config_hash or hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    metrics = metrics if metrics is not None else {}
    loss_curve = loss_curve if loss_curve is not None else []
    train = {"steps": len(loss_curve), "examples": 8 * len(loss_curve), "tokens": 1000 * len(loss_curve),
             "seconds": 1.5 * len(loss_curve), "tokens_per_s": 666.7, "final_loss": loss_curve[-1][1] if loss_curve
             else None, "loss_curve": loss_curve}
    if reward_curve is not None:
        train["reward_curve"] = reward_curve
    if status == "failed" and error is None:
        error = {"type": "RuntimeError", "message": "boom", "traceback": "Traceback ..."}
    return {
        "status": status, "algo": algo, "variant": variant or algo, "scale": scale, "seed": seed, "lora": bool(lora),
        "config_hash": digest, "config": config,
        "algo_meta": {"family": "pairwise", "category": "other", "reference_free": False, "length_normalized": False},
        "metrics": metrics if status == "completed" else {},
        "eval": {"tasks": sorted(metrics), "num_fewshot": 0, "chat_template": False, "limit": 200,
                 "lm_eval_version": "0.4.9", "base_metrics": base or {}},
        "train": train,
        "provenance": {"git_sha": "0" * 40, "versions": {"torch": "2.13.0"}, "hardware": "cpu",
                       "started": "2026-01-01T00:00:00", "finished": "2026-01-01T00:01:00", "cache_hits": []},
        "error": error,
    }


def put(root: Path, result: dict, *, suffix: str = "") -> Path:
    """Write ``result`` into its cell directory <variant>/<scale>/lora-<on|off>/seed-<n><suffix>/."""
    cell = (root / result["variant"] / result["scale"] / f"lora-{'on' if result['lora'] else 'off'}"
            / f"seed-{result['seed']}{suffix}")
    assert set(REQUIRED_KEYS) <= set(result)
    return write_result(cell, result)


def gsm_metrics(value: float, *, math_value: float | None = None, mc_value: float | None = None) -> dict:
    m = {"synth_gsm8k": {"exact_match,strict-match": value, "exact_match_stderr,strict-match": 0.03,
                         "exact_match,flexible-extract": min(1.0, value + 0.02),
                         "exact_match_stderr,flexible-extract": 0.03}}
    if math_value is not None:
        m["synth_math"] = {"exact_match,strict-match": math_value, "exact_match_stderr,strict-match": 0.02}
    if mc_value is not None:
        m["synth_mc"] = {"acc,none": mc_value, "acc_stderr,none": 0.01, "acc_norm,none": mc_value + 0.01,
                         "acc_norm_stderr,none": 0.01}
    return m


def golden_tree(root: Path) -> None:
    """The fixed fixture: 3 algorithms x 2 tiny scales x 3 seeds (LoRA off), DPO also with LoRA on (a 2x2
    factorial), a KTO cell with one seed, an order inversion between the scales (sft best at tiny-s, simpo at
    tiny-m), a failed run, a completed run without synth_mc, an archived relaunch that must be skipped, and the
    untrained base's scores per scale (eval.base_metrics) for the base line and the deltas."""
    rng = np.random.default_rng(20260101)
    base = {"tiny-s": gsm_metrics(0.35, math_value=0.10, mc_value=0.50),
            "tiny-m": gsm_metrics(0.44, math_value=0.11, mc_value=0.505)}
    centre = {("sft", "tiny-s", False): 0.40, ("dpo", "tiny-s", False): 0.36, ("simpo", "tiny-s", False): 0.30,
              ("sft", "tiny-m", False): 0.45, ("dpo", "tiny-m", False): 0.48, ("simpo", "tiny-m", False): 0.53,
              ("dpo", "tiny-s", True): 0.34, ("dpo", "tiny-m", True): 0.39}
    for (algo, scale, lora), mean in centre.items():
        for seed in range(3):
            value = round(float(mean + rng.normal(0, 0.012)), 4)
            math_value = round(float(0.10 + 0.2 * (mean - 0.3) + rng.normal(0, 0.004)), 4)
            mc_value = None if (algo, scale, seed) == ("simpo", "tiny-m", 2) else \
                round(float(0.50 + 0.05 * (mean - 0.3) + rng.normal(0, 0.002)), 4)
            start = {"sft": 1.2, "dpo": 0.69, "simpo": 2.5}[algo] + (0.1 if lora else 0.0)
            curve = [[s, round(start * 0.9 ** s + 0.01 * seed, 4)] for s in range(1, 6)]
            put(root, make_result(algo, scale, seed, lora=lora, metrics=gsm_metrics(value, math_value=math_value,
                                                                                    mc_value=mc_value),
                                  loss_curve=curve, base=base[scale]))
    put(root, make_result("kto", "tiny-s", 0, metrics=gsm_metrics(0.33, math_value=0.105, mc_value=0.501),
                          loss_curve=[[1, 1.0], [2, 0.9]]))
    put(root, make_result("sft", "tiny-m", 3, status="failed",
                          error={"type": "FloatingPointError", "message": "loss is NaN at step 12\nsecond line",
                                 "traceback": "Traceback (most recent call last): ..."}))
    archived = make_result("dpo", "tiny-s", 0, metrics=gsm_metrics(0.99), config_hash="0ldc0ffee0ld")
    put(root, archived, suffix=".0ldc0ffee0ld".replace("0", "a").replace("l", "b"))


def run_cli(args, capsys):
    """Run main(args); return (exit code, stdout, stderr)."""
    try:
        code = report.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------ golden


def test_golden_report(tmp_path, capsys):
    if os.environ.get("POSTTRAIN_REGEN_GOLDEN") == "tree":
        shutil.rmtree(GOLDEN_TREE, ignore_errors=True)
        golden_tree(GOLDEN_TREE)
    tree = tmp_path / "tree"
    shutil.copytree(GOLDEN_TREE, tree)
    code, out, err = run_cli([tree], capsys)
    assert code == 0, err
    text = (tree / "report.md").read_text()
    if os.environ.get("POSTTRAIN_REGEN_GOLDEN"):
        GOLDEN_MD.write_text(text)
    assert text == GOLDEN_MD.read_text(), "report.md differs from the golden file (see module docstring)"


@pytest.fixture(scope="module")
def golden_out(tmp_path_factory):
    """The report of the golden tree, written once for the tests that inspect its files."""
    tree = tmp_path_factory.mktemp("golden") / "tree"
    shutil.copytree(GOLDEN_TREE, tree)
    assert report.main([str(tree)]) == 0
    return tree


def test_golden_csvs(golden_out):
    summary = read_csv(golden_out / "summary.csv")
    assert len(summary) == 26  # every result.json but the archive, the failed one included
    assert list(summary[0])[:6] == ["algo", "variant", "scale", "lora", "seed", "status"]
    assert {"train_tokens", "train_seconds", GSM, "synth_gsm8k/exact_match_stderr,strict-match"} <= set(summary[0])
    failed = [r for r in summary if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error_type"] == "FloatingPointError"
    assert not any(".abdcaffeeabd" in r["path"] for r in summary)
    comparisons = read_csv(golden_out / "comparisons.csv")
    assert list(comparisons[0]) == list(report.stats.COMPARISON_COLUMNS)
    assert {r["significant"] for r in comparisons} <= {"true", "false"}
    # default: every task's primary metric; stderr entries never compared
    assert [r["metric"] for r in comparisons if r["metric"] != GSM] and \
        {r["metric"] for r in comparisons} == {GSM, "synth_math/exact_match,strict-match", "synth_mc/acc_norm,none"}
    untested = [r for r in comparisons if "kto" in (r["a"], r["b"]) and r["metric"] == GSM]
    assert len(untested) == 3
    assert all(r["t"] == r["df"] == r["p"] == r["p_adj"] == "" and r["significant"] == "false" for r in untested)


def test_golden_plots_written(golden_out):
    plots = sorted((golden_out / "plots").glob("*.png"))
    names = {p.name.split("__")[0] for p in plots}
    assert names == {"accuracy", "forest", "interaction", "ranks", "training_curves.png", "main_figure.png"}
    for path in plots:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path
        assert f"plots/{path.name}" in (golden_out / "report.md").read_text()


# ------------------------------------------------------------------------------------------ planted effects


def planted_tree(root: Path, *, winner="grpo", effect=0.15, sd=0.01, seeds=5, scales=("tiny-s",), seed=7):
    """Four algorithms drawn from N(0.40, sd), the winner from N(0.40 + effect, sd); online runs get rewards."""
    rng = np.random.default_rng(seed)
    for scale in scales:
        for algo in ("dpo", "grpo", "kto", "sft"):
            for s in range(seeds):
                mean = 0.40 + (effect if algo == winner else 0.0)
                value = round(float(rng.normal(mean, sd)), 4)
                reward = [[k, 0.1 * k] for k in range(1, 4)] if algo == "grpo" else None
                put(root, make_result(algo, scale, s, metrics=gsm_metrics(value, math_value=0.1, mc_value=0.5),
                                      loss_curve=[[k, 1.0 / k] for k in range(1, 4)], reward_curve=reward))


def test_planted_effect_detected_all_pairs(tmp_path, capsys):
    planted_tree(tmp_path)
    code, out, err = run_cli([tmp_path], capsys)
    assert code == 0, err
    rows = [r for r in read_csv(tmp_path / "comparisons.csv") if r["metric"] == GSM]
    assert len(rows) == 6  # 4 algorithms, all pairs, a before b alphabetically
    assert all(r["a"] < r["b"] for r in rows)
    for r in rows:
        involved = "grpo" in (r["a"], r["b"])
        if involved:
            sign = 1 if r["a"] == "grpo" else -1
            assert r["significant"] == "true"
            assert sign * float(r["diff"]) == pytest.approx(0.15, abs=0.02)
            assert sign * float(r["ci_low"]) > 0 and sign * float(r["ci_high"]) > 0
            assert abs(float(r["cohen_d"])) > 5
    text = (tmp_path / "report.md").read_text()
    grpo_row = next(line for line in text.splitlines() if line.startswith("| grpo |"))
    assert "**" in grpo_row  # the winner is marked best
    assert (tmp_path / "plots" / "training_curves.png").stat().st_size > 0
    assert "20 runs with a loss curve, 5 with a reward curve" in text


def test_planted_effect_vs_baseline_holm(tmp_path, capsys):
    planted_tree(tmp_path, winner="dpo", scales=("tiny-s", "tiny-m"))
    code, _, err = run_cli([tmp_path, "--baseline", "sft", "--correction", "holm", "--metric", GSM,
                            "--metric", "synth_mc/acc,none"], capsys)
    assert code == 0, err
    comp = pd.read_csv(tmp_path / "comparisons.csv", keep_default_na=True)
    gsm = comp[comp["metric"] == GSM]
    assert set(gsm["b"]) == {"sft"} and set(gsm["a"]) == {"dpo", "grpo", "kto"}
    assert len(gsm) == 6  # 3 algorithms x 2 scales
    assert np.allclose(gsm["diff"], gsm["mean_a"] - gsm["mean_b"])
    for _, fam in gsm.groupby(["scale", "lora"]):
        expected = multipletests(fam["p"], method="holm")[1]
        assert np.allclose(fam["p_adj"], expected)
    dpo = gsm[gsm["a"] == "dpo"]
    assert dpo["significant"].astype(str).str.lower().eq("true").all() and (dpo["diff"] > 0.1).all()
    # the constant synth_mc metric: zero variance in both groups, so no test at all
    mc = comp[comp["metric"] == "synth_mc/acc,none"]
    assert len(mc) == 6 and mc["p"].isna().all() and mc["t"].isna().all()
    assert not mc["significant"].astype(str).str.lower().eq("true").any()
    assert (tmp_path / "plots" / "forest__synth_gsm8k_exact_match_strict-match.png").stat().st_size > 0
    assert (tmp_path / "plots" / "ranks__synth_gsm8k_exact_match_strict-match.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ edge cases


def test_edge_cases_n1_zero_variance_missing_cells(tmp_path, capsys):
    """n = 1 (shown, no test, n/a), one constant group (testable), two constant groups (not), a missing cell,
    a run lacking the metric, one scale only (rank plot skipped and said so)."""
    for s, v in enumerate([0.30, 0.32, 0.34]):
        put(tmp_path, make_result("dpo", "tiny-s", s, metrics=gsm_metrics(v)))
    for s in range(3):
        put(tmp_path, make_result("ipo", "tiny-s", s, metrics=gsm_metrics(0.5)))
        put(tmp_path, make_result("kto", "tiny-s", s, metrics=gsm_metrics(0.4)))
    put(tmp_path, make_result("sft", "tiny-s", 0, metrics=gsm_metrics(0.45)))
    put(tmp_path, make_result("sft", "tiny-s", 1, metrics={"synth_math": {"exact_match,strict-match": 0.1}}))
    code, _, err = run_cli([tmp_path], capsys)
    assert code == 0, err
    rows = {(r["a"], r["b"]): r for r in read_csv(tmp_path / "comparisons.csv")}
    assert rows[("dpo", "ipo")]["p"] != ""  # one constant group: Welch is defined
    assert rows[("ipo", "kto")]["p"] == "" and rows[("ipo", "kto")]["significant"] == "false"
    for pair in [("dpo", "sft"), ("ipo", "sft"), ("kto", "sft")]:
        assert rows[pair]["p"] == rows[pair]["t"] == rows[pair]["p_adj"] == "" and rows[pair]["n_b"] == "1"
    text = (tmp_path / "report.md").read_text()
    assert "| sft | 0.4500 (n=1) n/a |" in text
    assert "1 completed run lacks `synth_gsm8k/exact_match,strict-match`" in text
    assert "ranks" in text and "only one scale" in text
    assert not list((tmp_path / "plots").glob("ranks__*"))
    assert not list((tmp_path / "plots").glob("interaction__*"))


def test_all_failed_still_reports(tmp_path, capsys):
    put(tmp_path, make_result("dpo", "tiny-s", 0, status="failed",
                              error={"type": "OSError", "message": "disk full | really", "traceback": "..."}))
    code, _, err = run_cli([tmp_path], capsys)
    assert code == 0, err
    text = (tmp_path / "report.md").read_text()
    assert "OSError: disk full \\| really" in text and "0 completed, 1 failed" in text
    assert len(read_csv(tmp_path / "summary.csv")) == 1


def test_same_run_twice_is_used_once_and_noted(tmp_path, capsys):
    for sweep in ("a", "b"):
        for s in range(2):
            put(tmp_path / sweep, make_result("dpo", "tiny-s", s, metrics=gsm_metrics(0.3 + s / 100)))
    code, _, err = run_cli([tmp_path], capsys)
    assert code == 0, err
    assert len(read_csv(tmp_path / "summary.csv")) == 4
    text = (tmp_path / "report.md").read_text()
    assert "(n=2)" in text and "repeats the cell of" in text


def test_variants_of_one_algo_are_groups_and_old_results_use_algo(tmp_path, capsys):
    """A grid over algo.beta gives variants `dpo@algo.beta=...` that are compared with each other; a result
    without `variant` (an older file) is grouped by its algo; --baseline may name the algo of a single variant."""
    for beta, centre in (("0.1", 0.30), ("0.5", 0.45)):
        for s in range(3):
            put(tmp_path, make_result("dpo", "1.5b", s, variant=f"dpo@algo.beta={beta}",
                                      metrics=gsm_metrics(centre + s / 200), config_extra={"b": beta}))
    for s in range(3):
        old = make_result("sft", "1.5b", s, metrics=gsm_metrics(0.35 + s / 200))
        del old["variant"]
        (tmp_path / "legacy" / f"seed-{s}").mkdir(parents=True)
        (tmp_path / "legacy" / f"seed-{s}" / "result.json").write_text(json.dumps(old))
    code, _, err = run_cli([tmp_path, "--baseline", "sft", "--seed", "3"], capsys)
    assert code == 0, err
    rows = read_csv(tmp_path / "comparisons.csv")
    assert {(r["a"], r["b"]) for r in rows} == {("dpo@algo.beta=0.1", "sft"), ("dpo@algo.beta=0.5", "sft")}
    assert {r["significant"] for r in rows} == {"true"}
    code, _, err = run_cli([tmp_path, "--baseline", "dpo"], capsys)  # two variants have algo dpo: ambiguous
    assert code == 2 and "dpo@algo.beta=0.1" in err


# ------------------------------------------------------------------------------------------------ errors


def _one_line_error(code, err):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("python -m posttrain.report: error: ")
    assert "Traceback" not in err


def test_conflicting_configs_in_one_cell(tmp_path, capsys):
    put(tmp_path / "old", make_result("dpo", "tiny-s", 0, metrics=gsm_metrics(0.3)))
    put(tmp_path / "new", make_result("dpo", "tiny-s", 0, metrics=gsm_metrics(0.3),
                                      config_extra={"trainer": {"lr": 1e-5}}))
    code, _, err = run_cli([tmp_path], capsys)
    _one_line_error(code, err)
    assert "old/dpo/tiny-s/lora-off/seed-0/result.json" in err and "new/dpo/tiny-s/lora-off/seed-0/result.json" in err
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "archive_only", "bad_json", "lacks_key", "metric", "stderr",
                                  "baseline", "alpha", "correction", "no_default"])
def test_user_errors_one_line_exit_2(tmp_path, capsys, case):
    args = [tmp_path]
    if case == "missing":
        args = [tmp_path / "nope"]
    elif case == "archive_only":
        put(tmp_path, make_result("dpo", "tiny-s", 0, metrics=gsm_metrics(0.3)), suffix=".abc123")
    elif case == "bad_json":
        (tmp_path / "dpo").mkdir()
        (tmp_path / "dpo" / "result.json").write_text("{not json")
    elif case == "lacks_key":
        result = make_result("dpo", "tiny-s", 0, metrics=gsm_metrics(0.3))
        (tmp_path / "dpo").mkdir()
        (tmp_path / "dpo" / "result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "scale"}))
    elif case != "empty":
        put(tmp_path, make_result("dpo", "tiny-s", 0, metrics=gsm_metrics(0.3)))
        put(tmp_path, make_result("sft", "tiny-s", 0, metrics=gsm_metrics(0.3)))
        args += {"metric": ["--metric", "gsm8k/acc,none"],
                 "stderr": ["--metric", "synth_gsm8k/exact_match_stderr,strict-match"],
                 "baseline": ["--baseline", "orpo"], "alpha": ["--alpha", "1.5"],
                 "correction": ["--correction", "fdr"], "no_default": []}[case]
        if case == "no_default":
            for path in tmp_path.rglob("result.json"):
                data = json.loads(path.read_text())
                data["metrics"] = {"synth_mc": {"bleu,none": 0.5}}  # no task reports a known primary metric
                path.write_text(json.dumps(data))
    code, _, err = run_cli(args, capsys)
    _one_line_error(code, err)


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "posttrain.report", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"no result.json under {tmp_path}") and proc.stderr.count("\n") == 1


def test_default_metric_prefers_real_gsm8k():
    available = ["gsm8k/exact_match,strict-match", "synth_gsm8k/exact_match,strict-match", "synth_mc/acc,none"]
    assert report.select_metrics(available, None, True) == available, "every task's primary metric, gsm8k first"
    assert report.select_metrics(available[1:], None, True) == available[1:]
    both = ["synth_mc/acc,none", "synth_mc/acc_norm,none", "synth_math/exact_match,flexible-extract",
            "synth_math/exact_match,strict-match", "synth_math/exact_match_stderr,strict-match"]
    assert report.select_metrics(both, None, True) == ["synth_math/exact_match,strict-match", "synth_mc/acc_norm,none"]
    assert report.is_stderr("gsm8k/exact_match_stderr,strict-match") and not report.is_stderr(GSM)
    assert sorted(["7b", "tiny-m", "0.5b", "14b", "tiny-s", "3b"], key=report.scale_key) == \
        ["tiny-s", "tiny-m", "0.5b", "3b", "7b", "14b"]


def test_a_truncated_or_incomplete_result_is_listed_and_skipped_not_fatal(tmp_path, capsys):
    for seed in (0, 1):
        put(tmp_path, make_result("dpo", "tiny-s", seed, metrics=gsm_metrics(0.3 + seed / 100)))
        put(tmp_path, make_result("sft", "tiny-s", seed, metrics=gsm_metrics(0.4 + seed / 100)))
    truncated = tmp_path / "kto" / "result.json"
    truncated.parent.mkdir()
    truncated.write_text(json.dumps(make_result("kto", "tiny-s", 0, metrics=gsm_metrics(0.5)))[:120])
    (tmp_path / "ipo").mkdir()
    (tmp_path / "ipo" / "result.json").write_text(json.dumps({"status": "completed", "algo": "ipo"}))
    code, _, err = run_cli([tmp_path], capsys)
    assert code == 0, err
    text = (tmp_path / "report.md").read_text()
    assert "`kto/result.json` skipped: not valid JSON" in text
    assert "`ipo/result.json` skipped: result.json lacks scale, seed, lora" in text
    assert err.count("warning:") == 2
    summary = (tmp_path / "summary.csv").read_text()
    assert "kto" not in summary and summary.count("\n") == 5, "the four readable runs, and only them"
