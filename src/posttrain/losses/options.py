"""Pure helpers that combine with the pairwise losses (docs/algorithms.md 2.22-2.25).

- WPO weights (``wpo_weights``, ``log_sum_sq_probs``): multiply a pair's loss by ``w(y_w) * w(y_l)``.
- LD-DPO (``ld_dpo_logps``): recombine per-token log-probs before any pairwise loss.
- f-DPO (``f_divergence_scores``): used by ``pairwise`` through the ``f_divergence`` / ``f_alpha`` hyperparameters.
- TDPO (``tdpo``, ``sequential_kl``): token-level DPO; needs full-vocabulary logits of policy and reference, so it
  has its own signature instead of a ``pairwise`` name.

Per-token tensors are ``[B, T]`` with a ``mask`` ``[B, T]`` marking completion tokens (already shifted: position t
holds the log-prob of token t given the tokens before it).
"""

from __future__ import annotations

import math

import torch

from posttrain.losses._common import EXP_CLAMP, as_float, clamped_exp, logsigmoid

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# --------------------------------------------------------------------------------------------- WPO (2.22)


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log sum_v p(v)^2`` of each position's next-token distribution, [B, T, V] -> [B, T], without gradient.

    Computed as ``logsumexp(2 * log_softmax(logits))``, the quantity TRL's fused LM head returns as
    ``log_sum_sq_probs``.
    """
    with torch.no_grad():
        return torch.logsumexp(2.0 * torch.log_softmax(as_float(logits), dim=-1), dim=-1)


def wpo_weights(token_logps: torch.Tensor, token_log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO sequence weights (Zhou et al., EMNLP 2024, arXiv 2406.11827, eq. 2), detached, [B].

    ``w(y) = exp( (1/|y|) sum_t [log p(y_t) - log sum_v p(v)^2] )``: the length-normalised probability of the
    completion under the policy, "aligned" by each position's squared-probability mass so that greedy-like outputs
    weigh ~1. Multiply each pair's loss by ``wpo_weights(chosen...) * wpo_weights(rejected...)`` (TRL
    ``use_weighting=True`` does exactly this). Not meaningful with AOT, which sorts the batch.
    """
    with torch.no_grad():
        token_logps = as_float(token_logps)
        mask = mask.to(token_logps.dtype)
        aligned = (token_logps - as_float(token_log_sum_sq_probs)) * mask
        mean = aligned.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return clamped_exp(mean)


# ------------------------------------------------------------------------------------------ LD-DPO (2.23)


def ld_dpo_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO sequence log-probs (Liu et al. 2024, arXiv 2409.06411), one pair per row: ``(chosen [B], rejected [B])``.

    The first ``min(|y_w|, |y_l|)`` completion tokens of each side form the shared part; the tokens past it (only the
    longer side has any) are the excess tail. Each sequence log-prob becomes ``sum(shared) + alpha * sum(tail)``.
    Apply it to policy and reference log-probs alike, then feed the results to any pairwise loss (as TRL's
    ``ld_alpha``). ``alpha=1`` gives the plain sums; 0.5 is the paper's suggestion.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_dpo_logps: alpha must lie in [0, 1], got {alpha}")

    def recombine(token_logps, mask, shared_len):
        mask = mask.to(torch.long)
        pos = mask.cumsum(dim=-1) * mask  # 1-based position among completion tokens, 0 elsewhere
        shared = (pos > 0) & (pos <= shared_len.unsqueeze(-1))
        tail = pos > shared_len.unsqueeze(-1)
        token_logps = as_float(token_logps)
        return (token_logps * shared).sum(-1) + alpha * (token_logps * tail).sum(-1)

    shared_len = torch.minimum(chosen_mask.to(torch.long).sum(-1), rejected_mask.to(torch.long).sum(-1))
    chosen = recombine(chosen_token_logps, chosen_mask, shared_len)
    return chosen, recombine(rejected_token_logps, rejected_mask, shared_len)


# ------------------------------------------------------------------------------------------- f-DPO (2.24)


