"""Training data as the study made it (OXRL, arXiv 2603.19335, "Training data").

For each training prompt, ``samples_per_prompt`` completions from the base at temperature 1.0, each checked
against the gold answer (strict ``#### N``, as lm-eval's strict-match); chosen = a correct sample, rejected = an
incorrect one, prompts without both dropped. The samples are generated once per (base model, data block) and
cached, so every algorithm and seed at a scale trains on identical data; the run seed never enters here.

**Prompt format** (``data.prompt_format``; :func:`training_prompts` is the one source of formatted prompts, for
self-play and for online methods alike):

- ``raw``: the problem's own prompt, ``Question: {question}\nAnswer:`` (lm-eval gsm8k's ``doc_to_text``), 0-shot.
  The embedded tiny scales keep it: a character model trained on single problems cannot read a few-shot prompt.
- ``fewshot`` (the real scales' default): lm-eval gsm8k's own few-shot prompt, ``data.fewshot`` solved examples
  ``Question: {question}\nAnswer: {answer}`` (the worked answer ending in ``#### N``) joined and followed by
  lm-eval's fewshot delimiter ``\n\n``, then the problem's prompt. An Instruct model asked 0-shot rarely ends its
  answer with ``#### N`` (the study saw strict-match 10.7% against flexible 62.9% at 3B even 8-shot), and strict
  checking then leaves few prompts with both a correct and a wrong sample. The shots come from the training split
  (lm-eval's ``fewshot_split: train``), never the problem itself, drawn by a RNG seeded by ``data.seed`` and the
  problem's question, so a problem gets the same shots whichever other problems are drawn. Where we differ from
  lm-eval: it draws every document's shots from one RNG in document order (seed 1234); ours do not depend on order.
  Completions stop at lm-eval gsm8k's ``until`` strings (``data.stop_strings``, null = the format's own), as the
  evaluation does, since a few-shot model goes on with the next ``Question:``.

Training uses the prompt the samples were drawn with (few-shot prompts included), the one context in which the
policy produced them; ``data.max_length`` must hold it plus the completion (:func:`check_lengths` refuses a run
where it cannot, instead of silently cutting every completion away).

**Yield** (:func:`yield_manifest`): ``manifest.json`` beside ``samples.jsonl`` counts prompts, samples, pairs
(prompts with both a correct and an incorrect sample), strict and flexible accuracy (lm-eval's two gsm8k filters)
and how often the two agree, with the sampling settings that ran (:func:`posttrain.rollout.sampling_record`);
:func:`selfplay_report` returns it for result.json and :func:`low_yield_line` says what to try when it is low.

From the one cached sample set come every data kind the registry names:
``pairs`` (DPO family), ``unpaired`` (KTO: chosen -> desirable, rejected -> undesirable), ``selfplay_chosen``
(the study's SFT arm: each pair's chosen trajectory; ``sft_source=all_correct`` gives classic RFT over every
correct sample), ``gold`` (the control arm: gold solutions of the same prompts, so it sees as many examples as
SFT), and ``prompts`` (prompts + answers for online methods).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from posttrain.cache import cached_dir, stable_hash
from posttrain.data import synth
from posttrain.data.gsm8k import load_gsm8k
from posttrain.rewards import is_correct_flexible, is_correct_strict
from posttrain.rollout import SamplingConfig, sample, sampling_record, stop_ids

#: 2: prompt formats and stop strings enter the key, samples stop at every EOS id of the model with its own
#: sampling defaults off (real-scale samples of version 1 mean something else), and a manifest.json is written.
SELFPLAY_VERSION = 2
DATA_KINDS = ("pairs", "unpaired", "selfplay_chosen", "gold", "prompts")
PROMPT_FORMATS = ("raw", "fewshot")
GENERATION_BACKENDS = ("hf", "vllm")  # posttrain.rollout.vllm_backend.BACKENDS (that module stays vllm-free too)
#: lm-eval gsm8k's ``fewshot_delimiter`` (the default) and ``generation_kwargs.until``.
FEWSHOT_DELIMITER = "\n\n"
LM_EVAL_GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TrainingPrompt:
    """One training problem as the policy is asked it: the formatted prompt, the gold answer and solution."""

    prompt: str
    answer: str
    gold: str  # the gold completion (" " + worked solution ending in "#### N")


def _train_split(data_cfg) -> tuple[list[synth.Problem], list[synth.Problem]]:
    """(the training problems, the pool few-shot examples come from: the whole training split)."""
    n = data_cfg.num_prompts
    if data_cfg.source == "synthetic":
        problems = synth.problems("train", int(n or 512), seed=int(data_cfg.seed))
        return problems, problems
    if data_cfg.source == "gsm8k":
        if not data_cfg.path:
            raise ValueError("data.source=gsm8k needs data.path (openai/gsm8k or a local GSM8K-format file)")
        pool = load_gsm8k(str(data_cfg.path), "train", mirror=data_cfg.get("mirror"))
        problems = list(pool)
        if n is not None:
            random.Random(int(data_cfg.seed)).shuffle(problems)
            problems = problems[: int(n)]
        return problems, pool
    raise ValueError(f"unknown data.source {data_cfg.source!r}; known: synthetic, gsm8k")


def training_problems(data_cfg) -> list[synth.Problem]:
    """The training problems with their gold solutions (synthetic train split, or GSM8K train), unformatted."""
    return _train_split(data_cfg)[0]


def prompt_format(data_cfg) -> str:
    """``data.prompt_format`` checked against :data:`PROMPT_FORMATS` (raw when the block has none)."""
    name = str(data_cfg.get("prompt_format") or "raw")
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown data.prompt_format {name!r}; known: {', '.join(PROMPT_FORMATS)}")
    return name


def fewshot_count(data_cfg) -> int:
    """Examples per prompt: ``data.fewshot`` for the fewshot format (default 8), 0 for raw prompts."""
    if prompt_format(data_cfg) != "fewshot":
        return 0
    k = int(data_cfg.get("fewshot", 8))
    if k < 0:
        raise ValueError(f"data.fewshot={k}: the number of few-shot examples cannot be negative")
    return k


def stop_strings(data_cfg) -> tuple[str, ...]:
    """``data.stop_strings``, or the prompt format's own (fewshot: lm-eval gsm8k's ``until``; raw: none)."""
    given = data_cfg.get("stop_strings")
    if given is not None:
        return tuple(str(s) for s in given)
    return LM_EVAL_GSM8K_UNTIL if prompt_format(data_cfg) == "fewshot" else ()


def draw_shots(problem: synth.Problem, pool: list[synth.Problem], k: int, seed: int) -> list[synth.Problem]:
    """``k`` examples of ``pool`` for ``problem``, never the problem itself (no copy of its question), drawn by a
    RNG seeded by ``seed`` and the question (the same shots whatever else is drawn)."""
    others = [p for p in pool if p.question != problem.question]
    if k > len(others):
        raise ValueError(f"data.fewshot={k} but the training split has only {len(others)} other problems; "
                         "lower data.fewshot")
    return random.Random(f"fewshot:{seed}:{problem.question}").sample(others, k)


def fewshot_prompt(problem: synth.Problem, shots: list[synth.Problem]) -> str:
    """lm-eval gsm8k's few-shot context: ``doc_to_text + target_delimiter + doc_to_target`` per shot, each followed
    by the fewshot delimiter, then the problem's ``doc_to_text``."""
    return "".join(shot.prompt + shot.completion + FEWSHOT_DELIMITER for shot in shots) + problem.prompt


