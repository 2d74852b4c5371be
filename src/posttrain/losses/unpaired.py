"""Unpaired binary-feedback (KTO-family) losses (docs/algorithms.md section 3).

Entry point::

    unpaired(name, policy_logps, ref_logps, desirable, *, kl_anchor, lengths=None, **hparams) -> Tensor[B]

``policy_logps`` / ``ref_logps`` are SUMMED completion log-probs [B]; ``desirable`` a bool tensor [B] (True =
desirable / chosen); ``kl_anchor`` KTO's detached reference point z0 (compute it with :func:`kto_kl_anchor` from
mismatched prompt/completion pairs; losses that do not use it accept None); ``lengths`` the completion lengths
(no current loss needs them). Returns one loss per example; TRL's loss is its mean.

The training loop computes z0 once per optimizer step, over the step's mismatched pairs on all micro-batches and
ranks (posttrain.algorithms.objectives ``unpaired_batches``; partners from posttrain.data.collate
``mismatched_partners``), and passes that one value to every micro-batch.

``UNPAIRED_LOSSES[name]`` is a :class:`LossSpec` with the same attributes as ``PAIRWISE_LOSSES``; ``needs_kl_anchor``
says whether the caller has to run the mismatched forward passes at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.losses._common import LossSpec, Running, as_float, check_hparams, logsigmoid, lookup

Tensor = torch.Tensor


@dataclass(frozen=True)
class Unpaired:
    """One batch of unpaired examples as the loss functions see them: ``logratio = S_theta - S_ref`` [B],
    ``desirable`` bool [B], ``kl_anchor`` a detached scalar tensor or None, ``lengths`` float [B] or None."""

    logratio: Tensor
    desirable: Tensor
    kl_anchor: Tensor | None = None
    lengths: Tensor | None = None


def kto_kl_anchor(policy_mismatched_logps: Tensor, ref_mismatched_logps: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, mean(S_theta(y'|x) - S_ref(y'|x)))`` over MISMATCHED pairs (prompt x_i
    with the completion of an example of another prompt), detached, as a 0-d tensor. The clamp comes after the
    average.

    Pure: averaging over micro-batches and processes is the caller's job -- average first, then clamp (call this on
    all the pairs' log-probs, or on their mean). The training loop averages over the whole optimizer step: the sum
    and count of the step's differences, all-reduced over the ranks (objectives ``unpaired_batches``). TRL instead
    rotates completions by one inside each per-device batch and averages the per-device means of one micro-batch
    (``gather_for_metrics(kl).mean().clamp(min=0)``), so its z0 changes with the accumulation split.
    """
    diff = as_float(policy_mismatched_logps).detach() - as_float(ref_mismatched_logps).detach()
    return diff.mean().clamp(min=0.0)


def kto(x: Unpaired, *, beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0) -> Tensor:
    """KTO (Ethayarajh et al., ICML 2024, arXiv 2402.01306, eq. 7) as TRL ``loss_type='kto'``: with ``r = rho(y)``,
    desirable ``lambda_d * (1 - sigmoid(beta (r - z0)))``, undesirable ``lambda_u * (1 - sigmoid(beta (z0 - r)))``
    (lambda_d/lambda_u = TRL ``desirable_weight``/``undesirable_weight``; choose them so that
    ``lambda_d n_d / (lambda_u n_u)`` lies in [1, 4/3]). z0 is treated as a constant."""
    if x.kl_anchor is None:
        raise ValueError("kto needs kl_anchor (z0 from kto_kl_anchor on mismatched pairs)")
    z0 = x.kl_anchor
    des = lambda_d * (1.0 - torch.sigmoid(beta * (x.logratio - z0)))
    und = lambda_u * (1.0 - torch.sigmoid(beta * (z0 - x.logratio)))
    return torch.where(x.desirable, des, und)


def apo_zero_unpaired(x: Unpaired, *, beta: float = 0.1, lambda_d: float = 1.0, lambda_u: float = 1.0) -> Tensor:
    """Unpaired APO-zero (D'Oosterlinck et al., TACL 2025, arXiv 2408.06266) as TRL KTOTrainer
    ``loss_type='apo_zero_unpaired'``: desirable ``lambda_d (1 - sigmoid(beta r))``, undesirable
    ``lambda_u sigmoid(beta r)``; no z0 (TRL applies its desirable/undesirable weights here too)."""
    des = lambda_d * (1.0 - torch.sigmoid(beta * x.logratio))
    und = lambda_u * torch.sigmoid(beta * x.logratio)
    return torch.where(x.desirable, des, und)


