"""The inputs of the pairwise losses (docs/algorithms.md section 0): the :class:`Pair` every loss function of
:mod:`posttrain.losses.pairwise` takes, and the checks that build it from summed sequence log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.losses._common import LossSpec, as_float, as_lengths, check_hparams
from posttrain.losses.options import f_divergence_scores

Tensor = torch.Tensor


@dataclass(frozen=True)
class Pair:
    """The inputs of one batch of pairs, as the loss functions see them.

    ``chosen_logratio`` / ``rejected_logratio`` are ``rho = S_theta - S_ref`` -- or, when the caller asked for an
    f-divergence (``f_divergence`` hyperparameter), its f-DPO score ``f'(pi/pi_ref)``; None for reference-free losses
    called without reference log-probs. ``chosen_len`` / ``rejected_len`` are float and >= 1, or None.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_len: Tensor | None = None
    rejected_len: Tensor | None = None
    chosen_logratio: Tensor | None = None
    rejected_logratio: Tensor | None = None

    @property
    def margin(self) -> Tensor:
        """``rho(y_w) - rho(y_l)``."""
        return self.chosen_logratio - self.rejected_logratio

    @property
    def chosen_avg(self) -> Tensor:
        """``A(y_w) = S_theta(y_w) / |y_w|``."""
        return self.policy_chosen / self.chosen_len

    @property
    def rejected_avg(self) -> Tensor:
        return self.policy_rejected / self.rejected_len

    @property
    def chosen_nll(self) -> Tensor:
        """Per-example mean token NLL of the chosen completion, ``-S_theta(y_w)/|y_w|``."""
        return -self.chosen_avg

    @property
    def norm_margin(self) -> Tensor:
        """Length-averaged log-ratio margin ``rho(y_w)/|y_w| - rho(y_l)/|y_l|`` (IPO as TRL, sigmoid_norm)."""
        return self.chosen_logratio / self.chosen_len - self.rejected_logratio / self.rejected_len


def _vector(t, what: str) -> Tensor:
    t = as_float(t)
    if t.dim() != 1:
        raise ValueError(f"{what} must be a 1-D tensor [B] of summed sequence log-probs, got shape {tuple(t.shape)}")
    return t


def checked_pair(
    spec: LossSpec,
    name: str,
    reference_free: list[str],
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
    **hparams,
) -> tuple[Pair, dict]:
    """``(Pair, the loss function's own hparams)`` for loss ``name`` with ``spec`` (``reference_free``: the names to
    suggest when reference log-probs are missing); see ``posttrain.losses.pairwise.pairwise_inputs``."""
    check_hparams(spec, name, "pairwise", hparams)
    if "beta" in hparams and not hparams["beta"] > 0:
        raise ValueError(f"{name}: beta must be > 0, got {hparams['beta']}")
    f_kind = hparams.pop("f_divergence", "reverse_kl")
    f_alpha = hparams.pop("f_alpha", 0.5)

    pc = _vector(policy_chosen, "policy_chosen")
    pr = _vector(policy_rejected, "policy_rejected")
    if pr.shape != pc.shape:
        raise ValueError(f"policy_rejected has shape {tuple(pr.shape)}, policy_chosen {tuple(pc.shape)}")

    rc = rr = lw = ll = None
    if spec.needs_lengths:
        missing = [n for n, v in (("chosen_len", chosen_len), ("rejected_len", rejected_len)) if v is None]
        if missing:
            raise ValueError(f"pairwise loss {name!r} needs completion lengths; missing {', '.join(missing)}")
    if chosen_len is not None:
        lw = as_lengths(chosen_len, pc, "chosen_len")
    if rejected_len is not None:
        ll = as_lengths(rejected_len, pc, "rejected_len")

    chosen_ratio = rejected_ratio = None
    if not spec.reference_free:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(
                f"pairwise loss {name!r} needs reference log-probs (ref_chosen and ref_rejected); "
                f"reference-free losses: {', '.join(reference_free)}"
            )
        rc, rr = _vector(ref_chosen, "ref_chosen"), _vector(ref_rejected, "ref_rejected")
        if rc.shape != pc.shape or rr.shape != pc.shape:
            raise ValueError(f"reference log-probs must have the policy's shape {tuple(pc.shape)}")
        chosen_ratio = f_divergence_scores(pc - rc, f_kind, f_alpha)
        rejected_ratio = f_divergence_scores(pr - rr, f_kind, f_alpha)

    return Pair(pc, pr, rc, rr, lw, ll, chosen_ratio, rejected_ratio), hparams
