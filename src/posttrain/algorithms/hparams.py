"""The one hyperparameter schema: every key an algorithm accepts, its default, its type and its valid range.

An algorithm's keys (``algo.*`` in the config; conf/algo/<name>.yaml holds the values) come in groups, and its family
(``registry.FamilyTraits.hparams``) says which groups it accepts:

- ``loss``: the loss spec's keyword-only parameters with their defaults (read from the loss signature,
  :class:`posttrain.losses._common.LossSpec` / ``PolicyGradientSpec``);
- ``pairwise``: ``PAIRWISE_OPTIONS``, combinable with any offline pairwise loss (WPO, LD-DPO; docs/algorithms.md
  2.22-2.23);
- ``rollout``: ``ROLLOUT_DEFAULTS``, the online families' sampling, reward, advantage and update settings
  (docs/algorithms.md 4-5);
- ``loop``: ``LOOP_OPTIONS``, the loop's reference sync (SPIN / TR-DPO, posttrain.algorithms.reference_sync).

The type of a key comes from its default (bool, int, float, str, dict; ``NULLABLE`` lists the keys whose default is
None or that also take None, with their type); valid ranges and enumerated values are in ``RANGES``, keyed by the
hyperparameter's name (``<loss>.<key>`` where one loss's key means something else). :func:`validate` is called once,
before any model loads (run.py, the sweep dry run) and again by the loop; a bad key or value is ONE ValueError line
naming the algorithm, the key and what is valid.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from posttrain.algorithms import registry
from posttrain.algorithms.advantages import ESTIMATORS
from posttrain.algorithms.pairs import PAIR_BUILDERS
from posttrain.losses.advantages import SCALES
from posttrain.losses.options import F_DIVERGENCES
from posttrain.losses.pairwise import GPO_KINDS
from posttrain.losses.policy_gradient import GRPO_LOSS_TYPES, KL_ESTIMATORS
from posttrain.rewards import REWARD_FUNCTIONS

#: Options that combine with any offline pairwise loss (``+algo.wpo=true``, ``+algo.ld_alpha=0.5``); not loss hparams.
PAIRWISE_OPTIONS: dict[str, Any] = {"wpo": False, "ld_alpha": None}

#: Loop options any algorithm accepts (as ``algo.*``); they never reach a loss. Setting ``ref_sync_steps`` on an
#: algorithm without a reference is refused by the loop (reference_sync.ReferenceSync.from_options).
LOOP_OPTIONS: dict[str, Any] = {"ref_sync_steps": None, "ref_sync_alpha": 1.0}

#: Every rollout hyperparameter of the online families with its default (the registry entry's ``options`` and
#: ``algo.*`` override them).
ROLLOUT_DEFAULTS: dict[str, Any] = {
    # sampling (the same sampler as self-play; temperature also divides the training logits when != 1)
    "num_samples": 4,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 128,
    "generation_batch_size": 256,
    # optimizer updates per rollout: num_iterations passes x num_minibatches minibatches (1 x 1: on-policy)
    "num_iterations": 1,
    "num_minibatches": 1,
    # rewards: {name: weight} over posttrain.rewards.REWARD_FUNCTIONS, summed (TRL sum-then-normalise)
    "rewards": {"strict": 1.0},
    "accuracy_reward": "strict",  # the RAW accuracy (dynamic sampling filter, accuracy_mean)
    "missing_eos_penalty": None,  # subtracted from the reward of completions without EOS (TRL)
    # advantages
    "advantage": "group_zscore",  # see posttrain.algorithms.advantages.ESTIMATORS
    "adv_eps": 1e-8,  # group_zscore / REINFORCE++ std epsilon (study 1e-8; TRL grpo 1e-4)
    "scale_rewards": "group",  # group_zscore: group | batch | none (TRL scale_rewards)
    "reward_kl_coef": 0.0,  # KL folded into the reward (RLOO: sequence; REINFORCE++/PPO: per token)
    "reward_kl_estimator": "k1",
    # DAPO
    "dynamic_sampling": False,
    "max_sampling_tries": 3,
    "mask_truncated": False,
    "overlong_buffer_frac": 0.0,
    "overlong_penalty_factor": 1.0,
    # PPO (TRL PPOTrainer defaults where it has them)
    "gae_gamma": 1.0,
    "gae_lambda": 0.95,
    "whiten_advantages": True,
    "vf_lr": 1e-3,
    "vf_epochs": 4,
    "cliprange_value": 0.2,
    # pairwise objective on generated pairs
    "chosen": "best_sample",  # see posttrain.algorithms.pairs.PAIR_BUILDERS
    # supervised objective on filtered samples (RFT)
    "keep_threshold": 0.5,
    "dedupe": True,
}

#: Keys whose default is None (or that also take None: a missing clip bound) -> the type of their other values.
NULLABLE: dict[str, type] = {
    "margin_mean": float, "delta": float, "num_items": float, "missing_eos_penalty": float, "ld_alpha": float,
    "eps_low": float, "eps_high": float, "cliprange_value": float, "max_completion_length": int,
    "ref_sync_steps": int,
}


class _Check:
    """A valid range or value set: ``ok(value)`` and the phrase that completes "algo.<key> must be ..."."""

    def __init__(self, ok: Callable[[Any], bool], text: str | Callable[[], str]):
        self.ok, self._text = ok, text

    @property
    def text(self) -> str:
        return self._text() if callable(self._text) else self._text


def _interval(lo: float | None, hi: float | None, brackets: str = "[]") -> _Check:
    lo_ok = (lambda v: True) if lo is None else (lambda v: v > lo) if brackets[0] == "(" else (lambda v: v >= lo)
    hi_ok = (lambda v: True) if hi is None else (lambda v: v < hi) if brackets[1] == ")" else (lambda v: v <= hi)
    if hi is None:
        text = f"{'>' if brackets[0] == '(' else '>='} {lo:g}"
    else:
        text = f"in {brackets[0]}{lo:g}, {hi:g}{brackets[1]}"
    return _Check(lambda v: lo_ok(v) and hi_ok(v), text)


def _one_of(values: Callable[[], Any]) -> _Check:
    return _Check(lambda v: v in tuple(values()), lambda: "one of " + ", ".join(map(str, values())))


_POSITIVE, _NON_NEGATIVE, _AT_LEAST_ONE = _interval(0, None, "(]"), _interval(0, None), _interval(1, None)
_PROBABILITY = _interval(0, 1)

#: Valid ranges and values by hyperparameter name (``<loss>.<key>`` first, where one loss's key differs), from the
#: papers' definitions (docs/algorithms.md); keys not listed take any value of their type.
RANGES: dict[str, _Check] = {
    # losses (docs/algorithms.md 2-3, 5)
    "beta": _POSITIVE,
    "eps": _interval(0, 0.5, "[)"),  # cDPO / robust DPO / AOT: a label-flip rate (TRL label_smoothing)
    "exo.eps": _interval(0, 1, "()"),  # EXO's target p_l = eps (TRL raises at 0)
    "discopop.tau": _POSITIVE,
    "kind": _one_of(lambda: GPO_KINDS),
    "f_divergence": _one_of(lambda: F_DIVERGENCES),
    "tdpo.variant": _one_of(lambda: (1, 2)),
    "eps_low": _NON_NEGATIVE,
    "eps_high": _NON_NEGATIVE,
    "kl_coef": _NON_NEGATIVE,
    "kl_estimator": _one_of(lambda: KL_ESTIMATORS),
    "loss_type": _one_of(lambda: tuple(GRPO_LOSS_TYPES)),
    "importance_sampling_level": _one_of(lambda: ("token", "sequence")),
    "max_completion_length": _AT_LEAST_ONE,
    "num_items": _POSITIVE,
    # pairwise options and loop options
    "ld_alpha": _PROBABILITY,
    "ref_sync_steps": _NON_NEGATIVE,
    "ref_sync_alpha": _interval(0, 1, "(]"),
    # rollout
    "num_samples": _AT_LEAST_ONE,
    "temperature": _POSITIVE,
    "top_p": _interval(0, 1, "(]"),
    "max_new_tokens": _AT_LEAST_ONE,
    "generation_batch_size": _AT_LEAST_ONE,
    "num_iterations": _AT_LEAST_ONE,
    "num_minibatches": _AT_LEAST_ONE,
    "accuracy_reward": _one_of(lambda: sorted(REWARD_FUNCTIONS)),
    "advantage": _one_of(lambda: ESTIMATORS),
    "adv_eps": _NON_NEGATIVE,
    "scale_rewards": _one_of(lambda: SCALES),
    "reward_kl_coef": _NON_NEGATIVE,
    "reward_kl_estimator": _one_of(lambda: KL_ESTIMATORS),
    "max_sampling_tries": _NON_NEGATIVE,
    "overlong_buffer_frac": _interval(0, 1, "[)"),
    "gae_gamma": _PROBABILITY,
    "gae_lambda": _PROBABILITY,
    "vf_lr": _POSITIVE,
    "vf_epochs": _AT_LEAST_ONE,
    "cliprange_value": _NON_NEGATIVE,
    "chosen": _one_of(lambda: PAIR_BUILDERS),
}

#: Hyperparameter groups (see the module docstring): the family's ``FamilyTraits.hparams`` names them.
GROUPS: dict[str, Callable[[registry.Algorithm], Mapping[str, Any]]] = {
    "loss": lambda algo: algo.loss_spec.defaults if algo.loss_spec is not None else {},
    "pairwise": lambda algo: PAIRWISE_OPTIONS,
    "rollout": lambda algo: ROLLOUT_DEFAULTS,
    "loop": lambda algo: LOOP_OPTIONS,
}


def schema(name: str) -> dict[str, Any]:
    """Every key algorithm ``name`` accepts with its default (the groups its family accepts, in their order)."""
    algo = registry.get(name)
    keys: dict[str, Any] = {}
    for group in algo.traits.hparams:
        keys.update(GROUPS[group](algo))
    return keys


def group_of(algo: registry.Algorithm, group: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``hparams`` that belong to ``group`` (one of ``GROUPS``) for ``algo``."""
    keys = GROUPS[group](algo)
    return {k: v for k, v in hparams.items() if k in keys}


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _typed(name: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the key's type (from its default, or ``NULLABLE``), or the one-line ValueError."""
    kind = NULLABLE.get(key, type(default)) if default is None or key in NULLABLE else type(default)
    where = f"{name}: algo.{key}"
    if value is None:
        if key in NULLABLE or default is None:
            return None
        raise ValueError(f"{where} must be set (null is not valid; default {_describe(default)})")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: {_describe(value)} is not true or false")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}: {value} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {_describe(value)} is not a number") from None
        if math.isnan(number):
            raise ValueError(f"{where}: nan is not a number")
        if kind is int:
            if not number.is_integer():
                raise ValueError(f"{where}: {_describe(value)} is not an integer")
            return int(number)
        return float(number)
    if kind is str:
        if isinstance(value, str):
            return value
        if key in RANGES:  # an enumerated key: say which values it takes
            return value
        raise ValueError(f"{where}: {_describe(value)} is not a string")
    if kind is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: {_describe(value)} is not a mapping")
        return dict(value)
    return value


