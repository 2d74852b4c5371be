"""Reference-free pairwise losses (docs/algorithms.md section 2; the study's "reference-free" category): they use the
policy's own (length-averaged) log-probs, never a reference model. Registered in ``posttrain.losses.pairwise``."""

from __future__ import annotations

import torch

from posttrain.losses._common import clamped_exp, log1mexp, logsigmoid
from posttrain.losses.pair import Pair

Tensor = torch.Tensor


def simpo(x: Pair, *, beta: float = 0.1, gamma: float = 0.5) -> Tensor:
    """SimPO (Meng, Xia, Chen, NeurIPS 2024, arXiv 2405.14734), reference-free and length-averaged:
    ``-logsigmoid(beta (A_w - A_l) - gamma)``. TRL: CPOTrainer ``loss_type='simpo', cpo_alpha=0``
    (gamma = ``simpo_gamma``, in reward units, not gamma/beta). The paper's tuned regime is beta ~ 2-2.5,
    gamma/beta ~ 0.5; the OXRL study ran beta = 0.1, gamma = 0.5."""
    return -logsigmoid(beta * (x.chosen_avg - x.rejected_avg) - gamma)


def cpo(x: Pair, *, beta: float = 0.1, alpha: float = 1.0) -> Tensor:
    """CPO (Xu et al., ICML 2024, arXiv 2401.08417), reference-free:
    ``-logsigmoid(beta (S_w - S_l)) + alpha * NLL(y_w)`` with summed log-probs in the preference term, as TRL
    CPOTrainer ``loss_type='sigmoid'`` (alpha = ``cpo_alpha``). NLL(y_w) = ``-S_w/|y_w|`` per example; TRL averages it
    over all chosen tokens of the batch (equal only when the chosen lengths are equal)."""
    return -logsigmoid(beta * (x.policy_chosen - x.policy_rejected)) + alpha * x.chosen_nll


def orpo(x: Pair, *, beta: float = 0.1) -> Tensor:
    """ORPO (Hong, Lee, Thorne, EMNLP 2024, arXiv 2403.07691), reference-free:
    ``NLL(y_w) - beta * logsigmoid(log OR)`` with ``log OR = (A_w - A_l) - (log(1 - e^{A_w}) - log(1 - e^{A_l}))``
    (stable log1mexp; argument kept <= LOG1MEXP_MAX). beta is ORPO's lambda (TRL ``beta``). NLL(y_w) =
    ``-S_w/|y_w|`` over completion tokens per example; TRL's ORPO NLL is the batch token mean over prompt AND
    completion tokens."""
    aw, al = x.chosen_avg, x.rejected_avg
    log_odds = (aw - al) - (log1mexp(aw) - log1mexp(al))
    return x.chosen_nll - beta * logsigmoid(log_odds)


def alphapo(x: Pair, *, beta: float = 0.1, gamma: float = 0.5, alpha: float = 0.25) -> Tensor:
    """AlphaPO (Gupta et al. 2025, arXiv 2501.03884): SimPO on the reshaped reward ``r = (1 - p^(-alpha)) / alpha``
    of the length-averaged probability ``p = exp(A)``: ``-logsigmoid(beta (r_w - r_l) - gamma)``; alpha = 0 is SimPO.
    As TRL CPOTrainer ``loss_type='alphapo'`` (= simpo, cpo_alpha 0) with its ``alpha``. ``p^(-alpha) =
    exp(-alpha A)`` is clamped (EXP_CLAMP)."""
    if alpha == 0:
        rw, rl = x.chosen_avg, x.rejected_avg
    else:
        rw = (1.0 - clamped_exp(-alpha * x.chosen_avg)) / alpha
        rl = (1.0 - clamped_exp(-alpha * x.rejected_avg)) / alpha
    return -logsigmoid(beta * (rw - rl) - gamma)
