"""A reference that moves during training: SPIN's iterate and TR-DPO's soft update, one loop option for all.

- SPIN (Chen et al., ICML 2024, arXiv 2401.01335): iteration t trains against the reference pi_t, the policy at the
  start of the iteration; ``ref_sync_steps: epoch`` with ``ref_sync_alpha: 1`` makes each epoch a SPIN iteration
  (``trainer.epochs`` = the number of iterations; the paper runs 3-4). Unlike the paper, the rejected samples are
  drawn from the CURRENT policy at every step (the online loop's sampler), not once per iteration from pi_t.
- TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656; TRL's ``sync_ref_model``): every ``ref_sync_steps`` optimizer
  steps ``ref <- alpha * policy + (1 - alpha) * ref`` (TRL's ``ref_model_sync_steps`` / ``ref_model_mixup_alpha``),
  with any algorithm that has a reference (``+algo.ref_sync_steps=64 +algo.ref_sync_alpha=0.6``).

Syncs happen between batches of examples (after all of a rollout's updates), before a checkpoint is written there;
the reference's weights are then part of the loop's memory, so a resumed run continues with the moved reference.
With LoRA the reference is the base model with the adapter disabled: it cannot move without changing the policy, so
the option is refused there (merge the adapter or use lora=off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.algorithms.hparams import LOOP_OPTIONS  # the loop options' schema (defaults, types, ranges)


def split_loop_options(algo, hparams: dict | None) -> tuple[dict, dict]:
    """``(loop options, the remaining hparams)``: the registry entry's options, overridden by the run's."""
    hp = dict(hparams or {})
    options = {k: hp.pop(k, algo.options.get(k, default)) for k, default in LOOP_OPTIONS.items()}
    return options, hp


@dataclass(frozen=True)
class ReferenceSync:
    every: int | str | None  # optimizer steps, "epoch", or None (the reference stays frozen)
    alpha: float = 1.0

    @classmethod
    def from_options(cls, options: dict, reference, algo_name: str) -> "ReferenceSync":
        every, alpha = options["ref_sync_steps"], float(options["ref_sync_alpha"])  # typed and ranged by
        if every in (None, 0):  # posttrain.algorithms.hparams.validate (the loop validates before it gets here)
            return cls(None, alpha)
        if not reference.enabled:
            raise ValueError(f"{algo_name}: ref_sync_steps needs a reference model, and this algorithm runs "
                             "without one (reference-free)")
        if not reference.movable:
            raise ValueError(f"{algo_name}: ref_sync_steps cannot move a LoRA reference (the base model with the "
                             "adapter disabled); run it with lora=off, or keep the reference frozen with "
                             "algo.ref_sync_steps=null")
        return cls(every, alpha)

    def due(self, step_before: int, step: int, batches: int, batches_per_epoch: int) -> bool:
        """After a batch that moved the policy from ``step_before`` to ``step`` optimizer steps."""
        if self.every is None:
            return False
        if self.every == "epoch":
            return batches % batches_per_epoch == 0
        return step // self.every > step_before // self.every


class ReferenceWeights:
    """The reference's weights as loop memory (checkpointed; restored into the reference on resume)."""

    def __init__(self, reference):
        self.reference = reference

    def state_dict(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.reference.module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.reference.module.load_state_dict(state)


@torch.no_grad()
def sync_reference(reference, policy, alpha: float) -> None:
    """``ref <- alpha * policy + (1 - alpha) * ref`` parameter by parameter (``policy``: the bare, gathered module)."""
    theirs = dict(policy.named_parameters())
    for name, ref_param in reference.module.named_parameters():
        new = theirs[name].detach().to(ref_param.device, ref_param.dtype)
        if alpha == 1.0:
            ref_param.copy_(new)
        else:
            ref_param.mul_(1.0 - alpha).add_(new, alpha=alpha)
