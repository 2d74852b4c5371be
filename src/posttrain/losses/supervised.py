"""Supervised fine-tuning loss (docs/algorithms.md 2.0; InstructGPT stage 1)."""

from __future__ import annotations

import torch


def token_nll(token_logps: torch.Tensor, mask: torch.Tensor, num_items: float | int | None = None) -> torch.Tensor:
    """Token-level negative log-likelihood over completion tokens.

    ``token_logps`` [B, T] are per-token log-probs, ``mask`` [B, T] marks completion tokens. The sum is divided by
    ``num_items`` (the completion-token count of the whole accumulated batch, as HF's ``num_items_in_batch``) so that
    gradient accumulation does not change the result; without it, by this micro-batch's own token count.
    """
    mask = mask.to(token_logps.dtype)
    total = -(token_logps * mask).sum()
    denom = mask.sum() if num_items is None else torch.as_tensor(float(num_items), dtype=token_logps.dtype)
    return total / denom.clamp_min(1.0)
