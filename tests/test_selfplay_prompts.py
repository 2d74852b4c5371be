"""Self-play prompts as a config choice, and the yield it records: ``raw`` (the tiny scales: exactly the prompts of
before) and ``fewshot`` (the real scales: lm-eval gsm8k's own few-shot format, shots from the training split, never
the problem itself, seeded), one prompt source for self-play and online methods, the yield manifest beside the
cached samples, and the one line a low yield prints."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import FAST, ROOT, launch, read_json
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from posttrain.data import synth
from posttrain.data.gsm8k import load_gsm8k
from posttrain.data.selfplay import (LM_EVAL_GSM8K_UNTIL, check_lengths, draw_shots, fewshot_prompt,
                                     load_records, low_yield_line, make_examples, selfplay_report,
                                     selfplay_samples, stop_strings, training_prompts, yield_manifest)
from posttrain.sweep import cells  # noqa: F401 - registers the ${posttrain_cell:} resolver


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _gsm8k_file(path: Path, n: int) -> Path:
    """A GSM8K-format file (openai/gsm8k's fields, calculator annotations, final ``#### N`` line)."""
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
                                     "answer": f"He has {i}+{i + 2}=<<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}.\n"
                                               f"#### {2 * i + 2}"}) + "\n")
    return path


def _data(**overrides):
    base = {"source": "synthetic", "path": None, "num_prompts": 32, "prompt_format": "raw", "fewshot": 8,
            "stop_strings": None, "seed": 0}
    return OmegaConf.create({**base, **overrides})


