"""The DPO throughput benchmark's code path (bench/throughput.py; issue 14, "Benchmarks"): a smoke run on the tiny
``cpu-xs`` setting, in-process, with the real posttrain loop and TRL's real DPOTrainer. Nothing is timed or compared
for speed here (benchmarks measure, tests check): the JSON lines have their fields, the implementations computed the
same first losses, and the study configuration (cached reference log-probs) kept no reference copy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
FIELDS = ("impl", "algo", "device", "scale", "tokens_per_s", "peak_mem_bytes", "step_s", "timed_steps",
          "tokens_per_step", "resident_bytes", "losses", "mfu", "peak_tflops", "reference_prepass_s")


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    pytest.importorskip("trl")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import throughput

    out = tmp_path_factory.mktemp("bench_dpo") / "dpo.jsonl"
    assert throughput.main(["--scale", "cpu-xs", "--steps", "2", "--impls", "posttrain,trl_no_gc,posttrain_study",
                            "--peak-tflops", "1", "--out", str(out)]) == 0
    return {line["impl"]: line for line in map(json.loads, out.read_text().splitlines())}


def test_one_line_per_implementation_with_its_fields(lines):
    assert set(lines) == {"posttrain", "trl_no_gc", "posttrain_study"}
    for line in lines.values():
        assert set(FIELDS) <= set(line) and line["timed_steps"] == 2 and line["tokens_per_s"] > 0
        assert line["mfu"] == pytest.approx(6 * line["params"] * line["tokens_per_s"] / 1e12, rel=0.05, abs=1e-4)
    assert len({line["tokens_per_step"] for line in lines.values()}) == 1, "tokens are counted once for all arms"


def test_the_implementations_compute_the_same_losses(lines):
    for impl in ("posttrain", "posttrain_study"):
        for ours, trl in zip(lines[impl]["losses"], lines["trl_no_gc"]["losses"]):
            assert ours == pytest.approx(trl, abs=1e-4), impl


def test_the_study_configuration_keeps_no_reference_copy(lines):
    study, plain = lines["posttrain_study"], lines["posttrain"]
    assert study["reference_prepass_s"] > 0 and plain["reference_prepass_s"] is None
    assert study["resident_bytes"] < plain["resident_bytes"]


def test_the_posttrain_arms_run_pairs_behind_one_prompt_copy(lines):
    assert lines["posttrain"]["shared_prompt"] is True and lines["posttrain_study"]["shared_prompt"] is True
    assert lines["trl_no_gc"]["shared_prompt"] is None


def test_cached_reference_noise_is_rounding_in_fp32_and_small_in_bf16(tmp_path):
    """bench/reference_noise.py: the cached reference against the loop's own forward at the first step (policy ==
    reference), where an in-loop reference would give DPO margins of exactly 0."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import reference_noise

    out = tmp_path / "noise.jsonl"
    assert reference_noise.main(["--scale", "cpu-xs", "--pairs", "8", "--out", str(out)]) == 0
    got = {(line["precision"], line["shared_prompt"]): line for line in map(json.loads, out.read_text().splitlines())}
    assert set(got) == {(p, s) for p in ("fp32", "bf16-mixed") for s in (False, True)}
    for shared in (False, True):
        assert got["fp32", shared]["seq_gap_max"] < 1e-3 and got["fp32", shared]["margin_abs_max"] < 1e-4
        # bf16: a different batch composition rounds differently, but far below any trained margin
        bf16 = got["bf16-mixed", shared]
        assert 0 < bf16["seq_gap_max"] < 0.5 and bf16["margin_abs_max"] < 0.05, bf16
