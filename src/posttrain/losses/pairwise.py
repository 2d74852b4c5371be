"""Pairwise (DPO-family) losses on summed sequence log-probs (docs/algorithms.md section 2).

Entry point::

    pairwise(name, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, *,
             chosen_len=None, rejected_len=None, **hparams) -> Tensor[B]

``policy_*`` / ``ref_*`` are SUMMED completion log-probs ``S(y)`` [B]; ``*_len`` the completion lengths ``|y|`` [B]
(token counts; clamped to >= 1). The result is one loss per example (reduce with ``.mean()``); for ``aot`` /
``aot_unpaired``, whose losses are defined on the sorted batch, entry i belongs to the i-th quantile, not pair i.

The inputs (:class:`~posttrain.losses.pair.Pair`) and their checks are in ``losses/pair.py``; the reference-free
losses (simpo, cpo, orpo, alphapo) in ``losses/pairwise_reference_free.py``. ``PAIRWISE_LOSSES[name]`` is a
:class:`LossSpec` (``fn``, ``reference_free``, ``length_normalized``, ``needs_lengths``, ``f_divergence``,
``defaults``). Each ``fn`` takes a :class:`Pair` and its hyperparameters as
keyword-only arguments, so ``inspect.signature`` is the single source of the accepted names and defaults.

Notation (docs/algorithms.md section 0): ``rho(y) = S_theta(y) - S_ref(y)``, margin ``D = rho(y_w) - rho(y_l)``,
length average ``A(y) = S_theta(y)/|y|``, NLL(y_w) = ``-S_theta(y_w)/|y_w|`` (per-example token mean). Losses are
computed in at least float32; exponentials use the clamp documented in ``_common`` (``EXP_CLAMP``).

Where a loss is also in TRL 1.x its hyperparameters mean what TRL's do (``eps`` is TRL's ``label_smoothing``,
``tau`` its ``discopop_tau``, ``gamma`` CPO's ``simpo_gamma``, ``alpha`` CPO's ``cpo_alpha`` / AlphaPO ``alpha``,
ORPO's ``beta`` is its lambda). Two deliberate differences from TRL, both in the NLL terms of ``cpo``/``orpo``/``rpo``:
TRL averages the NLL over all chosen tokens of the batch (we average per example, so the loss is per example), and
TRL's ORPO NLL also counts prompt tokens (we count completion tokens only).
"""

from __future__ import annotations

import math

import torch

from posttrain.losses._common import (
    EXP_CLAMP,
    LossSpec,
    Running,
    clamped_exp,
    logsigmoid,
    lookup,
)
from posttrain.losses.pair import Pair, checked_pair
from posttrain.losses.pairwise_reference_free import alphapo, cpo, orpo, simpo

Tensor = torch.Tensor


def _smoothed(z: Tensor, eps: float) -> Tensor:
    """Label-smoothed logistic loss ``-(1-eps) logsigmoid(z) - eps logsigmoid(-z)``."""
    return -(1.0 - eps) * logsigmoid(z) - eps * logsigmoid(-z)


def _check_range(name: str, what: str, value: float, lo: float, hi: float, lo_open=False, hi_open=True) -> None:
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name}: {what} must lie in {lb}{lo}, {hi}{rb}, got {value}")


# ------------------------------------------------------------------------------------------------ the losses


def dpo(x: Pair, *, beta: float = 0.1) -> Tensor:
    """DPO (Rafailov et al., NeurIPS 2023, arXiv 2305.18290): ``-logsigmoid(beta * D)``. TRL ``sigmoid``."""
    return -logsigmoid(beta * x.margin)


def dpo_norm(x: Pair, *, beta: float = 0.1) -> Tensor:
    """Length-normalised DPO (SimPO paper appendix, arXiv 2405.14734; Tulu 3, arXiv 2411.15124):
    ``-logsigmoid(beta * [rho_w/|y_w| - rho_l/|y_l|])``. TRL ``sigmoid_norm``. Tulu 3 used beta ~ 5."""
    return -logsigmoid(beta * x.norm_margin)


def ipo(x: Pair, *, beta: float = 0.1) -> Tensor:
    """IPO (Azar et al., AISTATS 2024, arXiv 2310.12036): ``(D_bar - 1/(2 beta))^2`` with the LENGTH-AVERAGED
    margin ``D_bar = rho_w/|y_w| - rho_l/|y_l|``, as TRL (confirmed by the IPO authors). oxRL uses summed log-ratios,
    a different effective beta; we follow TRL."""
    return (x.norm_margin - 1.0 / (2.0 * beta)) ** 2


