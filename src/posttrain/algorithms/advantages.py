"""Advantage estimators of the online policy-gradient family, as objects (docs/algorithms.md section 5).

An :class:`Estimator` declares what the rollout phase must compute for it (``needs_old_logps``: per-token rewards
use the sampling policy's log-probs even at ``reward_kl_coef`` 0; ``needs_values``: PPO's value head;
``needs_greedy``: ReMax's greedy baseline) and computes the advantages from one :class:`AdvantageInputs`: ``[N]``
(one per completion, copied to every token by the loss) or ``[N, T-1]`` (per token). The arithmetic is the pure
functions of :mod:`posttrain.losses.advantages`; this module only adapts the rollout's tensors to them.

Adding an estimator = one ``Estimator`` row in ``ESTIMATORS`` (plus its pure function in losses/advantages.py when
it needs new arithmetic); the registry entry or ``algo.advantage`` selects it by name (CONTRIBUTING.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from posttrain.losses import advantages as adv_lib


@dataclass
class AdvantageInputs:
    scores: torch.Tensor  # [N] shaped sequence rewards
    group_size: int
    mask: torch.Tensor  # [N, T-1] completion tokens
    rc: dict  # the rollout settings (posttrain.algorithms.hparams.ROLLOUT_DEFAULTS, filled in)
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    greedy_scores: torch.Tensor | None = None  # [N] ReMax
    values: torch.Tensor | None = None  # [N, T-1] PPO
    extra: dict = field(default_factory=dict)  # returns for the value head


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator: ``compute(inputs) -> advantages`` and what it needs from the rollout phase."""

    name: str
    compute: Callable[[AdvantageInputs], torch.Tensor]
    needs_old_logps: bool = False
    needs_values: bool = False
    needs_greedy: bool = False
    doc: str = ""

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        return self.compute(inputs)


def kl_scores(a: AdvantageInputs) -> torch.Tensor:
    """Sequence rewards with the KL folded in (RLOO's ``R - beta * sum_t KL_t``) when ``reward_kl_coef != 0``."""
    coef = float(a.rc["reward_kl_coef"] or 0.0)
    if coef == 0.0:
        return a.scores
    return adv_lib.kl_penalized_scores(a.scores, a.old_logps, a.ref_logps, a.mask, kl_coef=coef,
                                       estimator=a.rc["reward_kl_estimator"])


def token_rewards(a: AdvantageInputs) -> torch.Tensor:
    """Per-token rewards (PPO, REINFORCE++): ``-c * KL_t`` on every token plus the score at the last one."""
    coef = float(a.rc["reward_kl_coef"] or 0.0)
    ref = a.ref_logps if coef != 0.0 else a.old_logps
    return adv_lib.kl_shaped_token_rewards(a.scores, a.old_logps, ref, a.mask, kl_coef=coef,
                                           estimator=a.rc["reward_kl_estimator"])


def _group_zscore(a):
    return adv_lib.group_zscore(kl_scores(a), a.group_size, eps=float(a.rc["adv_eps"]),
                                scale=str(a.rc["scale_rewards"]))


def _leave_one_out(a):
    return adv_lib.leave_one_out(kl_scores(a), a.group_size)


def _reinforce_pp(a):
    return adv_lib.reinforce_pp_advantages(token_rewards(a), a.mask, gamma=float(a.rc["gae_gamma"]),
                                           eps=float(a.rc["adv_eps"]))


def _reinforce_pp_baseline(a):
    return adv_lib.reinforce_pp_baseline_advantages(kl_scores(a), a.group_size, eps=float(a.rc["adv_eps"]))


def _remax(a):
    return adv_lib.remax_advantages(kl_scores(a), a.greedy_scores)


def _gae(a):
    adv, returns = adv_lib.gae(token_rewards(a), a.values, a.mask, gamma=float(a.rc["gae_gamma"]),
                               lam=float(a.rc["gae_lambda"]))
    a.extra["returns"] = returns
    if a.rc["whiten_advantages"] and a.mask.sum() > 1:
        adv = torch.where(a.mask, adv_lib.masked_whiten(adv, a.mask), torch.zeros_like(adv))
    return adv


#: Advantage estimators by name (the registry entry's or the run's ``advantage``).
ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("group_zscore", _group_zscore, doc="GRPO family (scale_rewards group | batch | none)"),
    Estimator("leave_one_out", _leave_one_out, doc="RLOO"),
    Estimator("reinforce_pp", _reinforce_pp, needs_old_logps=True,
              doc="REINFORCE++: per-token returns-to-go, global normalisation"),
    Estimator("reinforce_pp_baseline", _reinforce_pp_baseline, doc="REINFORCE++-baseline (G > 1)"),
    Estimator("remax", _remax, needs_greedy=True, doc="ReMax: R - R(greedy)"),
    Estimator("gae", _gae, needs_old_logps=True, needs_values=True,
              doc="PPO: GAE on the value head, whitened over the step"),
)}
