"""The algorithm registry: an algorithm is data (shared/DESIGN.md, "An algorithm is data, not a trainer").

An entry names its family (which objective of :mod:`posttrain.algorithms.objectives` the one training loop runs),
its data kind, its loss (a name in the family's loss table in :mod:`posttrain.losses`) and the study's taxonomy
category. Whether it needs a reference model and whether it length-normalises are read from the loss spec, so
they cannot drift from the function. Adding an algorithm = one entry here + its loss + conf/algo/<name>.yaml + tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain import losses

#: Families the loop knows, with the data each consumes.
FAMILIES = ("supervised", "pairwise", "unpaired", "online")

#: The study's taxonomy of its 20 DPO variants (OXRL, arXiv 2603.19335), plus supervised/online/other.
CATEGORIES = ("vanilla", "reference-free", "alternative divergence", "weighting/calibration", "robustness",
              "data augmentation", "unpaired", "supervised", "online", "other")


@dataclass(frozen=True)
class Algorithm:
    name: str
    family: str
    loss: str | None  # name in the family's loss table (None for the supervised NLL)
    data: str  # selfplay_chosen | gold | pairs | unpaired | prompts
    category: str = "other"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown family {self.family!r}; known: {FAMILIES}")
        if self.category not in CATEGORIES:
            raise ValueError(f"{self.name}: unknown category {self.category!r}; known: {CATEGORIES}")

    @property
    def loss_spec(self):
        table = {"pairwise": losses.PAIRWISE_LOSSES, "unpaired": losses.UNPAIRED_LOSSES,
                 "online": losses.POLICY_GRADIENT_LOSSES}.get(self.family)
        return None if table is None else table[self.loss]

    @property
    def reference_free(self) -> bool:
        spec = self.loss_spec
        return True if spec is None else bool(getattr(spec, "reference_free", False))

    @property
    def length_normalized(self) -> bool:
        spec = self.loss_spec
        return bool(getattr(spec, "length_normalized", False)) if spec is not None else True

    def needs_reference(self, hparams: dict) -> bool:
        """Reference forward passes are run only when this is true (reference-free losses never run one)."""
        if self.family == "online":
            return float(hparams.get("kl_coef", 0.0) or 0.0) != 0.0
        return not self.reference_free

    def meta(self) -> dict:
        """The ``algo_meta`` block of result.json."""
        return {"family": self.family, "category": self.category, "reference_free": self.reference_free,
                "length_normalized": self.length_normalized}


def _entries(*algos: Algorithm) -> dict[str, Algorithm]:
    return {a.name: a for a in algos}


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
)


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}") from None
