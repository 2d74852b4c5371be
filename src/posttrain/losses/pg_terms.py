"""Building blocks of the policy-gradient losses (docs/algorithms.md 0 and 5): Schulman's KL estimators, the
aggregations of a per-token loss, PPO clipping and sequence-level ratios. Pure tensor functions; the methods that
combine them are in :mod:`posttrain.losses.policy_gradient`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.losses._common import clamped_exp as _exp

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
# ---------------------------------------------------------------------------------------------------------------------
# building blocks


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on sampled tokens (Schulman's k1/k2/k3; docs/algorithms.md 0).

    With ``u = ref_logps - logps``: k1 = -u, k2 = u^2/2, k3 = exp(u) - u - 1 (>= 0, GRPO's choice).
    """
    if estimator not in _KL:
        raise ValueError(f"unknown kl_estimator {estimator!r}; known: {list(KL_ESTIMATORS)}")
    return _KL[estimator](ref_logps - logps)


#: Schulman's estimators of u = ref_logps - logps.
_KL = {"k1": lambda u: -u, "k2": lambda u: 0.5 * u * u, "k3": lambda u: _exp(u) - u - 1.0}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, *, num_items: float | int | None = None,
              max_completion_length: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` (or ``[B, 1]``, broadcast) over ``mask`` to a scalar.

    - ``token_mean``: sum over valid tokens / ``num_items`` (or this micro-batch's token count when None);
    - ``seq_mean_token_mean``: mean over sequences of each sequence's token mean (TRL ``grpo``);
    - ``seq_mean_token_sum``: mean over sequences of each sequence's token sum;
    - ``seq_mean_token_sum_norm``: sum over valid tokens / (B * ``max_completion_length``) (TRL ``dr_grpo``).
    """
    if how not in _AGGREGATE:
        raise ValueError(f"unknown aggregation {how!r}; known: {list(AGGREGATIONS)}")
    m = mask.to(per_token.dtype)
    return _AGGREGATE[how](per_token * m, m, num_items, max_completion_length)


def _token_mean(masked, m, num_items, max_len):
    denom = m.sum() if num_items is None else torch.as_tensor(float(num_items), dtype=masked.dtype,
                                                              device=masked.device)
    return masked.sum() / denom.clamp(min=1.0)


def _seq_mean_token_sum_norm(masked, m, num_items, max_len):
    if max_len is None or max_len <= 0:
        raise ValueError("seq_mean_token_sum_norm (dr_grpo) needs a positive max_completion_length")
    return masked.sum() / (m.shape[0] * float(max_len))


_AGGREGATE = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": lambda masked, m, n, L: (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).mean(),
    "seq_mean_token_sum": lambda masked, m, n, L: masked.sum(-1).mean(),
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    x = x.expand_as(m) if x.shape != m.shape else x
    n = m.sum()
    return float((x * m).sum() / n) if n > 0 else float("nan")


@dataclass
class Terms:
    """What one method computes before aggregation (shared by the loss and its diagnostics)."""

    per_token: torch.Tensor  # [B, T] policy term (without KL)
    ratio: torch.Tensor  # [B, T] token ratios or [B, 1] sequence ratios (what is clipped)
    clipped_low: torch.Tensor | None  # bool, same shape as ratio broadcast with advantages
    clipped_high: torch.Tensor | None
    aggregation: str


def clip_flags(ratio, adv, lo, hi):
    """Where PPO clipping is active (the gradient through the ratio is zero): TRL's region definition."""
    low = (ratio < lo) & (adv < 0) if lo is not None else torch.zeros_like(ratio * adv, dtype=torch.bool)
    high = (ratio > hi) & (adv > 0) if hi is not None else torch.zeros_like(ratio * adv, dtype=torch.bool)
    return low, high


def bounds(eps_low, eps_high):
    lo = None if eps_low is None else 1.0 - float(eps_low)
    hi = None if eps_high is None else 1.0 + float(eps_high)
    return lo, hi


def ppo_clip(ratio, adv, eps_low, eps_high, delta=None):
    """``-min(w A, clip(w, 1-eps_low, 1+eps_high) A)``; ``delta`` caps the unclipped ratio (INTELLECT-2)."""
    lo, hi = bounds(eps_low, eps_high)
    clipped = torch.clamp(ratio, min=lo, max=hi)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=float(delta))
    low, high = clip_flags(ratio, adv, lo, hi)
    return -torch.min(unclipped * adv, clipped * adv), low, high


def sequence_log_ratio(log_ratio, mask, normalize: bool):
    m = mask.to(log_ratio.dtype)
    s = (log_ratio * m).sum(-1, keepdim=True)
    return s / m.sum(-1, keepdim=True).clamp(min=1.0) if normalize else s
