"""Per-token log-probabilities of a causal LM: the one place the project turns logits into log-probs.

Every objective, the rollout phase and the reference use these (docs/algorithms.md 0 and 6): log-probs in float32,
position t holding ``log pi(x_{t+1} | x_<=t)`` (so ``[B, T-1]`` for ``[B, T]`` ids), the logits divided by the
sampling temperature when it is not 1 (docs/algorithms.md 6.2).
"""

from __future__ import annotations

import torch


def shifted_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Next-token logits [B, T-1, V] in float32 (divided by ``temperature`` when it is positive and not 1).

    Only for what needs the full distribution (WPO's squared-probability mass, TDPO's sequential KL); log-probs of
    the taken tokens come from :func:`token_logps`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    t = float(temperature)
    return logits / t if t > 0 and t != 1.0 else logits


def logps_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-softmax picked at the next tokens: [B, T-1, V] logits -> [B, T-1] log-probs."""
    return torch.gather(logits, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """log pi(x_t | x_<t) for t = 1..T-1, float32, shape [B, T-1]."""
    return logps_from_logits(shifted_logits(model, input_ids, attention_mask, temperature), input_ids)


def sequence_logps(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] and completion lengths [N] of a padded batch."""
    mask = batch["completion_mask"][:, 1:].float()
    lp = token_logps(model, batch["input_ids"], batch["attention_mask"], temperature)
    return (lp * mask).sum(-1), mask.sum(-1)
