"""Pair builders of the online pairwise family (docs/algorithms.md 4.1-4.2), by the ``chosen`` hyperparameter.

``build(group, example, tokenizer, algo_name) -> [(prompt ids, chosen ids, rejected ids), ...]`` turns one prompt's
samples (a :class:`posttrain.rollout.groups.Group`) into the pairs the pairwise objective trains on.
"""

from __future__ import annotations

import torch


def best_sample(group, example: dict, tokenizer, algo_name: str) -> list[tuple]:
    """Online DPO: the best vs the worst sample by reward; ties give no pair."""
    if float(group.score.max()) > float(group.score.min()):
        best, worst = int(torch.argmax(group.score)), int(torch.argmin(group.score))
        return [(group.prompt_ids, group.completion_ids[best], group.completion_ids[worst])]
    return []


def gold(group, example: dict, tokenizer, algo_name: str) -> list[tuple]:
    """SPIN: the gold solution beats each of the policy's samples."""
    if "completion" not in example:
        raise ValueError(f"{algo_name}: chosen=gold needs examples with a gold 'completion' (data kind gold)")
    ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [(group.prompt_ids, ids, c) for c in group.completion_ids]


#: ``chosen`` value -> pair builder.
PAIR_BUILDERS = {"best_sample": best_sample, "gold": gold}
