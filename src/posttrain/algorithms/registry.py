"""The algorithm registry: an algorithm is data (docs/design.md, "An algorithm is data, not a trainer").

An entry names its family (the :class:`posttrain.algorithms.families.Family` record the one training loop runs:
how a step's examples become batches, the objective, updates per batch), its data kind, its loss (a name in the
family's loss table in :mod:`posttrain.losses`) and the study's taxonomy category. Whether it needs a reference model
and whether it length-normalises are read from the loss spec, so they cannot drift from the function. Every key an
algorithm accepts, with its default, type and range, is in :mod:`posttrain.algorithms.hparams`. Adding an
algorithm = one entry here (or a loss-table row) + its loss + conf/algo/<name>.yaml + tests (CONTRIBUTING.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from posttrain import losses


class FamilyTraits(NamedTuple):
    """What the registry knows of a family (its code is the Family record of posttrain.algorithms.families)."""

    reported: str  # the family result.json's algo_meta reports (supervised | pairwise | unpaired | online)
    losses: Mapping | None  # the loss table the entry's ``loss`` names (None: the supervised NLL)
    hparams: tuple[str, ...]  # the hyperparameter groups it accepts (posttrain.algorithms.hparams.GROUPS)
    kl_in_reward: bool = False  # a KL folded into the reward (reward_kl_coef) needs the reference too
    #: its reference use is the sequence log-prob of each example's own rows, which the per-scale cache can give
    #: (posttrain.algorithms.reference_cache)
    cached_reference: bool = False


#: Family record name -> its traits. ``families.FAMILIES`` holds one record per name (a test keeps them equal).
FAMILIES: dict[str, FamilyTraits] = {
    "supervised": FamilyTraits("supervised", None, ("loop",)),
    "pairwise": FamilyTraits("pairwise", losses.PAIRWISE_LOSSES, ("loss", "pairwise", "loop"),
                             cached_reference=True),
    # TDPO: pairs with full-vocabulary reference terms (its loss needs the reference's logits, not log-probs)
    "token_pairwise": FamilyTraits("pairwise", losses.TOKEN_PAIRWISE_LOSSES, ("loss", "loop")),
    "unpaired": FamilyTraits("unpaired", losses.UNPAIRED_LOSSES, ("loss", "loop"), cached_reference=True),
    "online_policy_gradient": FamilyTraits("online", losses.POLICY_GRADIENT_LOSSES, ("loss", "rollout", "loop"),
                                           kl_in_reward=True),
    "online_pairwise": FamilyTraits("online", losses.PAIRWISE_LOSSES, ("loss", "rollout", "loop")),
    "online_supervised": FamilyTraits("online", None, ("rollout", "loop")),
}

#: The study's taxonomy of its 20 DPO variants (OXRL, arXiv 2603.19335), plus supervised/online/other.
CATEGORIES = ("vanilla", "reference-free", "alternative divergence", "weighting/calibration", "robustness",
              "data augmentation", "unpaired", "supervised", "online", "other")


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: str  # a key of FAMILIES
    loss: str | None  # name in the family's loss table (None for the supervised NLL)
    data: str  # selfplay_chosen | gold | pairs | unpaired | prompts
    category: str = "other"
    #: The values that make this method what it is (its advantage estimator, KL-in-reward coefficient, loss_type,
    #: ...), under the run's hparams (algo.* wins); every key is one of posttrain.algorithms.hparams's schema, and
    #: conf/algo/<name>.yaml spells the same values out (tests/test_hparams.py and test_online.py check both).
    options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.category not in CATEGORIES:
            raise ValueError(f"{self.name}: unknown category {self.category!r}; known: {CATEGORIES}")

    @property
    def traits(self) -> FamilyTraits:
        return FAMILIES[self.family]

    @property
    def loss_spec(self):
        table = self.traits.losses
        return None if table is None or self.loss is None else table[self.loss]

    @property
    def reference_free(self) -> bool:
        return not self.needs_reference({})  # at the entry's own settings (e.g. RLOO's KL in the reward)

    @property
    def length_normalized(self) -> bool:
        spec = self.loss_spec
        return bool(getattr(spec, "length_normalized", False)) if spec is not None else True

    def needs_reference(self, hparams: dict) -> bool:
        """Reference forward passes are run only when this is true (reference-free losses never run one).

        The loss spec's own need (``LossSpec.needs_reference``: not reference-free; a policy-gradient spec:
        ``kl_coef != 0``, asked with only the keys it accepts), or, where the family folds a KL into the reward
        (``FamilyTraits.kl_in_reward``: RLOO, REINFORCE++, PPO), ``reward_kl_coef != 0``; the supervised NLL never.
        """
        spec = self.loss_spec
        if spec is None:
            return False
        hp = {**self.options, **dict(hparams or {})}
        loss_hp = {k: v for k, v in hp.items() if k in spec.defaults}
        kl_in_reward = self.traits.kl_in_reward and float(hp.get("reward_kl_coef", 0.0) or 0.0) != 0.0
        return bool(spec.needs_reference(**loss_hp)) or kl_in_reward

    def reference_cacheable(self, hparams: dict) -> bool:
        """Whether every reference value this run needs is a frozen reference's log-prob of an example's own row, so
        the per-scale cache can give them all and no reference model is kept (posttrain.algorithms.reference_cache):
        the family's trait, a reference needed at all, and none of the options that need more (a moving reference:
        ``ref_sync_steps``; LD-DPO's per-token ``ld_alpha``; KTO's z0 over mismatched rows drawn per step)."""
        hp = {**self.options, **dict(hparams or {})}
        spec = self.loss_spec
        return (self.traits.cached_reference and self.needs_reference(hparams)
                and not getattr(spec, "needs_kl_anchor", False)
                and hp.get("ld_alpha") is None and not hp.get("ref_sync_steps"))

    def meta(self) -> dict:
        """The ``algo_meta`` block of result.json."""
        return {"family": self.traits.reported, "category": self.category, "reference_free": self.reference_free,
                "length_normalized": self.length_normalized}


def _entries(*algos: Algorithm) -> dict[str, Algorithm]:
    return {a.name: a for a in algos}


def _online(name: str, loss: str | None, family: str = "online_policy_gradient", data: str = "prompts",
            **options) -> Algorithm:
    return Algorithm(name, family, loss, data, "online", options=options)


#: Online methods (docs/algorithms.md 4-5): the preparer samples from the current policy, scores, and builds batches;
#: ``options`` carry what distinguishes them (posttrain.algorithms.hparams.ROLLOUT_DEFAULTS lists every key).
ONLINE = (
    # the study's three (OXRL 5.6): group z-score advantages (eps 1e-8), 4 samples, kl_coef 0
    _online("sgrpo", "sgrpo", advantage="group_zscore"),
    _online("gspo", "gspo", advantage="group_zscore"),
    _online("cispo", "cispo", advantage="group_zscore"),
    # TRL GRPOTrainer (5.2): std eps 1e-4, loss_type dapo (its default)
    _online("grpo", "grpo", advantage="group_zscore", adv_eps=1e-4),
    # Dr. GRPO (5.3): no std scaling, sum / (B * max completion length)
    _online("dr_grpo", "grpo", advantage="group_zscore", scale_rewards="none", loss_type="dr_grpo"),
    # DAPO (5.4): clip-higher, dynamic sampling, token-level loss, overlong filtering + soft punishment
    _online("dapo", "grpo", advantage="group_zscore", adv_eps=1e-4, loss_type="dapo", eps_low=0.2, eps_high=0.28,
            dynamic_sampling=True, mask_truncated=True, overlong_buffer_frac=0.2),
    # RLOO (5.7): leave-one-out baseline, KL in the (sequence) reward, TRL beta 0.05
    _online("rloo", "rloo", advantage="leave_one_out", reward_kl_coef=0.05),
    # REINFORCE++ (5.8): KL in the per-token reward, returns-to-go, global normalisation
    _online("reinforce_pp", "reinforce_pp", advantage="reinforce_pp", reward_kl_coef=0.01),
    # ReMax (5.9): one sample and one greedy decode per prompt, A = R - R_greedy
    _online("remax", "remax", advantage="remax", num_samples=1),
    # PPO (5.1): value head + GAE, KL (k1) in the per-token reward, TRL kl_coef 0.05 and num_ppo_epochs 4
    _online("ppo", "ppo", advantage="gae", reward_kl_coef=0.05, num_iterations=4),
    # Online DPO (4.1): 2 samples, best vs worst by reward, DPO against the frozen reference
    _online("online_dpo", "dpo", "online_pairwise", chosen="best_sample", num_samples=2),
    # SPIN (4.2): chosen = the gold solution, rejected = a sample of the current policy; the reference moves to
    # the policy at every epoch end (one epoch = one SPIN iteration, algorithms/reference_sync)
    _online("spin", "dpo", "online_pairwise", data="gold", chosen="gold", num_samples=1,
            ref_sync_steps="epoch"),
    # RFT (4.3): SFT on the samples that pass the verifier, de-duplicated
    _online("rft", None, "online_supervised", keep_threshold=0.5),
)


#: The study's taxonomy of its 20 DPO variants (issue 4 / OXRL); every other offline variant is "other".
TAXONOMY = {
    "vanilla": ("dpo",),
    "reference-free": ("orpo", "cpo", "simpo", "alphapo"),
    "alternative divergence": ("ipo", "gpo", "hinge", "rdpo"),
    "weighting/calibration": ("dpop", "caldpo", "focalpo", "betadpo"),
    "robustness": ("robust_dpo", "cdpo"),
    "data augmentation": ("sppo", "odpo", "apo_zero", "exo"),
    "unpaired": ("kto",),
}
_CATEGORY = {name: category for category, names in TAXONOMY.items() for name in names}

ALGORITHMS: dict[str, Algorithm] = _entries(
    Algorithm("sft", "supervised", None, "selfplay_chosen", "supervised"),
    Algorithm("gold_sft", "supervised", None, "gold", "supervised"),
    *(Algorithm(name, "pairwise", name, "pairs", _CATEGORY.get(name, "other")) for name in losses.PAIRWISE_LOSSES),
    Algorithm("kto", "unpaired", "kto", "unpaired", "unpaired"),
    Algorithm("apo_zero_unpaired", "unpaired", "apo_zero_unpaired", "unpaired", "other"),
    Algorithm("bco_unpaired", "unpaired", "bco", "unpaired", "other"),
    Algorithm("tdpo", "token_pairwise", "tdpo", "pairs", "other"),
    *ONLINE,
)


def register(algo: Algorithm) -> Algorithm:
    """Add an entry at runtime (a plugin, a test; CONTRIBUTING.md): the same as a row in ``ALGORITHMS``."""
    if algo.name in ALGORITHMS:
        raise ValueError(f"algorithm {algo.name!r} is already registered")
    ALGORITHMS[algo.name] = algo
    return algo


def unregister(name: str) -> None:
    ALGORITHMS.pop(name, None)


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}") from None