def training_prompts(data_cfg) -> list[TrainingPrompt]:
    """The training problems as the policy is asked them (``data.prompt_format``): self-play and online methods
    both take their prompts from here."""
    problems, pool = _train_split(data_cfg)
    if prompt_format(data_cfg) == "raw":
        return [TrainingPrompt(p.prompt, p.answer, p.completion) for p in problems]
    k, seed = fewshot_count(data_cfg), int(data_cfg.seed)
    return [TrainingPrompt(fewshot_prompt(p, draw_shots(p, pool, k, seed)), p.answer, p.completion)
            for p in problems]


def check_lengths(tokenizer, prompts: list[str], max_length: int, max_new_tokens: int) -> int:
    """The longest prompt in tokens; a ValueError naming the fix when it and ``max_new_tokens`` exceed
    ``max_length`` (the training sequence would lose its completion, all of it for a long few-shot prompt)."""
    longest = max((len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]), default=0)
    if longest + int(max_new_tokens) > int(max_length):
        raise ValueError(f"data.max_length={max_length} cannot hold the longest training prompt ({longest:,} tokens) "
                         f"plus max_new_tokens={max_new_tokens}: set data.max_length={longest + int(max_new_tokens)} "
                         "or more, or lower data.fewshot")
    return longest


def generation_backend(data_cfg) -> str:
    """``data.generation_backend``: hf (generate, the default) or vllm (posttrain.rollout.vllm_backend)."""
    name = str(data_cfg.get("generation_backend") or "hf")
    if name not in GENERATION_BACKENDS:
        raise ValueError(f"unknown data.generation_backend {name!r}; known: {', '.join(GENERATION_BACKENDS)}")
    return name