def f_divergence_scores(logratio: torch.Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f-DPO score ``f'(u)`` of the density ratio ``u = pi/pi_ref = exp(logratio)`` (Wang et al., ICLR 2024,
    arXiv 2309.16526). The pairwise losses then use ``s(y_w) - s(y_l)`` in place of the log-ratio margin.

    ``reverse_kl``: ``log u`` (plain DPO). ``forward_kl``: ``1 - 1/u``. ``js_divergence``: ``log(2u/(1+u)) =
    log 2 + logsigmoid(log u)``. ``alpha_divergence``: ``(u^(alpha-1) - 1)/(alpha-1)``, reverse KL at alpha = 1.
    These are TRL 1.x's f' (docs/algorithms.md lists them up to additive constants, which cancel in a plain difference
    but not after the per-length division of ``ipo``/``dpo_norm``, so we keep TRL's). Exponents are clamped at
    ``EXP_CLAMP`` (TRL clamps the alpha-divergence exponent above at 80 and forward KL not at all), so scores stay
    within about +-e^50 = 5e21: finite for the logistic/hinge-type losses at any margin, but ``ipo`` SQUARES them and
    overflows float32 once a forward-KL / alpha score passes ~1e19 (log-ratios below about -44).
    """
    if kind in _F_SCORES:
        return _F_SCORES[kind](logratio, alpha)
    raise ValueError(f"unknown f_divergence {kind!r}; known: {', '.join(F_DIVERGENCES)}")


def _alpha_score(logratio: torch.Tensor, alpha: float) -> torch.Tensor:
    if abs(alpha - 1.0) < 1e-6:
        return logratio
    return (clamped_exp((alpha - 1.0) * logratio) - 1.0) / (alpha - 1.0)


_F_SCORES = {
    "reverse_kl": lambda logratio, alpha: logratio,
    "forward_kl": lambda logratio, alpha: 1.0 - clamped_exp(-logratio),
    "js_divergence": lambda logratio, alpha: math.log(2.0) + logsigmoid(logratio),
    "alpha_divergence": _alpha_score,
}


# -------------------------------------------------------------------------------------------- TDPO (2.25)


def sequential_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequential forward KL of each response, [B]: ``sum_t mask_t * KL(pi_ref(.|x,y<t) || pi_theta(.|x,y<t))``.

    ``policy_logits`` / ``ref_logits`` are [B, T, V] and aligned with ``mask`` [B, T] (the logits that predict each
    completion token). Gradients flow into ``policy_logits`` only (the reference is a constant). Zeng et al.,
    ICML 2024, arXiv 2404.11999.
    """
    ref_logp = torch.log_softmax(as_float(ref_logits).detach(), dim=-1)
    pol_logp = torch.log_softmax(as_float(policy_logits), dim=-1)
    per_pos = (ref_logp.exp() * (ref_logp - pol_logp)).sum(-1)
    return (per_pos * mask.to(per_pos.dtype)).sum(-1)


def tdpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    kl_chosen: torch.Tensor,
    kl_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: int = 2,
) -> torch.Tensor:
    """TDPO per-example losses [B] (Zeng et al., ICML 2024, arXiv 2404.11999; reference repo
    Vance0124/Token-level-Direct-Preference-Optimization).

    ``kl_*`` are the sequential KLs from ``sequential_kl``. With the margin ``D = rho_w - rho_l``:
    TDPO1: ``-logsigmoid(beta * (D - (kl_rejected - kl_chosen)))``;
    TDPO2 (default): ``-logsigmoid(beta * (D - alpha * (kl_rejected - sg(kl_chosen))))``, sg = stop-gradient.
    Not in TRL.
    """
    if variant not in (1, 2):
        raise ValueError(f"tdpo: variant must be 1 or 2, got {variant!r}")
    margin = (as_float(policy_chosen) - as_float(ref_chosen)) - (as_float(policy_rejected) - as_float(ref_rejected))
    kl_chosen, kl_rejected = as_float(kl_chosen), as_float(kl_rejected)
    if variant == 1:
        logits = margin - (kl_rejected - kl_chosen)
    else:
        logits = margin - alpha * (kl_rejected - kl_chosen.detach())
    return -logsigmoid(beta * logits)


__all__ = [
    "EXP_CLAMP",
    "F_DIVERGENCES",
    "f_divergence_scores",
    "ld_dpo_logps",
    "log_sum_sq_probs",
    "sequential_kl",
    "tdpo",
    "wpo_weights",
]