def _check(name: str, key: str, value: Any, loss: str | None) -> None:
    check = RANGES.get(f"{loss}.{key}") or RANGES.get(key)
    if value is None or check is None:
        return
    if not check.ok(value):
        raise ValueError(f"{name}: algo.{key} must be {check.text}, got {_describe(value)}")


def _ref_sync_steps(name: str, value: Any, default: Any) -> Any:
    """Optimizer steps (>= 0; 0 or null: never), or ``epoch`` (SPIN's iterations)."""
    if value in ("epoch", None):
        return value
    if value in ("null", "none"):
        return None
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError(f"{name}: algo.ref_sync_steps must be a number of optimizer steps, 'epoch' or null, "
                         f"got {value!r}")
    value = _typed(name, "ref_sync_steps", value, default)
    _check(name, "ref_sync_steps", value, None)
    return value


def _rewards(name: str, rewards: Any, default: Any) -> dict:
    rewards = _typed(name, "rewards", rewards, default)
    unknown = sorted(set(rewards) - set(REWARD_FUNCTIONS))
    if unknown:
        raise ValueError(f"{name}: algo.rewards names unknown reward function(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(sorted(REWARD_FUNCTIONS))}")
    out = {}
    for k, v in rewards.items():
        out[str(k)] = _typed(name, f"rewards.{k}", v, 1.0)
    return out