def sampling_config(data_cfg) -> SamplingConfig:
    """The self-play sampler settings of a data block."""
    return SamplingConfig(num_samples=int(data_cfg.samples_per_prompt), temperature=float(data_cfg.temperature),
                          top_p=float(data_cfg.top_p), max_new_tokens=int(data_cfg.max_new_tokens),
                          stop_strings=stop_strings(data_cfg), batch_size=int(data_cfg.generation_batch_size),
                          backend=generation_backend(data_cfg))


def selfplay_record(cfg: SamplingConfig, stops: list[int], pad_id: int | None, precision: str = "fp32") -> dict:
    """What the self-play samples are drawn with (the manifest's ``sampling``, part of the cache key):
    :func:`posttrain.rollout.sampling_record`, plus ``precision`` when not fp32 and ``backend`` when not hf (the
    keys of fp32 / hf sample sets stay as they were; another backend draws other samples from the same seed)."""
    record = sampling_record(cfg, stops, pad_id)
    if precision != "fp32":
        record = {**record, "precision": precision}
    if cfg.backend != "hf":
        record = {**record, "backend": cfg.backend}
    return record


def _selfplay_key(base_id: str, data_cfg, sampling: dict) -> str:
    fields = ("source", "path", "num_prompts", "samples_per_prompt", "temperature", "top_p", "max_new_tokens",
              "seed")
    return stable_hash({"v": SELFPLAY_VERSION, "base": base_id, **{f: data_cfg.get(f) for f in fields},
                        "prompt_format": prompt_format(data_cfg), "fewshot": fewshot_count(data_cfg),
                        "sampling": sampling})


def yield_manifest(records: list[dict], sampling: dict | None = None, prompt_fmt: str = "raw",
                   fewshot: int = 0) -> dict:
    """What a self-play sample set yields, from its records (``samples``, ``answer``, ``correct`` = strict).

    ``pairs``: prompts with at least one strict-correct and one strict-incorrect sample (what ``make_examples``
    turns into pairs); ``strict_accuracy`` / ``flexible_accuracy``: shares of samples that lm-eval gsm8k's
    strict-match / flexible-extract filters score correct; ``strict_flexible_agreement``: share of samples the
    two checks score alike; ``truncated``: share that reached max_new_tokens without a stop.
    """
    n_prompts = len(records)
    strict = [bool(ok) for r in records for ok in r["correct"]]
    flexible = [is_correct_flexible(s, r["answer"]) for r in records for s in r["samples"]]
    truncated = [bool(t) for r in records for t in r.get("truncated", [])]
    pairs = sum(1 for r in records if any(r["correct"]) and not all(r["correct"]))
    n = len(strict)

    def share(values) -> float:
        return round(sum(values) / len(values), 6) if values else 0.0

    return {"prompts": n_prompts, "samples": n, "pairs": pairs,
            "pair_yield": round(pairs / n_prompts, 6) if n_prompts else 0.0,
            "strict_accuracy": share(strict), "flexible_accuracy": share(flexible),
            "strict_flexible_agreement": share([a == b for a, b in zip(strict, flexible)]),
            "truncated": share(truncated), "prompt_format": prompt_fmt, "fewshot": int(fewshot),
            "sampling": sampling or {}}


