"""The Family records: the only dispatch the training loop does (docs/design.md, "An algorithm is data").

A registry entry names its family (``Algorithm.family``); ``of(algo)`` gives its :class:`Family`, whose fields the
loop calls and nothing else:

- ``prepare(policy, reference, tokenizer, algo, hparams, micro_batches, *, max_length, seed, step, memory, pool,
  collectives) -> ([[micro-batch, ...], ...], stats)`` (``collectives``: the loop's engine, through which every
  collective of the step goes): how a step's examples become optimizer updates, one inner list per
  update, each micro-batch carrying ``examples`` (its share of the update's example count). Offline: tokenise, one
  update; online: the rollout phase, then ``num_iterations`` x ``num_minibatches`` updates;
- ``objective(policy, reference, batch, algo, hparams, ctx) -> (loss, stats)``: a micro-batch's loss, already
  scaled for gradient accumulation (posttrain.algorithms.objectives);
- ``updates_per_batch(algo, hparams, micro-batches per rank and step) -> int``: optimizer updates per batch of
  examples (the loop's schedule needs it upfront; the online one refuses minibatches the step cannot fill);
- ``step_hook(algo, hparams, *, pool, seed) -> annotate | None``: ``annotate(step's examples, step) -> examples``
  runs on each optimizer step's examples before the loop splits them into micro-batches and ranks, for what must
  be decided on the whole step (KTO's mismatched partners).

What the registry needs to know of a family without its code (the family result.json reports, its loss table, its
hyperparameter groups) is ``registry.FAMILIES``; the two tables have the same keys (tests/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from posttrain.algorithms import objectives, online


@dataclass(frozen=True)
class Family:
    name: str
    prepare: Callable
    objective: Callable
    updates_per_batch: Callable
    step_hook: Callable
    #: trainer.group_by_length applies (offline: the same step in another split; online: the step's prompts are
    #: sampled in order, so another order would draw other samples)
    groups_by_length: bool = False
    #: its log-prob forwards run the rows that share a prompt (a pair's chosen and rejected, a group's samples)
    #: behind one copy of it under trainer.shared_prompt (posttrain.models.shared_prompt; the pairwise objective
    #: keeps two rows for WPO's full-vocabulary logits); TDPO's logits and KTO's unpaired rows do not
    shares_prompt: bool = True


def _one_update(algo, hparams, micro_batches_per_rank: int | None = None) -> int:
    return 1


def _no_step_hook(algo, hparams, *, pool: list, seed: int):
    return None


def _offline(name: str, objective: Callable, prepare: Callable = objectives.offline_batches,
             step_hook: Callable = _no_step_hook, shares_prompt: bool = True) -> Family:
    return Family(name, prepare, objective, _one_update, step_hook, groups_by_length=True,
                  shares_prompt=shares_prompt)


def _online(name: str, prepare: Callable, objective: Callable) -> Family:
    return Family(name, prepare, objective, online.updates_per_step, _no_step_hook)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _offline("supervised", objectives.supervised),
    _offline("pairwise", objectives.pairwise),
    _offline("token_pairwise", objectives.token_pairwise, shares_prompt=False),
    _offline("unpaired", objectives.unpaired, objectives.unpaired_batches, objectives.kto_partners,
             shares_prompt=False),
    _online("online_policy_gradient", online.prepare_policy_gradient, online.policy_gradient_objective),
    _online("online_pairwise", online.prepare_pairwise, online.pairwise_objective),
    _online("online_supervised", online.prepare_supervised, objectives.supervised),
)}


def of(algo) -> Family:
    """The Family record of a registry entry."""
    return FAMILIES[algo.family]