#: Keys with their own parser (a value set beyond one type): ``fn(algorithm name, value, default) -> clean value``.
PARSERS: dict[str, Callable[[str, Any, Any], Any]] = {"ref_sync_steps": _ref_sync_steps, "rewards": _rewards}


def validate(name: str, hparams: Mapping[str, Any]) -> dict:
    """The cleaned ``hparams`` of algorithm ``name`` (each value as its key's type; defaults are NOT filled in), or a
    ValueError of one line naming the algorithm, the key and the valid keys, range or values."""
    algo = registry.get(name)
    keys = schema(name)
    unknown = [k for k in hparams if k not in keys]
    if unknown:
        which = ", ".join(repr(str(k)) for k in unknown)
        raise ValueError(f"{name}: unknown hyperparameter{'s' if len(unknown) > 1 else ''} {which}; valid: "
                         f"{', '.join(sorted(keys)) or '(none)'}")
    clean = {}
    for key, value in hparams.items():
        parse = PARSERS.get(key)
        if parse is not None:
            clean[key] = parse(name, value, keys[key])
            continue
        clean[key] = _typed(name, key, value, keys[key])
        _check(name, key, clean[key], algo.loss)
    merged = {**keys, **dict(algo.options), **clean}
    estimator = ESTIMATORS.get(merged.get("advantage"))
    if "rollout" in algo.traits.hparams and estimator is not None and estimator.needs_values \
            and merged.get("dynamic_sampling"):
        raise ValueError(f"{name}: algo.dynamic_sampling cannot be combined with advantage={merged['advantage']!r} "
                         "(the value head is fitted on every rollout of every rank)")
    return clean
