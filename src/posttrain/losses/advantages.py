"""Advantage estimators of online RL (docs/algorithms.md section 5): pure tensor functions.

Groups are contiguous: a flat reward vector ``[N]`` with ``group_size=G`` holds ``N/G`` prompts, each with its ``G``
completions side by side (TRL's ``view(-1, G)`` convention); a 2-D ``[P, G]`` input is one prompt per row.

- ``group_zscore``: GRPO's ``(R - mean_g) / (std + eps)``; std Bessel-corrected (torch's default, as TRL);
  ``scale`` group | batch | none (TRL ``scale_rewards``). ``eps``: 1e-4 for TRL grpo (``EPS_TRL``),
  1e-8 for the study's sgrpo/gspo/cispo (``EPS_STUDY``).
- ``leave_one_out``: RLOO's ``R_i - mean_{j != i} R_j``.
- ``batch_normalize``: global whitening over the whole batch (REINFORCE++); ``reinforce_pp_advantages`` (per-token
  returns-to-go, globally normalized) and ``reinforce_pp_baseline_advantages`` (group-mean-centred, divided by the
  batch std).
- ``remax_advantages``: ``R - R_greedy``.
- ``gae``: PPO's generalized advantage estimation with returns; ``masked_whiten`` as TRL's PPO.
- ``frac_zero_std_groups``: groups whose rewards are all equal (no signal; TRL's ``frac_reward_zero_std``).
- KL folded into rewards: ``kl_shaped_token_rewards`` (PPO, REINFORCE++: ``-c*KL_t`` per token plus the score at
  the last completion token) and ``kl_penalized_scores`` (RLOO: ``R - beta * sum_t KL_t``).
"""

from __future__ import annotations

import torch

from posttrain.losses.policy_gradient import kl_estimate

EPS_TRL = 1e-4
EPS_STUDY = 1e-8
SCALES = ("group", "batch", "none")


def _grouped(rewards: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"group_size={group_size} but rewards are [P, G] with G={rewards.shape[1]}")
        return rewards
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N] or [P, G], got shape {tuple(rewards.shape)}")
    if group_size is None or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of group_size={group_size}")
    return rewards.reshape(-1, group_size)


def _group_std(grouped: torch.Tensor) -> torch.Tensor:
    if grouped.shape[1] < 2:
        return torch.zeros_like(grouped[:, :1])
    return grouped.std(dim=1, keepdim=True)  # Bessel-corrected