def test_fewshot_prompt_is_lm_eval_gsm8ks_own_context(tmp_path):
    """Our rendering equals lm-eval's ConfigurableTask.fewshot_context for gsm8k's own YAML given the same shots
    (its training split holding exactly them, taken in order by lm-eval's first_n sampler)."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask

    rows = _gsm8k_file(tmp_path / "all.jsonl", 4)
    problems = load_gsm8k(str(rows), "train")
    target, shots = problems[0], problems[1:]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in shots))
    (tmp_path / "test.jsonl").write_text(json.dumps(target.to_json()) + "\n")
    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    config.pop("tag", None)
    config.update(dataset_path="json", dataset_name=None, fewshot_config={"sampler": "first_n"},
                  dataset_kwargs={"data_files": {"train": str(tmp_path / "train.jsonl"),
                                                 "test": str(tmp_path / "test.jsonl")}})
    task = ConfigurableTask(config=config)
    expected = task.fewshot_context(task.test_docs()[0], num_fewshot=len(shots))
    assert fewshot_prompt(target, shots) == expected
    assert expected.startswith("Question: Tom has 1 apples") and expected.endswith(target.prompt)
    assert LM_EVAL_GSM8K_UNTIL == tuple(config["generation_kwargs"]["until"])


def test_fewshot_prompts_draw_k_training_shots_never_the_problem_itself_and_are_seeded(tmp_path):
    path = _gsm8k_file(tmp_path / "train.jsonl", 40)
    cfg = _data(source="gsm8k", path=str(path), num_prompts=10, prompt_format="fewshot", fewshot=3)
    prompts = training_prompts(cfg)
    problems = {p.question: p for p in load_gsm8k(str(path), "train")}
    assert len(prompts) == 10
    for tp in prompts:
        questions = re.findall(r"Question: (.*?)\nAnswer:", tp.prompt)
        own = questions[-1]
        assert len(questions) == 4 and own not in questions[:-1], "k shots, never the problem itself"
        assert tp.prompt.endswith(problems[own].prompt) and tp.answer == problems[own].answer
        assert tp.gold == problems[own].completion
        shots = [problems[q] for q in questions[:-1]]
        assert tp.prompt == fewshot_prompt(problems[own], shots)  # worked answers with their #### N lines
    assert [p.prompt for p in training_prompts(cfg)] == [p.prompt for p in prompts], "deterministic"
    other_seed = training_prompts(OmegaConf.merge(cfg, {"seed": 1}))
    # shots come from the whole split, not the 10 prompts drawn: the same problem keeps its shots in a bigger draw
    bigger = {p.prompt.rsplit("Question: ", 1)[1]: p.prompt for p in training_prompts(OmegaConf.merge(
        cfg, {"num_prompts": None}))}
    assert all(bigger[p.prompt.rsplit("Question: ", 1)[1]] == p.prompt for p in prompts)
    assert {p.prompt for p in other_seed} != {p.prompt for p in prompts}
    assert stop_strings(cfg) == LM_EVAL_GSM8K_UNTIL and stop_strings(_data()) == ()
    assert stop_strings(OmegaConf.merge(cfg, {"stop_strings": ["\n\n"]})) == ("\n\n",)


def test_duplicates_of_the_problem_are_never_shots_and_bad_settings_say_what_to_fix():
    problem = synth.problems("train", 1)[0]
    pool = [problem, problem, *synth.problems("test", 3)]
    assert all(s.question != problem.question for s in draw_shots(problem, pool, 3, seed=0))
    with pytest.raises(ValueError, match=r"data.fewshot=4 but the training split has only 3 other problems"):
        draw_shots(problem, pool, 4, seed=0)
    with pytest.raises(ValueError, match=r"unknown data.prompt_format 'chat'; known: raw, fewshot"):
        training_prompts(_data(prompt_format="chat"))


def test_tiny_scales_keep_the_raw_prompts_and_real_scales_compose_fewshot():
    for scale in ("tiny-s", "tiny-m", "tiny-l"):
        cfg = _compose([f"scale={scale}"])
        assert cfg.data.prompt_format == "raw" and stop_strings(cfg.data) == ()
    tiny = _compose([]).data
    before = synth.problems("train", 512, seed=0)  # what self-play asked the tiny base before prompt formats
    assert [p.prompt for p in training_prompts(tiny)] == [p.prompt for p in before]
    for scale in ("0.5b", "1.5b", "3b", "7b"):
        data = _compose([f"scale={scale}"]).data
        assert (data.prompt_format, data.fewshot, data.min_pair_yield) == ("fewshot", 8, 0.05)
        assert stop_strings(data) == ("Question:", "</s>", "<|im_end|>")
    assert _compose(["scale=0.5b", "data.prompt_format=raw"]).data.prompt_format == "raw"


def test_online_prompts_and_self_play_share_one_source_and_carry_the_stop_strings():
    cfg = _data(prompt_format="fewshot", fewshot=2, num_prompts=4)
    prompts = training_prompts(cfg)
    records = [{"prompt": p.prompt, "answer": p.answer} for p in prompts]
    online = make_examples(records, "prompts", stop_strings=stop_strings(cfg))
    assert [e["prompt"] for e in online] == [p.prompt for p in prompts]
    assert all(e["stop_strings"] == list(LM_EVAL_GSM8K_UNTIL) for e in online)
    assert "stop_strings" not in make_examples(records, "prompts")[0], "raw prompts carry none"


def test_check_lengths_refuses_a_prompt_that_leaves_no_room_for_the_completion(tmp_path):
    from posttrain.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(tmp_path / "tok")
    assert check_lengths(tok, ["abc", "abcdef"], max_length=10, max_new_tokens=4) == 6
    with pytest.raises(ValueError, match=r"data.max_length=9 cannot hold the longest training prompt \(6 tokens\) "
                                         r"plus max_new_tokens=4: set data.max_length=10"):
        check_lengths(tok, ["abc", "abcdef"], max_length=9, max_new_tokens=4)


#: Hand-checked: strict = lm-eval strict-match ("#### N"), flexible = the last number in the text.
#: p1: strict T F, flexible T T -> a pair, the checks agree on 1 of 2;
#: p2: strict T T, flexible T T -> no pair, agree 2 of 2;  p3: strict F F, flexible F F -> no pair, agree 2 of 2.
RECORDS = [
    {"prompt": "p1", "answer": "5", "gold": " #### 5", "samples": ["so #### 5", "The answer is 5."],
     "correct": [True, False], "truncated": [False, False]},
    {"prompt": "p2", "answer": "7", "gold": " #### 7", "samples": ["#### 7", "3+4=7\n#### 7"],
     "correct": [True, True], "truncated": [False, True]},
    {"prompt": "p3", "answer": "3", "gold": " #### 3", "samples": ["#### 4", "no idea"],
     "correct": [False, False], "truncated": [False, False]},
]


def test_yield_manifest_counts_pairs_accuracies_and_agreement():
    manifest = yield_manifest(RECORDS, {"temperature": 1.0}, "raw", 0)
    assert manifest == {"prompts": 3, "samples": 6, "pairs": 1, "pair_yield": 0.333333, "strict_accuracy": 0.5,
                        "flexible_accuracy": 0.666667, "strict_flexible_agreement": 0.833333,
                        "truncated": 0.166667, "prompt_format": "raw", "fewshot": 0,
                        "sampling": {"temperature": 1.0}}
    assert len(make_examples(RECORDS, "pairs")) == manifest["pairs"]
    line = low_yield_line(manifest, 0.5)
    assert line is not None and "\n" not in line
    assert "1 of 3 prompts (33.3%)" in line and "data.min_pair_yield=0.5" in line
    assert "data.prompt_format=fewshot" in line and "data.samples_per_prompt" in line and "data.temperature" in line
    assert "prompt_format" not in low_yield_line({**manifest, "prompt_format": "fewshot"}, 0.5)
    assert low_yield_line(manifest, 0.05) is None


def test_self_play_writes_the_manifest_beside_its_samples(tiny_base, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    model_dir, tok_dir = tiny_base
    model, tok = AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(tok_dir))
    data = _compose(["data.num_prompts=12", "data.samples_per_prompt=4"]).data
    path = selfplay_samples(model, tok, "tiny-s-test", data)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    records = load_records(path)
    assert manifest == selfplay_report(path)
    assert manifest == yield_manifest(records, manifest["sampling"], "raw", 0)
    assert manifest["prompts"] == 12 and manifest["samples"] == 48
    assert manifest["sampling"]["eos_token_id"] == [tok.eos_token_id] and manifest["sampling"]["top_k"] == 0
    assert manifest["sampling"]["repetition_penalty"] == 1.0 and manifest["sampling"]["num_samples"] == 4
    assert [r["prompt"] for r in records] == [p.prompt for p in synth.problems("train", 12, seed=0)]
    assert os.environ["POSTTRAIN_CACHE"] in str(path)


@pytest.mark.slow
def test_a_run_records_the_yield_and_prints_one_line_when_it_is_low(tmp_path):
    proc = launch([*FAST, "data.min_pair_yield=0.99"], tmp_path, check=True)
    result = read_json(next((tmp_path / "outputs/run").rglob("result.json")))
    data = result["data"]
    assert data["prompts"] == 64 and 0 < data["pairs"] < 64 and data["prompt_format"] == "raw"
    assert data["pairs"] == result["train"]["dataset_size"]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "low pair yield" in line]
    assert len(lines) == 1 and f"{data['pairs']} of 64 prompts" in lines[0]
