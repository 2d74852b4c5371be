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
