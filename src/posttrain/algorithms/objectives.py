"""One objective per family: what the training loop computes on a micro-batch (no algorithm names here).

Each objective is ``fn(policy, reference, batch, algo, hparams, ctx) -> (loss, stats)``. ``loss`` is already
scaled for gradient accumulation: per-example losses are summed and divided by the example count of the whole
accumulated step (``ctx.examples``), token losses by its token count (``ctx.tokens``), so the result does not
depend on how a step is split into micro-batches. Log-probs are computed in float32 from the logits over the full
vocabulary, prompt and padding masked (ALGORITHMS.md 0 and 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain import losses
from posttrain.algorithms.online import online, prepare_online
from posttrain.data.collate import collate


@dataclass(frozen=True)
class StepContext:
    examples: int  # examples in the whole accumulated optimizer step
    tokens: int  # completion tokens in the whole accumulated optimizer step


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log pi(x_t | x_<t) for t = 1..T-1, float32, shape [B, T-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return torch.gather(logits, -1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] and completion lengths [N] of a padded batch."""
    mask = batch["completion_mask"][:, 1:].float()
    lp = token_logps(model, batch["input_ids"], batch["attention_mask"])
    return (lp * mask).sum(-1), mask.sum(-1)


def _reference_logps(reference, batch: dict) -> torch.Tensor:
    with reference.active() as ref_model:
        return sequence_logps(ref_model, batch)[0]


def supervised(policy, reference, batch, algo, hparams, ctx):
    """SFT: token NLL over completion tokens, normalised by the accumulated step's token count."""
    mask = batch["completion_mask"][:, 1:]
    lp = token_logps(policy, batch["input_ids"], batch["attention_mask"])
    loss = losses.token_nll(lp, mask, num_items=ctx.tokens)
    nll = -(lp * mask).sum() / mask.sum().clamp_min(1)
    return loss, {"nll": nll.item(), "logps/completion": ((lp * mask).sum(-1)).mean().item()}


def pairwise(policy, reference, batch, algo, hparams, ctx):
    """DPO family: chosen and rejected in one forward; reference forward only when the loss needs one."""
    n = batch["pairs"]
    seq, lengths = sequence_logps(policy, batch)
    ref = _reference_logps(reference, batch) if reference.enabled else None
    per_example = losses.pairwise(
        algo.loss, seq[:n], seq[n:], None if ref is None else ref[:n], None if ref is None else ref[n:],
        chosen_len=lengths[:n], rejected_len=lengths[n:], **hparams)
    stats = {"logps/chosen": seq[:n].mean().item(), "logps/rejected": seq[n:].mean().item()}
    if ref is not None:
        beta = float(hparams.get("beta", 0.1))
        chosen, rejected = beta * (seq[:n] - ref[:n]).detach(), beta * (seq[n:] - ref[n:]).detach()
        stats.update({"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                      "rewards/margins": (chosen - rejected).mean().item(),
                      "rewards/accuracies": (chosen > rejected).float().mean().item()})
    return per_example.sum() / ctx.examples, stats


def unpaired(policy, reference, batch, algo, hparams, ctx):
    """KTO family: completions plus their mismatched partners (the KL anchor z0), one forward each model."""
    n = batch["rows"]
    seq, lengths = sequence_logps(policy, batch)
    ref = _reference_logps(reference, batch) if reference.enabled else torch.zeros_like(seq)
    anchor = losses.kto_kl_anchor(seq[n:].detach(), ref[n:])
    per_example = losses.unpaired(algo.loss, seq[:n], ref[:n], batch["desirable"], kl_anchor=anchor,
                                  lengths=lengths[:n], **hparams)
    return per_example.sum() / ctx.examples, {"kl_anchor": float(anchor), "logps/completion": seq[:n].mean().item()}


def offline_batches(policy, reference, tokenizer, algo, hparams, micro_batches, *, max_length, seed, step):
    """Offline families: tokenise each micro-batch of examples; no rollout statistics."""
    return [collate(algo.data, tokenizer, mb, max_length) for mb in micro_batches], {}


#: Family -> objective. The loop looks the family up here; there is no chain over algorithm names.
OBJECTIVES = {"supervised": supervised, "pairwise": pairwise, "unpaired": unpaired, "online": online}
#: Family -> how a step's examples become batches (online families add their rollout phase here).
PREPARERS = {"supervised": offline_batches, "pairwise": offline_batches, "unpaired": offline_batches,
             "online": prepare_online}