def cdpo(x: Pair, *, beta: float = 0.1, eps: float = 0.1) -> Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):
    ``-(1-eps) logsigmoid(beta D) - eps logsigmoid(-beta D)``; eps = assumed label-flip rate in [0, 0.5).
    TRL <= 0.28 ``sigmoid`` with ``label_smoothing``; not in TRL 1.x."""
    _check_range("cdpo", "eps", eps, 0.0, 0.5)
    return _smoothed(beta * x.margin, eps)


def robust_dpo(x: Pair, *, beta: float = 0.1, eps: float = 0.1) -> Tensor:
    """Robust DPO (Chowdhury et al., ICML 2024, arXiv 2403.00409), the paper's unbiased estimator:
    ``[-(1-eps) logsigmoid(beta D) + eps logsigmoid(-beta D)] / (1 - 2 eps)`` (note the PLUS on the flipped term).
    Same as TRL ``robust`` (eps = ``label_smoothing``). oxRL puts ``+eps logsigmoid(-beta D)`` inside the negated
    bracket (= cDPO/(1-2 eps)); we follow the paper."""
    _check_range("robust_dpo", "eps", eps, 0.0, 0.5)
    z = beta * x.margin
    return (-(1.0 - eps) * logsigmoid(z) + eps * logsigmoid(-z)) / (1.0 - 2.0 * eps)


def hinge(x: Pair, *, beta: float = 0.1) -> Tensor:
    """Hinge / SLiC (Zhao et al. 2023, arXiv 2305.10425) on the reference-normalised margin, as TRL ``hinge``:
    ``max(0, 1 - beta D)``."""
    return torch.relu(1.0 - beta * x.margin)


def exo(x: Pair, *, beta: float = 0.1, eps: float = 1e-3) -> Tensor:
    """EXO-pref (Ji et al., ICML 2024, arXiv 2402.00856, eq. 16): reverse KL between ``q = softmax`` of the implicit
    rewards over {w, l} and the smoothed label ``p = (1-eps, eps)``:
    ``q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)``, ``q_w = sigmoid(beta D)``. TRL ``exo_pair``
    (eps = ``label_smoothing``, which must be > 0)."""
    _check_range("exo", "eps", eps, 0.0, 1.0, lo_open=True)
    z = beta * x.margin
    log_pw, log_pl = math.log1p(-eps), math.log(eps)
    return torch.sigmoid(z) * (logsigmoid(z) - log_pw) + torch.sigmoid(-z) * (logsigmoid(-z) - log_pl)


def nca(x: Pair, *, beta: float = 0.1) -> Tensor:
    """NCA (Chen et al., NeurIPS 2024, arXiv 2402.05369), pairwise form as TRL ``nca_pair``, with
    ``r = beta rho``: ``-logsigmoid(r_w) - 0.5 logsigmoid(-r_w) - 0.5 logsigmoid(-r_l)``."""
    rw, rl = beta * x.chosen_logratio, beta * x.rejected_logratio
    return -logsigmoid(rw) - 0.5 * logsigmoid(-rw) - 0.5 * logsigmoid(-rl)


def bco(x: Pair, *, beta: float = 0.1) -> Tensor:
    """BCO, paired form (Jung et al. 2024, arXiv 2404.04656) as TRL 1.x ``bco_pair``, i.e. WITHOUT the paper's
    running-mean shift delta: ``-logsigmoid(beta rho_w) - logsigmoid(-beta rho_l)``. The unpaired form with delta is
    ``unpaired('bco', ..., delta=...)``."""
    return -logsigmoid(beta * x.chosen_logratio) - logsigmoid(-beta * x.rejected_logratio)


def sppo(x: Pair, *, beta: float = 0.1) -> Tensor:
    """SPPO, hard labels (Wu et al. 2024, arXiv 2405.00675) as TRL ``sppo_hard``:
    ``(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2`` (summed log-probs; beta = 1/eta)."""
    half = 0.5 / beta
    return (x.chosen_logratio - half) ** 2 + (x.rejected_logratio + half) ** 2


def _need_batch(name: str, t: Tensor) -> None:
    if t.shape[0] < 2:
        raise ValueError(
            f"{name} sorts over the batch (1-D optimal transport) and needs at least 2 pairs per batch, got "
            f"{t.shape[0]}; raise the per-device batch size"
        )


def aot(x: Pair, *, beta: float = 0.1, eps: float = 0.0) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882) as TRL ``aot``: sort the policy log-prob differences
    ``S_theta(y_w) - S_theta(y_l)`` and the reference ones separately over the batch, ``delta_i`` = their sorted
    difference, loss ``-(1-eps) logsigmoid(beta delta) - eps logsigmoid(-beta delta)``. Needs >= 2 pairs; entry i is
    the i-th quantile, not pair i (so per-pair weights such as WPO do not apply)."""
    _need_batch("aot", x.policy_chosen)
    _check_range("aot", "eps", eps, 0.0, 0.5)
    d_theta, _ = torch.sort(x.policy_chosen - x.policy_rejected, dim=0)
    d_ref, _ = torch.sort(x.ref_chosen - x.ref_rejected, dim=0)
    return _smoothed(beta * (d_theta - d_ref), eps)


def aot_unpaired(x: Pair, *, beta: float = 0.1, eps: float = 0.0) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882) as TRL ``aot_unpaired`` (formerly ``aot_pair``): sort
    ``rho_w`` and ``rho_l`` separately over the batch, ``delta_i = sort(rho_w)_i - sort(rho_l)_i``, smoothed logistic
    loss as ``aot``. Needs >= 2 pairs."""
    _need_batch("aot_unpaired", x.policy_chosen)
    _check_range("aot_unpaired", "eps", eps, 0.0, 0.5)
    rw, _ = torch.sort(x.chosen_logratio, dim=0)
    rl, _ = torch.sort(x.rejected_logratio, dim=0)
    return _smoothed(beta * (rw - rl), eps)


def apo_zero(x: Pair, *, beta: float = 0.1) -> Tensor:
    """APO-zero (D'Oosterlinck et al., TACL 2025, arXiv 2408.06266, eq. 7) as TRL ``apo_zero``:
    ``1 - sigmoid(beta rho_w) + sigmoid(beta rho_l)`` -- use when the chosen outputs beat the model's own."""
    return 1.0 - torch.sigmoid(beta * x.chosen_logratio) + torch.sigmoid(beta * x.rejected_logratio)


def apo_down(x: Pair, *, beta: float = 0.1) -> Tensor:
    """APO-down (arXiv 2408.06266, eq. 8) as TRL ``apo_down``: ``sigmoid(beta rho_w) + 1 - sigmoid(beta D)`` --
    use when the chosen outputs are worse than the model's own."""
    return torch.sigmoid(beta * x.chosen_logratio) + 1.0 - torch.sigmoid(beta * x.margin)


def discopop(x: Pair, *, beta: float = 0.1, tau: float = 0.05) -> Tensor:
    """DiscoPOP / LRML (Chris Lu et al., NeurIPS 2024, arXiv 2406.08414, eq. 5) as TRL ``discopop``
    (tau = ``discopop_tau``): with ``z = beta D`` and ``w = sigmoid(z / tau)``,
    ``(1 - w) * (-logsigmoid(z)) + w * exp(-z)``. exp(-z) is clamped (EXP_CLAMP), which only matters where
    w ~ 0 anyway; TRL does not clamp and returns nan for z below about -88."""
    if tau <= 0:
        raise ValueError(f"discopop: tau must be > 0, got {tau}")
    z = beta * x.margin
    w = torch.sigmoid(z / tau)
    return (1.0 - w) * (-logsigmoid(z)) + w * clamped_exp(-z)


def dpop(x: Pair, *, beta: float = 0.1, lam: float = 5.0) -> Tensor:
    """DPO-Positive / Smaug (Pal et al. 2024, arXiv 2402.13228):
    ``-logsigmoid(beta * (D - lam * max(0, -rho_w)))`` -- penalises the chosen likelihood falling below the
    reference. lam = 5 is oxRL's default (the paper uses tens, e.g. 50). Not in TRL."""
    return -logsigmoid(beta * (x.margin - lam * torch.relu(-x.chosen_logratio)))


def rdpo(x: Pair, *, beta: float = 0.1, alpha: float = 0.01) -> Tensor:
    """R-DPO, length-regularised DPO (Park, Rafailov, Ermon, Finn 2024, arXiv 2403.19159):
    ``-logsigmoid(beta D + alpha (|y_w| - |y_l|))``.

    Sign: the paper penalises the reward by ``alpha |y|`` in the RLHF objective. Its optimal policy then satisfies
    ``r(y) = beta rho(y) + alpha |y| + const``, and substituting THAT reward into the Bradley-Terry likelihood gives
    ``+ alpha (|y_w| - |y_l|)``: when the preferred answer is longer, part of the preference is explained by length, so
    the policy needs a smaller likelihood margin and gains nothing from verbosity (the form tabulated in the SimPO
    paper too). oxRL subtracts the term, which instead rewards the policy for favouring longer winners; we follow the
    paper. Not in TRL.
    """
    return -logsigmoid(beta * x.margin + alpha * (x.chosen_len - x.rejected_len))


def rpo(x: Pair, *, beta: float = 0.1, alpha: float = 1.0) -> Tensor:
    """RPO / DPO+NLL (Pang et al., NeurIPS 2024, arXiv 2404.19733; Liu et al. 2024, arXiv 2405.16436):
    ``-logsigmoid(beta D) + alpha * NLL(y_w)``, NLL per example over completion tokens. TRL 1.x:
    ``loss_type=['sigmoid', 'sft'], loss_weights=[1, alpha]`` (its NLL is the batch token mean)."""
    return -logsigmoid(beta * x.margin) + alpha * x.chosen_nll


def odpo(x: Pair, *, beta: float = 0.1, delta: float | Tensor = 1.0) -> Tensor:
    """ODPO, DPO with an offset (Amini, Vieira, Cotterell, ACL Findings 2024, arXiv 2402.10571):
    ``-logsigmoid(beta D - delta)``. ``delta`` is a constant (oxRL: 1.0) or a per-pair tensor [B] (the paper derives
    it from the pair's score gap, e.g. alpha * log of the reward difference). Not in TRL."""
    return -logsigmoid(beta * x.margin - delta)


def caldpo(x: Pair, *, beta: float = 0.1, lam: float = 1.0) -> Tensor:
    """Cal-DPO (Xiao et al., NeurIPS 2024, arXiv 2412.14516):
    ``-logsigmoid(D) + lam * [(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2]`` (the BT term has no beta; beta
    only sets the calibration targets), as oxRL. Not in TRL."""
    half = 0.5 / beta
    return -logsigmoid(x.margin) + lam * ((x.chosen_logratio - half) ** 2 + (x.rejected_logratio + half) ** 2)


def focalpo(x: Pair, *, beta: float = 0.1, gamma: float = 1.0, detach_weight: bool = False) -> Tensor:
    """FocalPO (Liu et al., ACL 2025, arXiv 2501.06645): ``-sigmoid(beta D)^gamma * logsigmoid(beta D)`` -- a focal
    factor that DOWN-weights misranked pairs; gamma = 0 is DPO. By default the gradient flows through the factor as
    in the written loss; oxRL detaches it (``detach_weight=True`` reproduces that). Not in TRL."""
    z = beta * x.margin
    w = torch.sigmoid(z) ** gamma
    if detach_weight:
        w = w.detach()
    return -w * logsigmoid(z)


GPO_KINDS = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")


def gpo(x: Pair, *, beta: float = 0.1, kind: str = "exponential") -> Tensor:
    """GPO (Tang et al., ICML 2024, arXiv 2402.05749): a convex ``f(h)`` of ``h = beta D``. ``logistic``
    ``log(1+e^{-h})`` (DPO), ``hinge`` ``max(0, 1-h)`` (SLiC), ``squared`` ``(h-1)^2`` (IPO-like),
    ``exponential`` ``e^{-h}`` (default, as oxRL; clamped at EXP_CLAMP), ``truncated_quadratic`` ``max(0, 1-h)^2``,
    ``savage`` ``sigmoid(-h)^2``. Not in TRL."""
    h = beta * x.margin
    forms = {
        "logistic": lambda: -logsigmoid(h),
        "hinge": lambda: torch.relu(1.0 - h),
        "squared": lambda: (h - 1.0) ** 2,
        "exponential": lambda: clamped_exp(-h),
        "truncated_quadratic": lambda: torch.relu(1.0 - h) ** 2,
        "savage": lambda: torch.sigmoid(-h) ** 2,
    }
    if kind not in forms:
        raise ValueError(f"gpo: unknown kind {kind!r}; known: {', '.join(GPO_KINDS)}")
    return forms[kind]()


#: Lower bound on beta-DPO's per-example beta (as oxRL), so a far-below-average margin cannot flip the loss's sign.
BETADPO_MIN_BETA = 1e-3


def betadpo(x: Pair, *, beta: float = 0.1, a: float = 0.5, margin_mean: float | Tensor | None = None) -> Tensor:
    """beta-DPO (Wu et al., NeurIPS 2024, arXiv 2407.08639), per-example form as oxRL:
    ``beta_i = max(beta * (1 + a * (D_i - mu)), BETADPO_MIN_BETA)``, loss ``-logsigmoid(beta_i * D_i)``.

    ``mu`` is the running mean of margins. To keep the function pure the batch's own mean margin stands in for it
    unless the caller passes its running mean as ``margin_mean``; the training loop does (the spec's ``running``:
    an EMA of the step mean margins with the paper's momentum 0.9, kept and checkpointed in the loop's memory, see
    posttrain.algorithms.memory; a number set as ``algo.margin_mean`` fixes mu instead). beta_i is treated as a
    temperature and DETACHED (the paper calibrates beta from the data; oxRL lets gradients flow through it)."""
    d = x.margin
    mu = d.detach().mean() if margin_mean is None else torch.as_tensor(margin_mean, dtype=d.dtype, device=d.device)
    beta_i = (beta * (1.0 + a * (d.detach() - mu))).clamp(min=BETADPO_MIN_BETA)
    return -logsigmoid(beta_i * d)


def dpo_shift(x: Pair, *, beta: float = 0.1, lam: float = 0.5) -> Tensor:
    """DPO-Shift (Yang et al. 2025, arXiv 2502.07599): ``-logsigmoid(beta rho_w - lam * beta rho_l)``, lam in (0, 1]
    scales down the rejected term against likelihood displacement; lam = 1 is DPO. Default 0.5 as oxRL."""
    return -logsigmoid(beta * x.chosen_logratio - lam * beta * x.rejected_logratio)


def minor_dpo(x: Pair, *, beta: float = 0.1) -> Tensor:
    """Minor DPO (Xie & Chen 2024, arXiv 2408.09834): ``-logsigmoid(beta (rho_w - max(0, rho_l)))`` -- the rejected
    penalty stops once its likelihood is below the reference's."""
    return -logsigmoid(beta * (x.chosen_logratio - torch.relu(x.rejected_logratio)))


def c2dpo(x: Pair, *, beta: float = 0.1, lam: float = 2e-4) -> Tensor:
    """C2-DPO (arXiv 2502.17507): ``-logsigmoid(beta D) + lam * (rho_w + rho_l)^2`` -- keeps the sum of the two
    log-ratios near zero. lam = 2e-4 as oxRL (the paper's value)."""
    return -logsigmoid(beta * x.margin) + lam * (x.chosen_logratio + x.rejected_logratio) ** 2


def chipo(x: Pair, *, beta: float = 0.1) -> Tensor:
    """chi-PO (Huang et al., ICLR 2025, arXiv 2407.13399): DPO with the link ``phi(z) = z + log z`` on the ratio
    ``z = pi/pi_ref``: ``-logsigmoid(beta [(e^{rho_w} + rho_w) - (e^{rho_l} + rho_l)])``. The paper's clipping of the
    logit to [-2R, 2R] is omitted (as oxRL); e^{rho} is clamped at EXP_CLAMP (oxRL clamps rho to [-20, 20])."""
    phi_w = clamped_exp(x.chosen_logratio) + x.chosen_logratio
    phi_l = clamped_exp(x.rejected_logratio) + x.rejected_logratio
    return -logsigmoid(beta * (phi_w - phi_l))


def bpo(x: Pair, *, beta: float = 0.1, balance_factor: float = 0.3) -> Tensor:
    """BPO, balanced preference optimisation (Sun et al. 2025, arXiv 2506.03557):
    ``-logsigmoid(beta * min(rho_w, balance_factor * (-rho_l)))`` -- the gradient goes to whichever of
    "raise chosen" / "lower rejected" lags. balance_factor = 0.3 as oxRL."""
    return -logsigmoid(beta * torch.minimum(x.chosen_logratio, balance_factor * (-x.rejected_logratio)))


def spo(x: Pair, *, beta: float = 0.1) -> Tensor:
    """SPO, self preference optimisation with self regularisation (EMNLP 2025 Findings), as oxRL:
    ``-SiLU(beta D) = -beta D * sigmoid(beta D)``, DPO with -logsigmoid replaced by -SiLU (an upper bound of it).
    Its slope in ``beta D`` is 0 at about -1.28, tends to -1 for large positive margins and to 0 for very negative
    ones, so badly misranked pairs get (almost) no push. Not in TRL."""
    return -torch.nn.functional.silu(beta * x.margin)


# ------------------------------------------------------------------------------------------------ registry

PAIRWISE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo, f_divergence=True),
    "dpo_norm": LossSpec(dpo_norm, length_normalized=True, needs_lengths=True, f_divergence=True),
    "ipo": LossSpec(ipo, length_normalized=True, needs_lengths=True, f_divergence=True),
    "cdpo": LossSpec(cdpo, f_divergence=True),
    "robust_dpo": LossSpec(robust_dpo, f_divergence=True),
    "hinge": LossSpec(hinge, f_divergence=True),
    "exo": LossSpec(exo, f_divergence=True),
    "nca": LossSpec(nca),
    "bco": LossSpec(bco),
    "sppo": LossSpec(sppo),
    "aot": LossSpec(aot),
    "aot_unpaired": LossSpec(aot_unpaired),
    "apo_zero": LossSpec(apo_zero),
    "apo_down": LossSpec(apo_down),
    "discopop": LossSpec(discopop, f_divergence=True),
    "dpop": LossSpec(dpop),
    "rdpo": LossSpec(rdpo, needs_lengths=True),
    "simpo": LossSpec(simpo, reference_free=True, length_normalized=True, needs_lengths=True),
    "cpo": LossSpec(cpo, reference_free=True, needs_lengths=True),
    "orpo": LossSpec(orpo, reference_free=True, length_normalized=True, needs_lengths=True),
    "alphapo": LossSpec(alphapo, reference_free=True, length_normalized=True, needs_lengths=True),
    "rpo": LossSpec(rpo, needs_lengths=True),
    "odpo": LossSpec(odpo),
    "caldpo": LossSpec(caldpo),
    "focalpo": LossSpec(focalpo),
    "gpo": LossSpec(gpo),
    "betadpo": LossSpec(betadpo, running={"margin_mean": Running(lambda x, hp: x.margin, momentum=0.9)}),
    "dpo_shift": LossSpec(dpo_shift),
    "minor_dpo": LossSpec(minor_dpo),
    "c2dpo": LossSpec(c2dpo),
    "chipo": LossSpec(chipo),
    "bpo": LossSpec(bpo),
    "spo": LossSpec(spo),
}