def bco(x: Unpaired, *, beta: float = 0.1, delta: float | Tensor | None = None) -> Tensor:
    """Unpaired BCO (Jung et al. 2024, arXiv 2404.04656): a logistic classifier on the implicit reward
    ``beta r`` shifted by ``delta``: desirable ``-logsigmoid(beta r - delta)``, undesirable
    ``-logsigmoid(-(beta r - delta))``. The paper's delta is a running mean of all implicit rewards (detached, updated
    each step). The function stays pure: with ``delta`` None the batch's own mean implicit reward stands in (what
    TRL's first step uses); the training loop passes its running mean (the spec's ``running``: the cumulative mean of
    the step means, TRL's ``RunningMoments``, kept and checkpointed in the loop's memory), and at the first step,
    before that mean exists, the mean over the whole step (all micro-batches and ranks, from a no-grad pass); a
    number fixes delta.
    TRL's optional UDM (a prompt-embedding classifier whose density ratios re-weight the undesirable examples; off
    unless TRL is given an embedding function) is not included."""
    reward = beta * x.logratio
    d = reward.detach().mean() if delta is None else torch.as_tensor(delta, dtype=reward.dtype, device=reward.device)
    z = reward - d.detach()
    return torch.where(x.desirable, -logsigmoid(z), -logsigmoid(-z))


UNPAIRED_LOSSES: dict[str, LossSpec] = {
    "kto": LossSpec(kto, needs_kl_anchor=True),
    "apo_zero_unpaired": LossSpec(apo_zero_unpaired),
    "bco": LossSpec(bco, running={"delta": Running(lambda x, hp: hp.get("beta", 0.1) * x.logratio)}),
}


def unpaired(
    name: str,
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    kl_anchor: Tensor | float | None,
    lengths: Tensor | None = None,
    **hparams,
) -> Tensor:
    """Per-example loss [B] of the unpaired loss ``name`` (see the module docstring and ``UNPAIRED_LOSSES``).

    Raises ValueError for an unknown name (listing the known ones), an unknown hyperparameter (naming it and the
    accepted ones), missing reference log-probs, a missing ``kl_anchor`` where the loss needs it, and mismatched
    shapes.
    """
    x, fn_hparams = unpaired_inputs(name, policy_logps, ref_logps, desirable, kl_anchor=kl_anchor, lengths=lengths,
                                    **hparams)
    return UNPAIRED_LOSSES[name].fn(x, **fn_hparams)


def unpaired_inputs(
    name: str,
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    kl_anchor: Tensor | float | None,
    lengths: Tensor | None = None,
    **hparams,
) -> tuple[Unpaired, dict]:
    """The checked inputs of ``unpaired``: ``(Unpaired, the loss function's hparams)`` (see ``pairwise_inputs``)."""
    spec = lookup(UNPAIRED_LOSSES, name, "unpaired")
    check_hparams(spec, name, "unpaired", hparams)
    if "beta" in hparams and not hparams["beta"] > 0:
        raise ValueError(f"{name}: beta must be > 0, got {hparams['beta']}")
    if ref_logps is None:
        raise ValueError(f"unpaired loss {name!r} needs reference log-probs (ref_logps)")
    p, r = as_float(policy_logps), as_float(ref_logps)
    if p.dim() != 1 or r.shape != p.shape:
        raise ValueError(
            f"policy_logps and ref_logps must be 1-D [B] of the same shape, got {tuple(p.shape)} and {tuple(r.shape)}"
        )
    d = torch.as_tensor(desirable, device=p.device)
    if d.dtype != torch.bool:
        if d.is_floating_point() or not ((d == 0) | (d == 1)).all():
            raise ValueError("desirable must be a bool tensor [B] (or 0/1 integers)")
        d = d.bool()
    if d.shape != p.shape:
        raise ValueError(f"desirable has shape {tuple(d.shape)}, expected {tuple(p.shape)}")
    if spec.needs_kl_anchor and kl_anchor is None:
        raise ValueError(f"unpaired loss {name!r} needs kl_anchor (z0); compute it with kto_kl_anchor")
    z0 = None if kl_anchor is None else torch.as_tensor(kl_anchor, dtype=p.dtype, device=p.device).detach()
    lens = None if lengths is None else torch.as_tensor(lengths, device=p.device).to(p.dtype).clamp(min=1.0)
    return Unpaired(p - r, d, z0, lens), hparams


__all__ = ["UNPAIRED_LOSSES", "Unpaired", "kto_kl_anchor", "unpaired", "unpaired_inputs"]
