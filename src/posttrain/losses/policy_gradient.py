"""Policy-gradient losses of online RL: the GRPO family, RLOO, REINFORCE++, ReMax and PPO's policy/value terms.

Pure tensor functions (docs/design.md, "Loss functions"; formulas in docs/algorithms.md section 5); the building
blocks (KL estimators, aggregations, PPO clipping) are in :mod:`posttrain.losses.pg_terms`.

Inputs (all per-token, ``[B, T]``, aligned on completion tokens):

- ``logps``: log pi_theta(y_t) of the policy being trained (carries the gradient);
- ``old_logps``: log pi_old(y_t) of the policy that sampled the rollout (``None`` = ``logps.detach()``: the first,
  strictly on-policy pass, where every importance ratio is exactly 1);
- ``advantages``: ``[B]`` (one per completion, copied to EVERY completion token) or ``[B, T]`` (per token);
- ``mask``: 1/True on completion tokens, 0/False on prompt and padding;
- ``ref_logps``: log pi_ref(y_t); needed only when ``kl_coef != 0`` (ignored otherwise).

``policy_gradient(name, ...)`` returns the scalar loss with the method's own aggregation;
``policy_gradient_and_stats`` returns ``(loss, stats)`` from one evaluation; ``pg_diagnostics`` only the stats
(floats: ratio mean/min/max, clip fractions, KL to the reference and to the old policy, advantage mean, tokens).

Names (``POLICY_GRADIENT_LOSSES``):

======== ===================================================================================================
sgrpo    OXRL's SGRPO: token-level PPO-clip surrogate ``-min(w A, clip(w, 1-eps_low, 1+eps_high) A)``,
         clip 0.2/0.2, sum over valid tokens / token count of the micro-batch (docs/algorithms.md 5.6).
gspo     GSPO (Zheng et al. 2025, arXiv 2507.18071): sequence ratio ``s_i = exp(mean_t(logp - old))``, clip
         3e-4 below / 4e-4 above, mean over sequences. Equals TRL GRPO with importance_sampling_level="sequence",
         loss_type="grpo".
cispo    CISPO: ``-sg(clip(w, 1-eps_low, 1+eps_high)) A logp``. Default symmetric [0.8, 1.2] as OXRL;
         ``eps_low=None`` and a large ``eps_high`` is MiniMax-M1's form (arXiv 2506.13585). TRL's
         ``epsilon_high=E`` (it clamps at E itself) is ``eps_high=E-1`` here. Token mean (``num_items``: over
         the whole accumulated batch, as TRL).
grpo     TRL GRPOTrainer's loss (DeepSeekMath, arXiv 2402.03300) with an explicit ``loss_type``:
         grpo (per-sequence token mean, then batch mean), bnpo (micro-batch token mean), dr_grpo (sum /
         (B * max_completion_length)), dapo (sum / ``num_items``, TRL's default). KL is k3 times the ratio
         (``kl_bias_correction``, TRL's use_bias_correction_kl) by default.
rloo     TRL RLOOTrainer's loss (Ahmadian et al. 2024, arXiv 2402.14740): sequence ratio ``exp(sum_t(logp -
         old))``, PPO clip 0.2/0.2, mean over sequences. KL belongs in the reward (advantages.kl_penalized_scores).
reinforce_pp  REINFORCE++ (Hu 2025, arXiv 2501.03262): token PPO-clip 0.2/0.2 on globally normalized
         (per-token) advantages, token mean. KL belongs in the per-token reward (advantages.kl_shaped_token_rewards)
         or, for the baseline variant, as ``kl_coef`` here.
remax    ReMax (Li et al. 2024, arXiv 2310.10505): REINFORCE, ``-A w`` with no clipping (``w`` = 1 on-policy, so
         the gradient is ``-A grad logp``), token mean over the micro-batch (``num_items`` as above).
ppo      PPO's policy term (Schulman et al. 2017; TRL PPOTrainer): token PPO-clip 0.2/0.2, masked token mean over
         the micro-batch. The value term is ``ppo_value_loss``; the KL is in the reward.
======== ===================================================================================================

Hyperparameters every name accepts: ``kl_coef`` (0.0) and ``kl_estimator`` (``k1`` | ``k2`` | ``k3``, default k3;
Schulman's estimators, docs/algorithms.md 0). ``num_items`` (token-mean names): the completion-token count of the whole
accumulated batch (divided by the number of data-parallel ranks when gradients are averaged across them, as TRL);
``None`` = this micro-batch's own count.

When ``kl_coef != 0`` the per-token KL times ``kl_coef`` is added to the per-token loss before the method's
aggregation (as TRL GRPO).

Numerics: exponents (importance ratios, k3) are clamped at ``EXP_CLAMP`` = 50 (exact inside; values and gradients
stay finite at extreme log-ratios); half-precision log-probs are computed in float32; whatever masked-out positions
hold (-inf, NaN) reaches neither the loss nor the gradient.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from posttrain.losses._common import EXP_CLAMP, check_hparams, clamped_exp as _exp  # noqa: F401 - one documented clamp
from posttrain.losses.pg_terms import (AGGREGATIONS, KL_ESTIMATORS, Terms as _Terms, aggregate,  # noqa: F401
                                       bounds as _bounds, kl_estimate, masked_mean as _masked_mean,
                                       ppo_clip as _ppo_clip, sequence_log_ratio as _sequence_log_ratio)

GRPO_LOSS_TYPES = {  # TRL loss_type -> aggregation (docs/algorithms.md 5.2)
    "grpo": "seq_mean_token_mean",
    "bnpo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
    "dapo": "token_mean",
}
#: grpo loss_types whose token sum is divided by the whole step's token count (TRL's dapo: ``num_items_in_batch``).
GRPO_STEP_TOKEN_TYPES = frozenset({"dapo"})



# ---------------------------------------------------------------------------------------------------------------------
# the methods: (logps, old_logps, adv [B, T], mask, hp) -> _Terms


def _token_clip(aggregation):
    def terms(logps, old, adv, mask, hp):
        ratio = _exp(logps - old)
        per_token, low, high = _ppo_clip(ratio, adv, hp["eps_low"], hp["eps_high"])
        return _Terms(per_token, ratio, low, high, aggregation)

    return terms


def _sequence_clip(normalize: bool):
    def terms(logps, old, adv, mask, hp):
        ratio = _exp(_sequence_log_ratio(logps - old, mask, normalize))  # [B, 1]
        per_token, low, high = _ppo_clip(ratio, adv, hp["eps_low"], hp["eps_high"])
        return _Terms(per_token, ratio, low, high, "seq_mean_token_mean")

    return terms


def _cispo(logps, old, adv, mask, hp):
    ratio = _exp(logps - old)
    lo, hi = _bounds(hp["eps_low"], hp["eps_high"])
    weight = torch.clamp(ratio, min=lo, max=hi).detach()
    low = (ratio < lo) if lo is not None else torch.zeros_like(ratio, dtype=torch.bool)
    high = (ratio > hi) if hi is not None else torch.zeros_like(ratio, dtype=torch.bool)
    return _Terms(-weight * adv * logps, ratio, low.expand_as(adv * ratio), high.expand_as(adv * ratio),
                  "token_mean")


def _grpo(logps, old, adv, mask, hp):
    if hp["loss_type"] not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown grpo loss_type {hp['loss_type']!r}; known: {list(GRPO_LOSS_TYPES)} "
                         "(cispo is its own name)")
    level = hp["importance_sampling_level"]
    if level not in _RATIO_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {level!r}; known: {list(_RATIO_LEVELS)}")
    ratio = _exp(_RATIO_LEVELS[level](logps - old, mask))
    per_token, low, high = _ppo_clip(ratio, adv, hp["eps_low"], hp["eps_high"], hp["delta"])
    return _Terms(per_token, ratio, low, high, GRPO_LOSS_TYPES[hp["loss_type"]])


#: Where grpo's importance ratio lives: per token, or GSPO's per-sequence geometric mean.
_RATIO_LEVELS = {"token": lambda log_ratio, mask: log_ratio,
                 "sequence": lambda log_ratio, mask: _sequence_log_ratio(log_ratio, mask, normalize=True)}


def _remax(logps, old, adv, mask, hp):
    ratio = _exp(logps - old)
    return _Terms(-ratio * adv, ratio, None, None, "token_mean")


# ---------------------------------------------------------------------------------------------------------------------
# registry


_COMMON = {"kl_coef": 0.0, "kl_estimator": "k3"}
_CLIP = {"eps_low": 0.2, "eps_high": 0.2}


@dataclass(frozen=True)
class PolicyGradientSpec:
    """One policy-gradient loss: ``fn(logps, old_logps, advantages, mask, *, ref_logps=None, **hparams) -> Tensor[]``.

    ``defaults`` lists every hyperparameter the name accepts with its default; ``level`` is where the importance
    ratio lives (token | sequence); ``aggregation`` the default reduction; ``reference`` the source.
    ``length_normalized``: the importance ratio is a per-token average over the completion (gspo's geometric-mean
    ratio). ``step_tokens``: the token sum is divided by the token count of the whole optimizer step (``num_items``,
    TRL's ``num_items_in_batch``), a bool or ``fn(resolved hparams) -> bool`` (grpo: by its ``loss_type``).
    """

    name: str
    defaults: Mapping[str, Any]
    level: str
    aggregation: str
    reference: str
    _terms: Callable = field(repr=False, compare=False)
    length_normalized: bool = False
    step_tokens: bool | Callable[[Mapping[str, Any]], bool] = field(default=False, repr=False, compare=False)

    @property
    def fn(self) -> Callable[..., torch.Tensor]:
        return functools.partial(policy_gradient, self.name)

    @property
    def reference_free(self) -> bool:
        """At its defaults (``kl_coef`` 0) the loss needs no reference log-probs."""
        return not self.needs_reference()

    def step_token_mean(self, hparams: Mapping[str, Any]) -> bool:
        """True when, at these hyperparameters, the loss divides its token sum by the whole optimizer step's
        completion-token count (the loop then passes ``num_items``); False: a micro-batch mean."""
        rule = self.step_tokens
        return bool(rule(_resolve(self, hparams)) if callable(rule) else rule)

    def needs_reference(self, **hparams) -> bool:
        """True when the loss itself needs reference log-probs (``kl_coef != 0`` after defaults).

        PPO, RLOO and REINFORCE++ put their KL into the reward instead (see ``posttrain.losses.advantages``); that
        need belongs to the algorithm's registry entry, not to this loss.
        """
        hp = _resolve(self, hparams)
        return float(hp["kl_coef"]) != 0.0


def make_spec(name, level, aggregation, reference, terms, *, length_normalized=False, step_tokens=False,
              **defaults) -> PolicyGradientSpec:
    """A policy-gradient loss spec: ``terms(logps, old_logps, advantages [B, T], mask, hparams) -> Terms`` (the
    per-token policy term, the ratio it clips, where clipping is active, its aggregation), the hyperparameters it
    takes with their defaults (``kl_coef`` and ``kl_estimator`` are added), and its traits (see
    :class:`PolicyGradientSpec`). Add the result to ``POLICY_GRADIENT_LOSSES`` (CONTRIBUTING.md)."""
    return PolicyGradientSpec(name, {**_COMMON, **defaults}, level, aggregation, reference, terms, length_normalized,
                              step_tokens)


_spec = make_spec


POLICY_GRADIENT_LOSSES: dict[str, PolicyGradientSpec] = {
    s.name: s
    for s in (
        _spec("sgrpo", "token", "token_mean", "OXRL (arXiv 2603.19335), docs/algorithms.md 5.6",
              _token_clip("token_mean"), **_CLIP, num_items=None),
        _spec("gspo", "sequence", "seq_mean_token_mean", "Zheng et al. 2025, arXiv 2507.18071", _sequence_clip(True),
              length_normalized=True, eps_low=3e-4, eps_high=4e-4),
        _spec("cispo", "token", "token_mean", "MiniMax-M1, arXiv 2506.13585; OXRL symmetric clip", _cispo,
              step_tokens=True, **_CLIP, num_items=None),
        _spec("grpo", "token", "per loss_type", "Shao et al. 2024, arXiv 2402.03300; TRL GRPOTrainer", _grpo,
              step_tokens=lambda hp: hp["loss_type"] in GRPO_STEP_TOKEN_TYPES, loss_type="dapo", **_CLIP,
              delta=None, importance_sampling_level="token", max_completion_length=512, num_items=None,
              kl_bias_correction=True),
        _spec("rloo", "sequence", "seq_mean_token_mean", "Ahmadian et al. 2024, arXiv 2402.14740; TRL RLOOTrainer",
              _sequence_clip(False), **_CLIP),
        _spec("reinforce_pp", "token", "token_mean", "Hu 2025, arXiv 2501.03262; OpenRLHF",
              _token_clip("token_mean"), step_tokens=True, **_CLIP, num_items=None),
        _spec("remax", "token", "token_mean", "Li et al. 2024, arXiv 2310.10505", _remax, step_tokens=True,
              num_items=None),
        _spec("ppo", "token", "token_mean", "Schulman et al. 2017, arXiv 1707.06347; TRL PPOTrainer",
              _token_clip("token_mean"), step_tokens=True, **_CLIP, num_items=None),
    )
}


def _get(name: str) -> PolicyGradientSpec:
    try:
        return POLICY_GRADIENT_LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy-gradient loss {name!r}; known: {sorted(POLICY_GRADIENT_LOSSES)}") from None


def _resolve(spec: PolicyGradientSpec, hparams: Mapping[str, Any]) -> dict[str, Any]:
    check_hparams(spec, spec.name, "policy-gradient", hparams)
    hp = {**spec.defaults, **hparams}
    for key in ("eps_low", "eps_high"):
        if key in hp and hp[key] is not None and (not math.isfinite(float(hp[key])) or float(hp[key]) < 0):
            raise ValueError(f"{spec.name}: {key} must be a non-negative number or None, got {hp[key]!r}")
    if hp["kl_estimator"] not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {hp['kl_estimator']!r}; known: {list(KL_ESTIMATORS)}")
    return hp


def _check_inputs(name, logps, old_logps, advantages, mask, ref_logps, need_ref):
    if logps.dtype in (torch.float16, torch.bfloat16) or not logps.is_floating_point():
        logps = logps.float()  # losses in at least float32 (docs/algorithms.md 6.2); the cast keeps the graph
    if logps.dim() != 2:
        raise ValueError(f"{name}: logps must be [B, T], got shape {tuple(logps.shape)}")
    shape = logps.shape
    old = logps.detach() if old_logps is None else old_logps.detach()
    for what, t in (("old_logps", old), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"{name}: {what} has shape {tuple(t.shape)}, expected {tuple(shape)} like logps")
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        adv = advantages.detach().to(logps.dtype).unsqueeze(1).expand(shape)  # one advantage -> every token
    elif advantages.shape == shape:
        adv = advantages.detach().to(logps.dtype)
    else:
        raise ValueError(f"{name}: advantages must be [B] or [B, T] with B={shape[0]}, T={shape[1]}; "
                         f"got shape {tuple(advantages.shape)}")
    ref = None
    if need_ref:
        if ref_logps is None:
            raise ValueError(f"{name}: kl_coef != 0 needs ref_logps (reference log-probs [B, T]); pass them or set "
                             "kl_coef=0")
        if ref_logps.shape != shape:
            raise ValueError(f"{name}: ref_logps has shape {tuple(ref_logps.shape)}, expected {tuple(shape)}")
        ref = ref_logps.detach()
    elif ref_logps is not None and ref_logps.shape == shape:
        ref = ref_logps.detach()  # only for diagnostics
    m = mask.to(torch.bool) if mask.dtype != torch.bool else mask

    def valid_only(t):  # padding may hold anything (-inf, NaN): it becomes 0 and can reach neither loss nor gradient
        return torch.where(m, t.to(logps.dtype), torch.zeros((), dtype=logps.dtype, device=logps.device))

    return (valid_only(logps), valid_only(old), valid_only(adv), m, None if ref is None else valid_only(ref))


def _evaluate(name, logps, old_logps, advantages, mask, ref_logps, hparams, with_stats: bool):
    spec = _get(name)
    hp = _resolve(spec, hparams)
    kl_coef = float(hp["kl_coef"])
    logps, old, adv, m, ref = _check_inputs(name, logps, old_logps, advantages, mask, ref_logps, kl_coef != 0.0)
    terms = spec._terms(logps, old, adv, m, hp)
    per_token = terms.per_token
    kl = None
    if ref is not None and (kl_coef != 0.0 or with_stats):
        kl = kl_estimate(logps, ref, hp["kl_estimator"])
    if kl_coef != 0.0:
        kl_term = kl * terms.ratio if hp.get("kl_bias_correction") else kl
        per_token = per_token + kl_coef * kl_term
    loss = aggregate(per_token, m, terms.aggregation, num_items=hp.get("num_items"),
                     max_completion_length=hp.get("max_completion_length"))
    if not with_stats:
        return loss, None
    return loss, _stats(terms, logps, old, adv, m, kl, loss)


@torch.no_grad()
def _stats(terms: _Terms, logps, old, adv, m, kl, loss) -> dict[str, float]:
    mf = m.to(logps.dtype)
    seq_valid = mf.sum(-1, keepdim=True) > 0
    ratio = terms.ratio.detach()
    if ratio.shape[1] == 1:  # sequence-level ratio: statistics over non-empty sequences
        r = ratio[seq_valid]
        weight = seq_valid.to(logps.dtype)
        flags = {key: (0.0 if f is None else _masked_mean((f & m).any(-1, keepdim=True).to(logps.dtype), weight))
                 for key, f in (("low", terms.clipped_low), ("high", terms.clipped_high))}
    else:
        r = ratio[m]
        flags = {key: (0.0 if f is None else _masked_mean(f.to(logps.dtype), mf))
                 for key, f in (("low", terms.clipped_low), ("high", terms.clipped_high))}
    nan = float("nan")
    return {
        "loss": float(loss.detach()),
        "ratio_mean": float(r.mean()) if r.numel() else nan,
        "ratio_min": float(r.min()) if r.numel() else nan,
        "ratio_max": float(r.max()) if r.numel() else nan,
        "clip_frac": flags["low"] + flags["high"],
        "clip_frac_low": flags["low"],
        "clip_frac_high": flags["high"],
        "kl_ref": _masked_mean(kl.detach(), mf) if kl is not None else nan,
        "kl_old": _masked_mean(kl_estimate(logps.detach(), old, "k3"), mf),
        "advantage_mean": _masked_mean(adv, mf),
        "tokens": float(mf.sum()),
    }


# ---------------------------------------------------------------------------------------------------------------------
# public API


def policy_gradient(name: str, logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
                    mask: torch.Tensor, *, ref_logps: torch.Tensor | None = None, **hparams) -> torch.Tensor:
    """Scalar policy-gradient loss of method ``name`` (see the module docstring); ValueError on an unknown name or
    hyperparameter, on mismatched shapes, or on ``kl_coef != 0`` without ``ref_logps``."""
    return _evaluate(name, logps, old_logps, advantages, mask, ref_logps, hparams, with_stats=False)[0]


def policy_gradient_and_stats(name: str, logps: torch.Tensor, old_logps: torch.Tensor | None,
                              advantages: torch.Tensor, mask: torch.Tensor, *, ref_logps: torch.Tensor | None = None,
                              **hparams) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, stats)`` from one evaluation: the loss as ``policy_gradient`` and the stats as ``pg_diagnostics``."""
    return _evaluate(name, logps, old_logps, advantages, mask, ref_logps, hparams, with_stats=True)


def pg_diagnostics(name: str, logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
                   mask: torch.Tensor, *, ref_logps: torch.Tensor | None = None, **hparams) -> dict[str, float]:
    """Diagnostics to log (floats, computed without gradient):

    ``loss``; ``ratio_mean``/``ratio_min``/``ratio_max`` of the importance ratio that the method clips (over valid
    tokens, or over non-empty sequences for sequence-level ratios); ``clip_frac`` = ``clip_frac_low`` +
    ``clip_frac_high``: the fraction of tokens (sequences) whose gradient the clip removes, TRL's region definition
    (ratio below 1-eps_low with A<0, above 1+eps_high with A>0; for cispo: the weight was clamped, either sign;
    0 for remax); ``kl_ref``: mean per-token KL to the reference by ``kl_estimator`` (NaN without ``ref_logps``;
    computed whenever they are given, even at kl_coef=0); ``kl_old``: mean k3 KL(pi_theta || pi_old), 0 on-policy;
    ``advantage_mean`` (token mean); ``tokens``.
    """
    with torch.no_grad():
        return _evaluate(name, logps.detach(), old_logps, advantages, mask, ref_logps, hparams, with_stats=True)[1]


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   clip_range_value: float | None = 0.2, num_items: float | int | None = None) -> torch.Tensor:
    """PPO's clipped value loss ``1/2 * mean(max((V - R)^2, (clip(V, V_old - e, V_old + e) - R)^2))`` over valid
    tokens (TRL PPOTrainer, cliprange_value 0.2; ``clip_range_value=None`` = unclipped). Multiply by ``vf_coef``
    (TRL 0.1) and add to the policy term yourself."""
    shape = values.shape
    for what, t in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if t.shape != shape:
            raise ValueError(f"ppo_value_loss: {what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    old_values, returns = old_values.detach().to(values.dtype), returns.detach().to(values.dtype)
    loss = (values - returns) ** 2
    if clip_range_value is not None:
        clipped = old_values + torch.clamp(values - old_values, -float(clip_range_value), float(clip_range_value))
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * aggregate(loss, mask, "token_mean", num_items=num_items)