def group_zscore(rewards: torch.Tensor, group_size: int | None = None, *, eps: float = EPS_TRL,
                 scale: str = "group") -> torch.Tensor:
    """GRPO advantages, same shape as ``rewards``.

    ``group``: ``(R - mean_g) / (std_g + eps)``; ``batch``: ``(R - mean_g) / (std(R over the batch) + eps)`` (TRL's
    "batch"); ``none``: ``R - mean_g`` (Dr. GRPO). Groups with zero std get zero advantages. A group of one gets 0.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {list(SCALES)}")
    g = _grouped(rewards, group_size).to(torch.float32 if not rewards.is_floating_point() else rewards.dtype)
    centred = g - g.mean(dim=1, keepdim=True)
    return (centred / (_SCALE[scale](g) + eps) if _SCALE[scale] is not None else centred).reshape(rewards.shape)


def _batch_std(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(-1).std() if g.numel() > 1 else torch.zeros((), dtype=g.dtype)


#: scale_rewards -> the std the centred rewards are divided by (None: not divided, Dr. GRPO).
_SCALE = {"group": _group_std, "batch": _batch_std, "none": None}


def leave_one_out(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """RLOO: ``R_i - (sum_g R - R_i) / (G - 1)`` (= G/(G-1) * (R_i - mean_g)). Needs G >= 2."""
    g = _grouped(rewards, group_size)
    k = g.shape[1]
    if k < 2:
        raise ValueError("leave-one-out needs at least 2 completions per prompt")
    g = g.to(torch.float32 if not g.is_floating_point() else g.dtype)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(rewards.shape)


def _masked_mean_std(x: torch.Tensor, mask: torch.Tensor | None):
    if mask is None:
        vals = x.reshape(-1)
    else:
        if mask.shape != x.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from {tuple(x.shape)}")
        vals = x[mask.to(torch.bool)]
    mean = vals.mean() if vals.numel() else torch.zeros((), dtype=x.dtype)
    std = vals.std() if vals.numel() > 1 else torch.zeros((), dtype=x.dtype)
    return mean, std


def batch_normalize(x: torch.Tensor, mask: torch.Tensor | None = None, *, eps: float = EPS_STUDY,
                    center: bool = True) -> torch.Tensor:
    """Global (whole-batch) normalization: ``(x - mean) / (std + eps)`` over the valid entries (``mask``), std
    Bessel-corrected; masked-out entries come back 0. ``center=False`` only divides."""
    mean, std = _masked_mean_std(x, mask)
    out = ((x - mean) if center else x) / (std + eps)
    return out if mask is None else torch.where(mask.to(torch.bool), out, torch.zeros_like(out))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """TRL PPO's ``masked_whiten``: ``(x - mean) * rsqrt(var + eps)`` with the Bessel-corrected masked variance; with
    ``shift_mean=False`` the mean is added back (reward whitening)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def returns_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{k >= t} gamma^(k-t) r_k`` over valid tokens (masked-out positions contribute nothing, get 0)."""
    m = mask.to(torch.bool)
    r = torch.where(m, token_rewards, torch.zeros_like(token_rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(m, out, torch.zeros_like(out))


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                            eps: float = EPS_STUDY) -> torch.Tensor:
    """REINFORCE++: per-token returns-to-go (KL already folded into ``token_rewards``, see
    ``kl_shaped_token_rewards``), then ``batch_normalize`` over every valid token of the batch."""
    return batch_normalize(returns_to_go(token_rewards, mask, gamma=gamma), mask, eps=eps)


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, group_size: int | None = None, *,
                                     eps: float = EPS_STUDY) -> torch.Tensor:
    """REINFORCE++-baseline: subtract each group's mean reward, then divide by the batch std of the centred
    rewards (docs/algorithms.md 5.8)."""
    g = _grouped(rewards, group_size)
    g = g.to(torch.float32 if not g.is_floating_point() else g.dtype)
    centred = (g - g.mean(dim=1, keepdim=True)).reshape(rewards.shape)
    return batch_normalize(centred, eps=eps, center=False)


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """ReMax: ``R(x, y) - R(x, y_greedy)``, one sample and one greedy decode per prompt."""
    if rewards.shape != greedy_rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and greedy_rewards {tuple(greedy_rewards.shape)} differ")
    return rewards - greedy_rewards


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over valid tokens: ``delta_t = r_t + gamma V_{t'} -
    V_t`` with ``t'`` the next valid token (``V = 0`` after the last), ``A_t = delta_t + gamma lam A_{t'}``.
    Returns ``(advantages, returns = advantages + values)``, both 0 at masked-out positions. With right padding this
    is TRL PPOTrainer's recursion; whiten the advantages afterwards with ``masked_whiten`` as PPO does."""
    if not (token_rewards.shape == values.shape == mask.shape):
        raise ValueError("gae: token_rewards, values and mask must share one [B, T] shape")
    m = mask.to(torch.bool)
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        valid = m[:, t]
        adv[:, t] = torch.where(valid, a, torch.zeros_like(a))
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, a, next_adv)
    return adv, torch.where(m, adv + values, torch.zeros_like(values))


def frac_zero_std_groups(rewards: torch.Tensor, group_size: int | None = None) -> float:
    """Fraction of groups whose rewards are all equal (zero std: no learning signal; docs/algorithms.md 6.8)."""
    g = _grouped(rewards, group_size).to(torch.float64)
    std = _group_std(g).squeeze(1)
    return float(torch.isclose(std, torch.zeros_like(std)).to(torch.float64).mean())


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.bool)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values


def kl_shaped_token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                            *, kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards of PPO / REINFORCE++: ``r_t = -kl_coef * KL_t`` on every valid token, plus the sequence
    score at the last valid token (docs/algorithms.md 5.1; k1 = ``logps - ref_logps`` as TRL's default). ``logps``
    are the sampling policy's (old) log-probs. Rows without a valid token get nothing."""
    if not (logps.shape == ref_logps.shape == mask.shape) or scores.shape != logps.shape[:1]:
        raise ValueError("kl_shaped_token_rewards: scores [B]; logps, ref_logps, mask [B, T]")
    m = mask.to(logps.dtype)
    rewards = -float(kl_coef) * kl_estimate(logps.detach(), ref_logps.detach(), estimator) * m
    last = _last_token_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(1)
    rewards[rows, last[rows]] += scores[rows].to(rewards.dtype)
    return rewards


def kl_penalized_scores(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *,
                        kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """RLOO's sequence-level KL in the reward: ``R - kl_coef * sum_t KL_t`` (k1 = ``old - ref``, as TRL RLOO)."""
    if not (logps.shape == ref_logps.shape == mask.shape) or scores.shape != logps.shape[:1]:
        raise ValueError("kl_penalized_scores: scores [B]; logps, ref_logps, mask [B, T]")
    kl = (kl_estimate(logps.detach(), ref_logps.detach(), estimator) * mask.to(logps.dtype)).sum(-1)
    return scores.to(kl.dtype) - float(kl_coef) * kl
