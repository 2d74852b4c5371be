"""Sampling and scoring for the online families (docs/algorithms.md 4-5): one prompt's samples as a scored
:class:`Group`, the ReMax greedy baseline, DAPO's back-fill prompts, and the statistics of a step's sampling.

``sample_groups`` samples ``num_samples`` completions per prompt from the policy it is given with
:func:`posttrain.rollout.sample` (seeded by ``sampling_seed(run seed, step, salt)``, so a resumed run regenerates the
same rollouts) and scores them with :mod:`posttrain.rewards`: the task reward (``rewards``: a weighted sum of reward
functions), the RAW accuracy (``accuracy_reward``, DAPO's filter) and the score the advantages see (reward + DAPO's
soft overlong punishment - TRL's missing-EOS penalty). ``rc`` is the rollout settings
(posttrain.algorithms.hparams.ROLLOUT_DEFAULTS, filled in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain.data.collate import pad_rows
from posttrain.losses.advantages import frac_zero_std_groups
from posttrain.rewards import compute_rewards, overlong_penalty, weighted_sum
from posttrain.rollout.sampler import SamplingConfig, sample


def sampling_seed(seed: int, step: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + int(salt) * 104_729) % (2**31 - 1)


@dataclass
class Group:
    """The samples of one prompt (one example of the step) with their rewards."""

    example: int  # index into the step's examples
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    reward: torch.Tensor  # [G] task reward: weighted sum of the reward functions
    accuracy: torch.Tensor  # [G] raw accuracy (accuracy_reward)
    score: torch.Tensor  # [G] what the advantages see: reward + overlong punishment - missing-EOS penalty
    greedy_score: float | None = None  # ReMax baseline

    @property
    def informative(self) -> bool:
        """Not all-0 / all-1 in raw accuracy (DAPO's dynamic-sampling filter)."""
        return bool(self.accuracy.max() != self.accuracy.min())


@dataclass
class ScoredRollout:
    """A step's kept groups as one typed, right-padded batch (one row per completion, groups side by side): what the
    policy-gradient rollout phase computes advantages on. ``old_logps`` / ``ref_logps`` ([N, T-1], no grad) are
    filled in by the rollout phase when something consumes them (several updates per rollout, a KL)."""

    groups: list[Group]
    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T]
    scores: torch.Tensor  # [N] what the advantages see
    truncated: torch.Tensor  # [N] bool: no EOS within max_new_tokens
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    @classmethod
    def of(cls, groups: list[Group], pad_id: int, max_length: int) -> "ScoredRollout":
        batch = pad_rows([(g.prompt_ids, c) for g in groups for c in g.completion_ids], pad_id, max_length)
        return cls(groups, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                   torch.cat([g.score for g in groups]),
                   torch.tensor([t for g in groups for t in g.truncated], dtype=torch.bool))

    @property
    def mask(self) -> torch.Tensor:
        """Completion tokens aligned with per-token log-probs, [N, T-1] bool."""
        return self.completion_mask[:, 1:].bool()

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "completion_mask": self.completion_mask}


def _answer(example: dict) -> str:
    # prompts: the bare answer; gold: the full solution ending in "#### N" (lm-eval's normalisation strips the rest)
    return str(example.get("answer", example.get("completion", "")))


