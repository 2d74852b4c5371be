"""result.json's ``algo_meta`` block (``Algorithm.meta()``) is part of the run-directory contract (docs/design.md):
its values for every registry entry are pinned here, as the code computed them before the Family redesign."""

from posttrain.algorithms.registry import ALGORITHMS

#: name -> (family, category, reference_free, length_normalized)
META = {
    'sft': ('supervised', 'supervised', True, True),
    'gold_sft': ('supervised', 'supervised', True, True),
    'dpo': ('pairwise', 'vanilla', False, False),
    'dpo_norm': ('pairwise', 'other', False, True),
    'ipo': ('pairwise', 'alternative divergence', False, True),
    'cdpo': ('pairwise', 'robustness', False, False),
    'robust_dpo': ('pairwise', 'robustness', False, False),
    'hinge': ('pairwise', 'alternative divergence', False, False),
    'exo': ('pairwise', 'data augmentation', False, False),
    'nca': ('pairwise', 'other', False, False),
    'bco': ('pairwise', 'other', False, False),
    'sppo': ('pairwise', 'data augmentation', False, False),
    'aot': ('pairwise', 'other', False, False),
    'aot_unpaired': ('pairwise', 'other', False, False),
    'apo_zero': ('pairwise', 'data augmentation', False, False),
    'apo_down': ('pairwise', 'other', False, False),
    'discopop': ('pairwise', 'other', False, False),
    'dpop': ('pairwise', 'weighting/calibration', False, False),
    'rdpo': ('pairwise', 'alternative divergence', False, False),
    'simpo': ('pairwise', 'reference-free', True, True),
    'cpo': ('pairwise', 'reference-free', True, False),
    'orpo': ('pairwise', 'reference-free', True, True),
    'alphapo': ('pairwise', 'reference-free', True, True),
    'rpo': ('pairwise', 'other', False, False),
    'odpo': ('pairwise', 'data augmentation', False, False),
    'caldpo': ('pairwise', 'weighting/calibration', False, False),
    'focalpo': ('pairwise', 'weighting/calibration', False, False),
    'gpo': ('pairwise', 'alternative divergence', False, False),
    'betadpo': ('pairwise', 'weighting/calibration', False, False),
    'dpo_shift': ('pairwise', 'other', False, False),
    'minor_dpo': ('pairwise', 'other', False, False),
    'c2dpo': ('pairwise', 'other', False, False),
    'chipo': ('pairwise', 'other', False, False),
    'bpo': ('pairwise', 'other', False, False),
    'spo': ('pairwise', 'other', False, False),
    'kto': ('unpaired', 'unpaired', False, False),
    'apo_zero_unpaired': ('unpaired', 'other', False, False),
    'bco_unpaired': ('unpaired', 'other', False, False),
    'tdpo': ('pairwise', 'other', False, False),
    'sgrpo': ('online', 'online', True, False),
    'gspo': ('online', 'online', True, True),
    'cispo': ('online', 'online', True, False),
    'grpo': ('online', 'online', True, False),
    'dr_grpo': ('online', 'online', True, False),
    'dapo': ('online', 'online', True, False),
    'rloo': ('online', 'online', False, False),
    'reinforce_pp': ('online', 'online', False, False),
    'remax': ('online', 'online', True, False),
    'ppo': ('online', 'online', False, False),
    'online_dpo': ('online', 'online', False, False),
    'spin': ('online', 'online', False, False),
    'rft': ('online', 'online', True, True),
}


def test_every_entry_keeps_its_algo_meta():
    assert set(ALGORITHMS) == set(META)
    for name, (family, category, reference_free, length_normalized) in META.items():
        assert ALGORITHMS[name].meta() == {"family": family, "category": category, "reference_free": reference_free,
                                           "length_normalized": length_normalized}, name
