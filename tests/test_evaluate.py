"""The embedded tasks through lm-eval's own machinery: an oracle scores 1.0, a wrong answerer 0.0."""

from __future__ import annotations

import json

import pytest
from lm_eval.api.model import LM
from omegaconf import OmegaConf

from posttrain.evaluate.harness import EMBEDDED, embedded_task_dir, evaluate_lm


def _docs(task_dir, task):
    with open(task_dir / f"{task}_test.jsonl") as handle:
        return [json.loads(line) for line in handle]


class Oracle(LM):
    """Answers from the task files: right (``wrong=False``) or off by one, in the `#### N` format or not."""

    def __init__(self, task_dir, *, wrong: bool, strict_format: bool = True):
        super().__init__()
        self.wrong, self.strict = wrong, strict_format
        self.solutions = {}
        for task in ("synth_gsm8k", "synth_math"):
            for doc in _docs(task_dir, task):
                self.solutions[f"Question: {doc['question']}\nAnswer:"] = doc["answer"]
        self.mc = {f"Question: {d['question']}\nAnswer:": d["choices"][d["label"]] for d in _docs(task_dir, "synth_mc")}

    def generate_until(self, requests):
        out = []
        for req in requests:
            context = req.args[0]
            solution = self.solutions[context]
            answer = int(solution.rsplit("#### ", 1)[1]) + (1 if self.wrong else 0)
            work = solution.rsplit("\n", 1)[0]
            out.append(f" {work}\n#### {answer:,}" if self.strict else f" {work}\nso the answer is ${answer}.")
        return out

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            context, continuation = req.args
            gold = self.mc[context]
            right = continuation.strip() == gold
            out.append((0.0 if right != self.wrong else -10.0, True))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


CFG = OmegaConf.create({"tasks": sorted(EMBEDDED), "num_fewshot": 0, "limit": 40, "apply_chat_template": False,
                        "max_gen_toks": 160, "batch_size": 8})


@pytest.fixture(scope="module")
def task_dir():
    return embedded_task_dir(160)


def test_oracle_scores_one_and_wrong_answers_zero_through_lm_eval_filters(task_dir):
    right = evaluate_lm(Oracle(task_dir, wrong=False), CFG)
    wrong = evaluate_lm(Oracle(task_dir, wrong=True), CFG)
    for task in ("synth_gsm8k", "synth_math"):
        assert right[task]["exact_match,strict-match"] == 1.0 and right[task]["exact_match,flexible-extract"] == 1.0
        assert wrong[task]["exact_match,strict-match"] == 0.0 and wrong[task]["exact_match,flexible-extract"] == 0.0
        assert "exact_match_stderr,strict-match" in right[task]
    assert right["synth_mc"]["acc,none"] == 1.0 and wrong["synth_mc"]["acc,none"] == 0.0
    assert "acc_norm,none" in right["synth_mc"]
    assert all(isinstance(v, float) for m in right.values() for v in m.values()), "non-numeric entries dropped"


def test_strict_match_needs_the_gsm8k_format_while_flexible_extract_does_not(task_dir):
    scores = evaluate_lm(Oracle(task_dir, wrong=False, strict_format=False), CFG)
    assert scores["synth_gsm8k"]["exact_match,strict-match"] == 0.0
    assert scores["synth_gsm8k"]["exact_match,flexible-extract"] == 1.0


def test_unknown_embedded_task_is_refused_with_the_known_names(task_dir):
    with pytest.raises(ValueError, match="synth_gsm8k"):
        evaluate_lm(Oracle(task_dir, wrong=False), OmegaConf.merge(CFG, {"tasks": ["synth_nope"]}))
