"""The study's evaluation (gsm8k 8-shot, minerva_math 4-shot, arc_challenge, hellaswag, winogrande) through
lm-eval's own task definitions, from a local mirror with the hub offline: an oracle answering right scores 1.0 and
a wrong one 0.0 on every task and metric, MATH included (lm-eval's own minerva_math code, in the antlr4 4.11
window); the configured max_gen_toks is what the generate_until requests carry; a missing mirror entry is one line.

The 4.11 runtime is fetched from PyPI into POSTTRAIN_CACHE once per machine (posttrain.evaluate.math_runtime).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys

import pytest
from lm_eval.api.model import LM
from omegaconf import OmegaConf

from posttrain.evaluate import math_runtime
from posttrain.evaluate.harness import evaluate_lm
from posttrain.mirror import MirrorMissing
from study_mirror import MATH_CONFIGS, write_study_datasets

MATH_TASKS = ["minerva_math_algebra", "minerva_math_counting_and_prob", "minerva_math_geometry",
              "minerva_math_intermediate_algebra", "minerva_math_num_theory", "minerva_math_prealgebra",
              "minerva_math_precalc"]
STUDY = OmegaConf.create({
    "tasks": ["gsm8k", "minerva_math", "arc_challenge", "hellaswag", "winogrande"],
    "num_fewshot": {"gsm8k": 8, "minerva_math": 4, "arc_challenge": 0, "hellaswag": 0, "winogrande": 0},
    "limit": None, "apply_chat_template": False, "max_gen_toks": 77, "batch_size": 8})
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class Oracle(LM):
    """Answers each document from its gold (read from the document lm-eval hands over), right or off by one.

    gsm8k: a worked answer ending in ``#### N``; minerva_math: lm-eval's "Final Answer: The final answer is $X$."
    with X written as ``\\frac{2N}{2}`` (not the gold string), so lm-eval's exact_match has to parse it with
    sympy's LaTeX parser; multiple choice: log-likelihood 0 for the gold choice, -10 for the others."""

    def __init__(self, *, wrong: bool):
        super().__init__()
        self.wrong = wrong
        self.generate_requests: list[tuple[str, str, dict]] = []  # (task, context, generation kwargs)

    def generate_until(self, requests):
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            self.generate_requests.append((req.task_name, context, dict(gen_kwargs)))
            doc, shift = req.doc, 1 if self.wrong else 0
            if req.task_name.startswith("minerva_math"):
                assert doc["problem"] in context
                n = int(doc["answer"]) + shift
                out.append(f" Adding gives {n}.\nFinal Answer: The final answer is $\\frac{{{2 * n}}}{{2}}$. "
                           f"I hope it is correct.")
            else:
                assert doc["question"] in context
                n = int(doc["answer"].rsplit("#### ", 1)[1]) + shift
                out.append(f" {doc['answer'].rsplit(chr(10), 1)[0]}\n#### {n}")
        return out

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            doc, task = req.doc, req.task_name
            if task == "arc_challenge":
                gold = doc["choices"]["label"].index(doc["answerKey"])
            elif task == "hellaswag":
                gold = int(doc["label"])
            else:  # winogrande: answer "1" or "2"
                gold = int(doc["answer"]) - 1
            out.append((0.0 if (req.idx == gold) != self.wrong else -10.0, True))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    write_study_datasets(root, rows=3)
    return root


@pytest.fixture(scope="module")
def runs(mirror):
    """Right and wrong oracles over the whole study profile, hub offline; also the antlr4 state around them."""
    math_runtime.ensure()
    antlr_before = sys.modules.get("antlr4") or __import__("antlr4")
    version_before = importlib.metadata.version("antlr4-python3-runtime")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        right, wrong = Oracle(wrong=False), Oracle(wrong=True)
        generation: dict = {}
        scores_right = evaluate_lm(right, STUDY, mirror=str(mirror), generation=generation)
        scores_wrong = evaluate_lm(wrong, STUDY, mirror=str(mirror))
    return {"right": scores_right, "wrong": scores_wrong, "oracle": right, "generation": generation,
            "antlr_before": antlr_before, "version_before": version_before}


def _metrics(scores, task):
    return {k: v for k, v in scores[task].items() if "stderr" not in k and k != "sample_len"}


def test_right_oracle_scores_one_and_wrong_zero_on_every_study_task_and_metric(runs):
    expected = {"gsm8k": {"exact_match,strict-match", "exact_match,flexible-extract"},
                "minerva_math": {"exact_match,none", "math_verify,none"},
                "arc_challenge": {"acc,none", "acc_norm,none"},
                "hellaswag": {"acc,none", "acc_norm,none"},
                "winogrande": {"acc,none"}}
    expected.update({task: {"exact_match,none", "math_verify,none"} for task in MATH_TASKS})
    for task, metrics in expected.items():
        assert set(_metrics(runs["right"], task)) == metrics, task
        assert all(v == 1.0 for v in _metrics(runs["right"], task).values()), (task, runs["right"][task])
        assert all(v == 0.0 for v in _metrics(runs["wrong"], task).values()), (task, runs["wrong"][task])
    # every document came from the mirror: 3 per task, 7 x 3 for the group
    assert runs["right"]["gsm8k"]["sample_len"] == 3 and runs["right"]["minerva_math"]["sample_len"] == 21
    assert len(MATH_CONFIGS) == len(MATH_TASKS)