def low_yield_line(manifest: dict, min_pair_yield: float) -> str | None:
    """One line when the pair yield is below ``min_pair_yield``, saying what to try; None otherwise."""
    got = float(manifest.get("pair_yield", 0.0))
    if got >= float(min_pair_yield):
        return None
    tries = [] if manifest.get("prompt_format") == "fewshot" else ["data.prompt_format=fewshot"]
    tries += ["more samples (data.samples_per_prompt)", "a higher data.temperature"]
    return (f"[self-play] low pair yield: {manifest.get('pairs', 0)} of {manifest.get('prompts', 0)} prompts "
            f"({got:.1%}) have both a correct and an incorrect sample, below data.min_pair_yield={min_pair_yield} "
            f"(strict accuracy {manifest.get('strict_accuracy', 0.0):.1%}, flexible "
            f"{manifest.get('flexible_accuracy', 0.0):.1%}); try " + ", ".join(tries))


def selfplay_samples(model, tokenizer, base_id: str, data_cfg, *, precision: str = "fp32") -> Path:
    """Generate (or reuse) the cached sample file ``samples.jsonl`` (and its ``manifest.json``) for this base and
    data block. ``base_id`` is the configured model id (a hub id, not where a mirror keeps it: moving the mirror
    must not regenerate the data); ``precision`` (``trainer.precision``) is what the sampling computes in."""
    cfg = sampling_config(data_cfg)
    record = selfplay_record(cfg, stop_ids(model, tokenizer), tokenizer.pad_token_id, precision)
    fmt = prompt_format(data_cfg)

    def build(tmp: Path) -> None:
        prompts = training_prompts(data_cfg)
        rollouts = sample(model, tokenizer, [p.prompt for p in prompts], cfg, seed=int(data_cfg.seed),
                          progress=True, desc="self-play")
        if cfg.backend == "vllm":  # training needs the GPU memory the engine holds
            from posttrain.rollout.vllm_backend import release

            release()
        records = []
        with open(tmp / "samples.jsonl", "w") as handle:
            for problem, rollout in zip(prompts, rollouts):
                correct = [is_correct_strict(c, problem.answer) for c in rollout.completions]
                records.append({"prompt": problem.prompt, "answer": problem.answer, "gold": problem.gold,
                                "samples": rollout.completions, "correct": correct, "truncated": rollout.truncated})
                handle.write(json.dumps(records[-1]) + "\n")
        manifest = yield_manifest(records, record, fmt, fewshot_count(data_cfg))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    return cached_dir("selfplay", _selfplay_key(base_id, data_cfg, record), build) / "samples.jsonl"


def selfplay_report(samples_path: Path) -> dict:
    """The yield manifest of a cached sample set (for result.json's ``data``)."""
    return json.loads((Path(samples_path).parent / MANIFEST).read_text())


def load_records(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def make_examples(records: list[dict], kind: str, *, seed: int = 0, sft_source: str = "chosen",
                  stop_strings: tuple[str, ...] = (), generation_backend: str = "hf") -> list[dict]:
    """Turn cached self-play records into the examples of one data kind (deterministic given ``seed``).

    ``stop_strings`` (the prompt format's, :func:`stop_strings`) go with the examples of the kinds online methods
    sample from (``prompts``, ``gold``), so their rollouts stop where the self-play samples did; so does
    ``generation_backend`` (:func:`generation_backend`) when it is not hf, so they sample with it.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; known: {DATA_KINDS}")
    stops = {"stop_strings": list(stop_strings)} if stop_strings else {}
    if generation_backend != "hf":
        stops["generation_backend"] = generation_backend
    if kind == "prompts":
        return [{"prompt": r["prompt"], "answer": r["answer"], **stops} for r in records]
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
        return [{"prompt": p["prompt"], "completion": p["gold"], **stops} for p in pairs]
    if sft_source == "all_correct":
        return [{"prompt": p["prompt"], "completion": c} for p in pairs for c in p["all_correct"]]
    if sft_source != "chosen":
        raise ValueError(f"unknown data.sft_source {sft_source!r}; known: chosen, all_correct")
    return [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
