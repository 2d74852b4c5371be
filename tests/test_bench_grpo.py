"""The GRPO benchmark's code path (bench/grpo_throughput.py; issue 14, "Benchmarks"): a smoke run (~20 s) on the tiny
``cpu-xs`` setting, in-process, real posttrain loop and real TRL GRPOTrainer. Nothing here is timed or compared for
speed (benchmarks measure, tests check); the run checks what the JSON lines say and that both implementations saw the
same prompts and, with ``--same-seeds``, drew the same samples and computed the same losses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

FIELDS = ("impl", "device", "scale", "gen_tokens_per_s", "train_tokens_per_s", "step_s", "gen_s", "rollout_s",
          "train_s", "peak_mem_bytes", "gen_tokens_per_step", "train_tokens_per_step", "prompts", "samples",
          "prompts_sha", "losses", "rewards", "num_generations", "max_completion_length", "temperature", "lr", "beta",
          "loss_type", "cmd", "notes")


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import grpo_throughput

    return grpo_throughput


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    pytest.importorskip("trl")
    out = tmp_path_factory.mktemp("bench_grpo") / "grpo.jsonl"
    assert _bench().main(["--scale", "cpu-xs", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    return {line["impl"]: line for line in map(json.loads, out.read_text().splitlines())}


def test_one_line_per_implementation_with_every_field(lines):
    assert set(lines) == {"posttrain", "trl", "trl_no_gc"}
    for impl, line in lines.items():
        missing = [f for f in FIELDS if f not in line]
        assert not missing, f"{impl} lacks {missing}"
        assert line["device"] == "cpu" and line["scale"] == "cpu-xs"
        for key in ("gen_tokens_per_s", "train_tokens_per_s", "step_s", "gen_s", "train_s", "peak_mem_bytes"):
            assert line[key] > 0, (impl, key)
        assert line["gen_s"] <= line["rollout_s"] <= line["step_s"]
        assert line["cmd"].startswith("python bench/grpo_throughput.py --scale cpu-xs")
        assert line["timed_steps"] == 2


def test_both_implementations_saw_the_same_prompts_and_samples(lines):
    # cpu-xs: 2 prompts x 2 samples per step, 1 warm-up + 2 timed + 1 memory step = 4 rollouts
    for line in lines.values():
        assert line["prompts"] == 4 * 2 and line["samples"] == 4 * 2 * 2
    assert len({line["prompts_sha"] for line in lines.values()}) == 1


def test_same_seeds_give_the_same_samples_tokens_and_losses(lines):
    ours = lines["posttrain"]
    for other in ("trl", "trl_no_gc"):
        line = lines[other]
        # the same completions (token counts per step), hence the same training tokens counted the same way
        assert line["gen_tokens_per_step"] == ours["gen_tokens_per_step"]
        assert line["train_tokens_per_step"] == ours["train_tokens_per_step"]
        assert line["rewards"] == ours["rewards"]
        assert line["losses"] == pytest.approx(ours["losses"], abs=1e-6)


def test_unknown_scale_is_one_line():
    with pytest.raises(SystemExit, match="unknown --scale 'huge'; known: "):
        _bench().main(["--scale", "huge", "--out", "/dev/null"])
