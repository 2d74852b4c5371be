"""Training data as the study made it (OXRL, arXiv 2603.19335, "Training data").

For each training prompt, ``samples_per_prompt`` completions from the base at temperature 1.0, each checked
against the gold answer (strict ``#### N``, as lm-eval's strict-match); chosen = a correct sample, rejected = an
incorrect one, prompts without both dropped. The samples are generated once per (base model, data block) and
cached, so every algorithm and seed at a scale trains on identical data; the run seed never enters here.

From the one cached sample set come every data kind the registry names:
``pairs`` (DPO family), ``unpaired`` (KTO: chosen -> desirable, rejected -> undesirable), ``selfplay_chosen``
(the study's SFT arm: each pair's chosen trajectory; ``sft_source=all_correct`` gives classic RFT over every
correct sample), ``gold`` (the control arm: gold solutions of the same prompts, so it sees as many examples as
SFT), and ``prompts`` (prompts + answers for online methods).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain.cache import cached_dir, stable_hash
from posttrain.data import synth
from posttrain.data.gsm8k import load_gsm8k
from posttrain.rewards import answers_match, extract_strict
from posttrain.rollout import SamplingConfig, sample

SELFPLAY_VERSION = 1
DATA_KINDS = ("pairs", "unpaired", "selfplay_chosen", "gold", "prompts")


def training_problems(data_cfg) -> list[synth.Problem]:
    """The training prompts with their gold solutions (synthetic train split, or GSM8K train)."""
    n = data_cfg.num_prompts
    if data_cfg.source == "synthetic":
        return synth.problems("train", int(n or 512), seed=int(data_cfg.seed))
    if data_cfg.source == "gsm8k":
        if not data_cfg.path:
            raise ValueError("data.source=gsm8k needs data.path (openai/gsm8k or a local GSM8K-format file)")
        problems = load_gsm8k(str(data_cfg.path), "train")
        if n is not None:
            random.Random(int(data_cfg.seed)).shuffle(problems)
            problems = problems[: int(n)]
        return problems
    raise ValueError(f"unknown data.source {data_cfg.source!r}; known: synthetic, gsm8k")


def _selfplay_key(base_id: str, data_cfg) -> str:
    fields = ("source", "path", "num_prompts", "samples_per_prompt", "temperature", "top_p", "max_new_tokens",
              "seed")
    return stable_hash({"v": SELFPLAY_VERSION, "base": base_id, **{f: data_cfg.get(f) for f in fields}})


def selfplay_samples(model, tokenizer, base_id: str, data_cfg) -> Path:
    """Generate (or reuse) the cached sample file ``samples.jsonl`` for this base and data block."""

    def build(tmp: Path) -> None:
        problems = training_problems(data_cfg)
        cfg = SamplingConfig(num_samples=int(data_cfg.samples_per_prompt), temperature=float(data_cfg.temperature),
                             top_p=float(data_cfg.top_p), max_new_tokens=int(data_cfg.max_new_tokens),
                             batch_size=int(data_cfg.generation_batch_size))
        rollouts = sample(model, tokenizer, [p.prompt for p in problems], cfg, seed=int(data_cfg.seed),
                          progress=True, desc="self-play")
        with open(tmp / "samples.jsonl", "w") as handle:
            for problem, rollout in zip(problems, rollouts):
                correct = [answers_match(extract_strict(c), problem.answer) for c in rollout.completions]
                handle.write(json.dumps({"prompt": problem.prompt, "answer": problem.answer,
                                         "gold": problem.completion, "samples": rollout.completions,
                                         "correct": correct}) + "\n")

    return cached_dir("selfplay", _selfplay_key(base_id, data_cfg), build) / "samples.jsonl"


def load_records(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def make_examples(records: list[dict], kind: str, *, seed: int = 0, sft_source: str = "chosen") -> list[dict]:
    """Turn cached self-play records into the examples of one data kind (deterministic given ``seed``)."""
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; known: {DATA_KINDS}")
    if kind == "prompts":
        return [{"prompt": r["prompt"], "answer": r["answer"]} for r in records]
    rng = random.Random(seed)
    pairs = []
    for r in records:
        good = [s for s, ok in zip(r["samples"], r["correct"]) if ok]
        bad = [s for s, ok in zip(r["samples"], r["correct"]) if not ok]
        if good and bad:
            pairs.append({"prompt": r["prompt"], "chosen": rng.choice(good), "rejected": rng.choice(bad),
                          "gold": r["gold"], "all_correct": sorted(set(good))})
    if kind == "pairs":
        return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    if kind == "unpaired":
        out = []
        for p in pairs:
            out.append({"prompt": p["prompt"], "completion": p["chosen"], "desirable": True})
            out.append({"prompt": p["prompt"], "completion": p["rejected"], "desirable": False})
        return out
    if kind == "gold":
        return [{"prompt": p["prompt"], "completion": p["gold"]} for p in pairs]
    if sft_source == "all_correct":
        return [{"prompt": p["prompt"], "completion": c} for p in pairs for c in p["all_correct"]]
    if sft_source != "chosen":
        raise ValueError(f"unknown data.sft_source {sft_source!r}; known: chosen, all_correct")
    return [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