def test_few_shot_prompts_are_lm_evals_own(runs):
    gsm8k = [ctx for task, ctx, _ in runs["oracle"].generate_requests if task == "gsm8k"]
    math = [ctx for task, ctx, _ in runs["oracle"].generate_requests if task.startswith("minerva_math")]
    assert len(gsm8k) == 3 and len(math) == 21
    for ctx in gsm8k:  # 8 solved examples from the mirror's train split, then the test question
        assert ctx.count("Question: [train ") == 8 and ctx.count("Question: [test ") == 1
        assert ctx.endswith("\nAnswer:")
    for ctx in math:  # lm-eval's 4 fixed minerva examples, then the problem
        assert ctx.count("Problem:\n") == 5 and "Final Answer: The final answer is $[2,5)$" in ctx


def test_configured_max_gen_toks_reaches_every_generate_until_request(runs):
    requests = runs["oracle"].generate_requests
    assert {task for task, _, _ in requests} == {"gsm8k", *MATH_TASKS}
    assert all(kwargs["max_gen_toks"] == 77 for _, _, kwargs in requests)
    generation = runs["generation"]  # what result.json records: the kwargs each task ran with
    assert set(generation) == {"gsm8k", *MATH_TASKS}
    assert generation["gsm8k"]["max_gen_toks"] == 77 and generation["gsm8k"]["until"][0] == "Question:"
    assert all(generation[t]["max_gen_toks"] == 77 and generation[t]["until"] == ["Problem:"] for t in MATH_TASKS)


def test_embedded_tasks_also_get_the_configured_max_gen_toks():
    oracle = Oracle(wrong=False)
    seen = []
    oracle.generate_until = lambda requests: [seen.append(r.args[1]["max_gen_toks"]) or " #### 1" for r in requests]
    cfg = OmegaConf.create({"tasks": ["synth_gsm8k"], "num_fewshot": 0, "limit": 2, "apply_chat_template": False,
                            "max_gen_toks": 33, "batch_size": 8})
    generation: dict = {}
    evaluate_lm(oracle, cfg, generation=generation)
    assert seen == [33, 33] and generation["synth_gsm8k"]["max_gen_toks"] == 33


def test_antlr_4_9_world_is_back_after_math_scoring(runs):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert sys.modules["antlr4"] is runs["antlr_before"]
    assert importlib.metadata.version("antlr4-python3-runtime") == runs["version_before"]
    assert OmegaConf.create({"a": 2, "b": "${a}"}).b == 2  # OmegaConf's grammar (antlr 4.9) still parses
    (override,) = OverridesParser.create().parse_overrides(["seed=range(0,3)"])
    assert list(override.sweep_iterator()) == [0, 1, 2]


def test_a_runtime_that_is_not_4_11_is_refused_not_used(tmp_path):
    (tmp_path / "antlr4").mkdir()  # no dist-info: importlib.metadata still sees 4.9.3
    with pytest.raises(math_runtime.MathRuntimeError, match="not 4.11.0"):
        with math_runtime.antlr_4_11(tmp_path):
            pass
    assert importlib.metadata.version("antlr4-python3-runtime") != math_runtime.VERSION


def test_a_missing_mirror_entry_is_one_line_naming_task_dataset_and_file(mirror, tmp_path, monkeypatch):
    partial = tmp_path / "mirror"
    shutil.copytree(mirror, partial)
    shutil.rmtree(partial / "datasets" / "Rowan")
    cfg = OmegaConf.create({**OmegaConf.to_container(STUDY), "tasks": ["hellaswag"], "num_fewshot": 0})
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(MirrorMissing) as info:
        evaluate_lm(Oracle(wrong=False), cfg, mirror=str(partial))
    message = str(info.value)
    assert "\n" not in message
    assert "lm-eval task hellaswag" in message and "Rowan/hellaswag (default)" in message
    assert str(partial / "datasets/Rowan/hellaswag/default/train.jsonl") in message
    assert "python -m posttrain.sweep prefetch" in message


def test_a_dataset_held_in_part_is_refused_even_with_the_hub_reachable(mirror, tmp_path, monkeypatch):
    partial = tmp_path / "mirror"
    shutil.copytree(mirror, partial)
    (partial / "datasets/allenai/winogrande/winogrande_xl/validation.jsonl").unlink()
    for key in OFFLINE:
        monkeypatch.delenv(key, raising=False)
    cfg = OmegaConf.create({**OmegaConf.to_container(STUDY), "tasks": ["winogrande"], "num_fewshot": 0})
    with pytest.raises(MirrorMissing, match=r"lm-eval task winogrande needs dataset allenai/winogrande "
                                            r"\(winogrande_xl\) split 'validation'"):
        evaluate_lm(Oracle(wrong=False), cfg, mirror=str(partial))
