"""Shared, numerically stable pieces of the offline losses (docs/algorithms.md section 0).

Everything here is a pure tensor function.

Numerical policy (docs/design.md, "Loss functions"): every exponential a loss takes is evaluated on its argument
clamped to ``[-EXP_CLAMP, EXP_CLAMP]``. Inside the bound the value is exact; outside it the value saturates at
``exp(+-EXP_CLAMP)`` (about 5e21 / 2e-22, finite in float32) and the gradient through the clamp is zero, so losses
and gradients stay finite even at margins of +-1e4. Sigmoids and log-sigmoids need no clamp: they are evaluated in
their stable forms (``F.logsigmoid`` is ``-softplus(-x)``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

#: Bound on the argument of every exponential taken by a loss (see the module docstring).
EXP_CLAMP = 50.0

#: ``log1mexp(x)`` is evaluated at ``min(x, LOG1MEXP_MAX)``: log(1 - e^x) is -inf at x = 0 (a completion of
#: probability one), so its argument is kept at most this far below zero. Exact for x <= LOG1MEXP_MAX; there the
#: value is about log(1e-6) = -13.8 and the gradient ~1e6, both finite.
LOG1MEXP_MAX = -1e-6

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def clamped_exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` on ``x`` clamped to ``[-EXP_CLAMP, EXP_CLAMP]`` (exact inside the bound)."""
    return torch.exp(x.clamp(-EXP_CLAMP, EXP_CLAMP))


def logsigmoid(x: torch.Tensor) -> torch.Tensor:
    """Stable ``log(sigmoid(x)) = -softplus(-x)``."""
    return F.logsigmoid(x)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Stable ``log(1 - exp(x))`` for ``x <= 0`` (Maechler 2012: branch at -ln 2 to avoid cancellation).

    The argument is first clamped to ``<= LOG1MEXP_MAX`` so that x = 0 (probability one) gives a finite value and
    gradient instead of -inf / nan.
    """
    x = x.clamp(max=LOG1MEXP_MAX)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision inputs to float32 (losses are computed in at least float32); keep float32/float64."""
    x = torch.as_tensor(x)
    if x.dtype in _LOW_PRECISION or not x.is_floating_point():
        return x.float()
    return x


def as_lengths(n: Any, like: torch.Tensor, what: str) -> torch.Tensor:
    """Completion lengths as a float tensor shaped like ``like``, clamped to >= 1 (as TRL does)."""
    n = torch.as_tensor(n, device=like.device)
    if n.dim() == 0:
        n = n.expand_as(like)
    if n.shape != like.shape:
        raise ValueError(f"{what} has shape {tuple(n.shape)}, expected {tuple(like.shape)} (one length per example)")
    return n.to(like.dtype).clamp(min=1.0)


@dataclass(frozen=True)
class Running:
    """A hyperparameter that stands for a running mean over training (beta-DPO's margin mean, BCO's delta).

    ``observe(inputs, hparams)`` gives the detached per-example values of one batch (``inputs`` is the loss's own
    Pair / Unpaired); the loop keeps their mean per optimizer step in a
    :class:`posttrain.algorithms.memory.RunningMean` with ``momentum`` (None: cumulative mean of the step means) and
    passes its value as the hyperparameter whenever the run leaves it None.
    """

    observe: Callable[[Any, dict], torch.Tensor]
    momentum: float | None = None


@dataclass(frozen=True)
class LossSpec:
    """What the algorithm registry needs to know about one loss.

    ``fn`` is the pure loss function; its keyword-only parameters are the loss's hyperparameters, and their
    defaults are ``defaults``. ``reference_free``: needs no reference log-probs. ``length_normalized``: the preference
    term works on per-token averages (``S/|y|``), so beta is not comparable with the summed losses.
    ``needs_lengths``: the caller must pass completion lengths. ``f_divergence``: accepts the ``f_divergence`` /
    ``f_alpha`` hyperparameters of f-DPO (pairwise only). ``needs_kl_anchor``: the caller must compute KTO's z0
    (unpaired only). ``running``: hyperparameters the training loop may feed from a running statistic of the data
    (see :class:`Running`); called directly, the function uses the batch's own mean where such a value is None.
    """

    fn: Callable[..., torch.Tensor]
    reference_free: bool = False
    length_normalized: bool = False
    needs_lengths: bool = False
    f_divergence: bool = False
    needs_kl_anchor: bool = False
    running: dict = field(default_factory=dict)  # hparam name -> Running
    defaults: dict = field(init=False)

    def __post_init__(self):
        defaults = {
            p.name: p.default
            for p in inspect.signature(self.fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        if self.f_divergence:
            defaults.update(f_divergence="reverse_kl", f_alpha=0.5)
        object.__setattr__(self, "defaults", defaults)

    @property
    def hparams(self) -> tuple[str, ...]:
        """Names of the accepted hyperparameters."""
        return tuple(self.defaults)

    def needs_reference(self, **hparams) -> bool:
        """Whether the loss needs reference log-probs (the same question a policy-gradient spec answers from its
        ``kl_coef``); for these losses it does not depend on the hyperparameters."""
        return not self.reference_free


def lookup(registry: dict, name: str, family: str) -> LossSpec:
    """The spec of ``name`` or a ValueError listing the known names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {family} loss {name!r}; known: {', '.join(sorted(registry))}") from None


def check_hparams(spec: LossSpec, name: str, family: str, hparams: dict) -> None:
    """Reject hyperparameters the loss does not take, naming them and the accepted ones."""
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        accepted = ", ".join(spec.defaults) or "(none)"
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for {family} loss {name!r}; "
            f"accepted: {accepted}"
        )