def pairwise(
    name: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
    **hparams,
) -> Tensor:
    """Per-example loss [B] of the pairwise loss ``name`` (see the module docstring and ``PAIRWISE_LOSSES``).

    Raises ValueError for an unknown name (listing the known ones), an unknown hyperparameter (naming it and the
    accepted ones), missing reference log-probs for a reference-based loss, missing lengths where needed, and
    out-of-range hyperparameters. Reference-free losses ignore ``ref_*``.
    """
    x, fn_hparams = pairwise_inputs(name, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                    chosen_len=chosen_len, rejected_len=rejected_len, **hparams)
    return PAIRWISE_LOSSES[name].fn(x, **fn_hparams)


def pairwise_inputs(
    name: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    chosen_len: Tensor | None = None,
    rejected_len: Tensor | None = None,
    **hparams,
) -> tuple[Pair, dict]:
    """The checked inputs of ``pairwise``: ``(Pair, the loss function's own hparams)``; ``pairwise`` is
    ``PAIRWISE_LOSSES[name].fn(*pairwise_inputs(...))``. The loop uses the Pair to observe running statistics."""
    spec = lookup(PAIRWISE_LOSSES, name, "pairwise")
    reference_free = [n for n, sp in PAIRWISE_LOSSES.items() if sp.reference_free]
    return checked_pair(spec, name, reference_free, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                        chosen_len=chosen_len, rejected_len=rejected_len, **hparams)


__all__ = ["EXP_CLAMP", "GPO_KINDS", "PAIRWISE_LOSSES", "Pair", "pairwise", "pairwise_inputs"]
