"""Reward functions of online RL on (completion text, gold answer), built on the lm-eval-compatible extraction of
``posttrain.rewards.answers`` so that a reward of 1 means exactly what the evaluation's exact_match means.

Scalar checks (one completion): ``is_correct_strict``, ``is_correct_flexible``, ``is_well_formatted``.
Batched rewards (``(completions, answers) -> Tensor[N]``, float32), by name in ``REWARD_FUNCTIONS``:

- ``strict``: 1/0, the answer after the first ``#### `` (lm-eval gsm8k strict-match) equals the gold answer;
- ``flexible``: 1/0, the last number in the text (lm-eval flexible-extract) equals the gold answer;
- ``format``: 1/0, the completion ends with one well-formed ``#### N`` line (see ``is_well_formatted``).

Also ``overlong_penalty`` (DAPO's soft overlong punishment, on token lengths) and ``weighted_sum`` to combine several
named rewards. The gold answer may be the bare number (``"1,234"``) or a full GSM8K solution ending in ``#### N``:
lm-eval's normalisation strips everything up to ``#### `` on both sides.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import torch

from posttrain.rewards.answers import answers_match, extract_flexible, extract_strict

# A plain number: optional sign, digits with optional thousands commas, optional decimals.
ANSWER_LINE_RE = re.compile(r"#### -?[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?")


def is_correct_strict(completion: str, answer: str) -> bool:
    """lm-eval gsm8k strict-match + exact_match: the first ``#### N`` of the completion matches ``answer``."""
    return answers_match(extract_strict(completion), answer)


def is_correct_flexible(completion: str, answer: str) -> bool:
    """lm-eval gsm8k flexible-extract + exact_match: the last number-like span matches ``answer``."""
    return answers_match(extract_flexible(completion), answer)


def is_well_formatted(completion: str) -> bool:
    """True when ``####`` occurs exactly once, on the last non-empty line, and that line is ``#### N`` with N a plain
    number (``-?`` digits, optional ``,`` thousands groups, optional decimals; trailing spaces allowed). Such a
    completion always has a strict-match answer."""
    text = completion or ""
    if text.count("####") != 1:
        return False
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return bool(lines) and ANSWER_LINE_RE.fullmatch(lines[-1]) is not None


def _as_tensor(values) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _check_pairs(completions: Sequence[str], answers: Sequence[str]) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")


def strict_reward(completions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """1.0 where ``is_correct_strict``, else 0.0; float32 ``[N]``."""
    _check_pairs(completions, answers)
    return _as_tensor(is_correct_strict(c, a) for c, a in zip(completions, answers))


def flexible_reward(completions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """1.0 where ``is_correct_flexible``, else 0.0; float32 ``[N]``."""
    _check_pairs(completions, answers)
    return _as_tensor(is_correct_flexible(c, a) for c, a in zip(completions, answers))


def format_reward(completions: Sequence[str], answers: Sequence[str] | None = None) -> torch.Tensor:
    """1.0 where ``is_well_formatted``, else 0.0; float32 ``[N]`` (``answers`` unused, accepted for uniformity)."""
    if answers is not None:
        _check_pairs(completions, answers)
    return _as_tensor(is_well_formatted(c) for c in completions)


REWARD_FUNCTIONS: dict[str, Callable[[Sequence[str], Sequence[str]], torch.Tensor]] = {
    "strict": strict_reward,
    "flexible": flexible_reward,
    "format": format_reward,
}


def compute_rewards(names: Sequence[str], completions: Sequence[str],
                    answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{name: REWARD_FUNCTIONS[name](completions, answers)}``; ValueError listing the known names otherwise."""
    unknown = [n for n in names if n not in REWARD_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}; known: {sorted(REWARD_FUNCTIONS)}")
    return {n: REWARD_FUNCTIONS[n](completions, answers) for n in names}


def overlong_penalty(lengths, *, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13) on completion lengths in tokens:
    0 up to ``max_length - cache_length``, then falling linearly to -1 at ``max_length``, and -1 beyond it.
    Added to the task reward (e.g. through ``weighted_sum``)."""
    if cache_length <= 0 or max_length <= cache_length:
        raise ValueError(f"need 0 < cache_length < max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    start = float(max_length - cache_length)
    ramp = (start - lengths) / float(cache_length)
    out = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), out)


def weighted_sum(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_k weights[k] * rewards[k]`` (TRL's multi-reward ``sum_then_normalize`` before the advantage).

    Every reward needs a weight and every weight a reward (ValueError naming the odd keys otherwise); all rewards
    must share one shape."""
    if not rewards:
        raise ValueError("weighted_sum needs at least one reward")
    missing, extra = sorted(set(rewards) - set(weights)), sorted(set(weights) - set(rewards))
    if missing or extra:
        raise ValueError(f"reward/weight names differ: no weight for {missing}, no reward for {extra}")
    shapes = {k: tuple(torch.as_tensor(v).shape) for k, v in rewards.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"rewards have different shapes: {shapes}")
    total = None
    for key in sorted(rewards):
        term = float(weights[key]) * torch.as_tensor(rewards[key], dtype=torch.float32)
        total = term if total is None else total + term
    return total