def score_completions(texts, answers, lengths, truncated, rc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = sorted({*rc["rewards"], rc["accuracy_reward"]})
    scored = compute_rewards(names, texts, answers)
    reward = weighted_sum({k: scored[k] for k in rc["rewards"]}, rc["rewards"])
    accuracy = scored[rc["accuracy_reward"]]
    score = reward.clone()
    frac = float(rc["overlong_buffer_frac"] or 0.0)
    if frac > 0:
        cache = max(1, int(round(frac * rc["max_new_tokens"])))
        score = score + float(rc["overlong_penalty_factor"]) * overlong_penalty(
            lengths, max_length=rc["max_new_tokens"], cache_length=min(cache, rc["max_new_tokens"] - 1))
    if rc["missing_eos_penalty"] is not None:
        score = score - float(rc["missing_eos_penalty"]) * torch.tensor(truncated, dtype=torch.float32)
    return reward, accuracy, score


def _stop_strings(examples: list[dict], indices) -> tuple[str, ...]:
    """The prompt format's stop strings, carried by the examples (a few-shot prompt stops at lm-eval's ``until``)."""
    return tuple(examples[indices[0]].get("stop_strings", ())) if len(indices) else ()


def _backend(examples: list[dict], indices) -> str:
    """``data.generation_backend``, carried by the examples like the stop strings (hf when they name none)."""
    return str(examples[indices[0]].get("generation_backend", "hf")) if len(indices) else "hf"


def sample_groups(policy, tokenizer, examples: list[dict], indices: list[int], rc: dict, seed: int) -> list[Group]:
    cfg = SamplingConfig(num_samples=rc["num_samples"], temperature=float(rc["temperature"]),
                         top_p=float(rc["top_p"]), max_new_tokens=rc["max_new_tokens"],
                         stop_strings=_stop_strings(examples, indices), batch_size=rc["generation_batch_size"],
                         backend=_backend(examples, indices))
    rollouts = sample(policy, tokenizer, [examples[i]["prompt"] for i in indices], cfg, seed=seed)
    groups = []
    for i, r in zip(indices, rollouts):
        lengths = [len(ids) for ids in r.completion_ids]
        reward, accuracy, score = score_completions(r.completions, [_answer(examples[i])] * len(r.completions),
                                                    lengths, r.truncated, rc)
        prompt_ids = tokenizer(examples[i]["prompt"], add_special_tokens=False)["input_ids"]
        groups.append(Group(i, prompt_ids, r.completion_ids, r.completions, r.truncated, reward, accuracy, score))
    return groups


def greedy_scores(policy, tokenizer, examples: list[dict], groups: list[Group], rc: dict, seed: int) -> None:
    """ReMax's baseline: one greedy decode per prompt, scored like the samples."""
    wanted = sorted({g.example for g in groups})
    cfg = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=rc["max_new_tokens"],
                         stop_strings=_stop_strings(examples, wanted), batch_size=rc["generation_batch_size"],
                         backend=_backend(examples, wanted))
    rollouts = sample(policy, tokenizer, [examples[i]["prompt"] for i in wanted], cfg, seed=seed)
    by_example = {}
    for i, r in zip(wanted, rollouts):
        _, _, score = score_completions(r.completions, [_answer(examples[i])], [len(r.completion_ids[0])],
                                        r.truncated, rc)
        by_example[i] = float(score[0])
    for g in groups:
        g.greedy_score = by_example[g.example]


def rollout_stats(groups: list[Group]) -> dict[str, float]:
    """What a step's sampling looked like (over every group sampled first, before any filtering)."""
    if not groups:
        return {}
    reward = torch.cat([g.reward for g in groups])
    score = torch.cat([g.score for g in groups])
    accuracy = torch.cat([g.accuracy for g in groups])
    lengths = torch.tensor([len(c) for g in groups for c in g.completion_ids], dtype=torch.float32)
    truncated = torch.tensor([t for g in groups for t in g.truncated], dtype=torch.float32)
    sizes = {len(g.reward) for g in groups}
    frac_zero = (frac_zero_std_groups(score, sizes.pop()) if len(sizes) == 1
                 else sum(float(g.score.max() == g.score.min()) for g in groups) / len(groups))
    return {
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,
        "accuracy_mean": float(accuracy.mean()),
        "score_mean": float(score.mean()),
        "frac_zero_std_groups": frac_zero,
        "completion_length_mean": float(lengths.mean()),
        "truncated_frac": float(truncated.mean()),
    }


def draw_prompts(pool: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` prompts of the training set for a dynamic-sampling round (distinct within the round, seeded)."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in (order * math.ceil(n / len(pool)))[:n]]
