"""Online methods in the one training loop: the rollout phase and the objectives of the three online families.

The online Family records (posttrain.algorithms.families) are parts of this module: ``prepare_policy_gradient``,
``prepare_pairwise`` and ``prepare_supervised`` are their ``prepare`` fields. For the optimizer step's examples (data
kind ``prompts``: ``{prompt, answer}``; SPIN's ``gold``: ``{prompt, completion}``) it samples ``num_samples``
completions per prompt from the CURRENT policy with :func:`posttrain.rollout.sample` (seeded by run seed and step, so a
resumed run regenerates the same rollouts), scores them with :mod:`posttrain.rewards`, and turns them into padded
micro-batches for the family the registry entry names (sampling and scoring: :mod:`posttrain.rollout.groups`):

- ``online_policy_gradient`` (sgrpo, gspo, cispo, grpo, dr_grpo, dapo, rloo, reinforce_pp, remax, ppo): advantages by
  the entry's ``advantage`` estimator (posttrain.algorithms.advantages: group z-score, leave-one-out, REINFORCE++,
  ReMax's greedy baseline, PPO's GAE on the value head of posttrain.algorithms.critic), reference log-probs only when
  the loss's ``kl_coef`` or a KL folded into the reward (``reward_kl_coef``) is non-zero; the objective runs
  :func:`posttrain.losses.policy_gradient`;
- ``online_pairwise`` (online_dpo, spin): generated pairs (``chosen``: a builder of posttrain.algorithms.pairs) through
  the pairwise objective of :mod:`posttrain.algorithms.objectives`;
- ``online_supervised`` (rft): the samples that pass the verifier, de-duplicated, through the SFT objective.

There is no chain over algorithm names: everything is driven by the registry entry's ``options`` and the run's
hyperparameters (``algo.*``), merged in that order, validated by posttrain.algorithms.hparams and split into its
groups (``loss``, ``rollout``).

Updates per rollout (docs/algorithms.md 5, "common rollout loop"): the rollout of a batch of prompts feeds
``num_iterations`` (mu: TRL's ``num_iterations``, PPO's epochs) passes, each split into ``num_minibatches``
consecutive minibatches of the step's micro-batches (PPO's mini-batches; TRL's ``steps_per_generation`` counted in
optimizer steps), one optimizer step each: ``num_iterations * num_minibatches`` steps per rollout
(``updates_per_step``; the loop's schedule and ``trainer.max_steps`` count them). With both at 1 (the default, TRL's
and the study's) the run is on-policy: every micro-batch is evaluated before the one update, so the sampling policy
pi_old IS the policy of the objective's forward, the objective passes ``old_logps=None`` (TRL's
``old = current.detach()``) and the ratio is exactly 1 -- sgrpo, gspo and cispo then differ only in how they
aggregate. With more than one update per rollout the rollout phase records pi_old's log-probs (no grad) and every
later update sees a ratio != 1, where the clipping (token, sequence, importance-weight) makes the methods differ.
Old log-probs are also computed where something else consumes them: the KL folded into the reward (k1 = old - ref)
and PPO's per-token rewards. ``num_minibatches`` must divide the micro-batches a rank has per step
(``grad_accum / ranks``; refused otherwise); a minibatch left empty on every rank (DAPO's filter, the short last step
of an epoch) advances the LR schedule without touching the weights.

Aggregation and gradient accumulation (``ctx`` = the whole optimizer update over all ranks): losses whose spec says
``step_token_mean`` (cispo, reinforce_pp, remax, ppo, grpo with loss_type dapo) divide their token sum by
``ctx.tokens`` (TRL's ``num_items_in_batch``), so an update is a true token mean whatever the micro-batch split; the
others are micro-batch means (sgrpo and grpo/bnpo: the micro-batch's token mean, as OXRL and TRL; gspo, rloo,
grpo/grpo: sequence means; dr_grpo: sum / (B * max_completion_length)) weighted by the micro-batch's share of the
update's completions (``examples / ctx.examples``; = TRL's division by the accumulation steps for equal
micro-batches). ``micro_batch_size`` counts prompts: a micro-batch holds ``micro_batch_size * num_samples``
completions.

DAPO (Yu et al. 2025, arXiv 2503.14476), all driven by hyperparameters: ``dynamic_sampling`` drops groups whose RAW
accuracy (``accuracy_reward``, not the shaped reward) is all 0 or all 1 and back-fills the step with fresh groups
for NEW prompts, as the paper and verl do: each extra round samples a step's worth of prompts drawn from the training
set (seeded by run seed, step, round and rank, so a resumed run draws the same) and keeps the informative groups it
needs (up to ``max_sampling_tries`` extra rounds, then the step goes on with what it has); ``mask_truncated``
(overlong filtering) removes completions without EOS from the loss; ``overlong_buffer_frac`` > 0 adds the soft
overlong punishment over the last ``frac * max_new_tokens`` tokens; clip-higher is the loss's ``eps_high``.

PPO's value head is a loop component (posttrain.algorithms.critic), fitted here after the advantages were computed
with the pre-update values. PPO runs TRL's ``num_ppo_epochs`` = 4 policy passes per rollout (``num_iterations``).

Why this module is over ~400 lines: it holds the three online families' rollout phases and objectives side by side
(they share the update schedule, the no-grad forwards and the hyperparameter split); sampling, scoring, advantages,
pairs and the critic are their own modules.
"""

from __future__ import annotations

import math

import torch

from posttrain.algorithms import objectives
from posttrain.algorithms.advantages import ESTIMATORS, AdvantageInputs
from posttrain.algorithms.critic import fit_value_head, predict_values, value_head
from posttrain.algorithms.hparams import ROLLOUT_DEFAULTS, group_of, validate
from posttrain.algorithms.memory import LoopMemory
from posttrain.algorithms.pairs import PAIR_BUILDERS
from posttrain.data.collate import pad_rows
from posttrain.losses.policy_gradient import policy_gradient_and_stats
from posttrain.models.engine import PROCESS_GROUP, gathered
from posttrain.models.logps import logps_and_hidden, shared_token_logps
from posttrain.rollout.groups import (ScoredRollout, draw_prompts, greedy_scores, rollout_stats, sample_groups,
                                     sampling_seed)


# ---------------------------------------------------------------------------------------------------------------------
# hyperparameters and the update schedule


def split_hparams(algo, hparams: dict | None) -> tuple[dict, dict]:
    """``(loss hparams, rollout settings)`` from the entry's ``options`` and the run's ``hparams`` (which win),
    validated once (posttrain.algorithms.hparams.validate: an unknown key or a bad value is one ValueError line).

    The rollout settings come back complete (``ROLLOUT_DEFAULTS`` filled in). dr_grpo's ``max_completion_length``
    defaults to ``max_new_tokens`` (docs/algorithms.md 6.8: keep the constant consistent with the generation length).
    """
    clean = validate(algo.name, {**dict(algo.options), **dict(hparams or {})})
    loss_hp = group_of(algo, "loss", clean)
    rc = {**ROLLOUT_DEFAULTS, **group_of(algo, "rollout", clean)}
    spec = algo.loss_spec
    if spec is not None and "max_completion_length" in spec.defaults and "max_completion_length" not in loss_hp:
        loss_hp["max_completion_length"] = int(rc["max_new_tokens"])
    return loss_hp, rc


def updates_per_step(algo, hparams: dict | None, micro_batches_per_rank: int | None = None) -> int:
    """Optimizer updates per rollout (the online Families' ``updates_per_batch``): ``num_iterations *
    num_minibatches``.

    Minibatches are made of whole micro-batches, so each rank's micro-batches of a step (``grad_accum / ranks``)
    must split evenly into ``num_minibatches``; anything else would leave minibatches empty on every full step."""
    _, rc = split_hparams(algo, hparams)
    m = rc["num_minibatches"]
    if micro_batches_per_rank is not None and (micro_batches_per_rank < m or micro_batches_per_rank % m):
        raise ValueError(f"{algo.name}: num_minibatches={m} needs a multiple of {m} micro-batches per step on each "
                         f"rank, and trainer.grad_accum / ranks = {micro_batches_per_rank}: set trainer.grad_accum to "
                         f"a multiple of {m} x ranks (and micro_batch_size to the prompts of one minibatch's part)")
    return rc["num_iterations"] * m


def schedule_updates(batches: list[dict], rc: dict) -> list[list[dict]]:
    """The rollout's micro-batches as optimizer updates: ``num_iterations`` passes, each over ``num_minibatches``
    consecutive minibatches (a minibatch may be empty when the rollout has fewer micro-batches: the short last step of
    an epoch, DAPO's filter; the loop then advances the schedule without an update)."""
    m = rc["num_minibatches"]
    per = math.ceil(len(batches) / m) if batches else 0
    minibatches = [batches[i * per:(i + 1) * per] for i in range(m)]
    return [list(mb) for _ in range(rc["num_iterations"]) for mb in minibatches]


def uses_step_tokens(algo, loss_hp: dict) -> bool:
    """True when the loss divides by the whole step's completion-token count (its spec's ``step_token_mean``) and
    the run did not fix ``num_items`` itself."""
    return algo.loss_spec.step_token_mean(loss_hp) and loss_hp.get("num_items") is None


# ---------------------------------------------------------------------------------------------------------------------
# no-grad forwards of the rollout phase


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _chunks(n_rows: int, sizes: list[int]) -> list[slice]:
    out, start = [], 0
    for size in sizes:
        if start >= n_rows:
            break
        out.append(slice(start, min(start + size, n_rows)))
        start += size
    return out


@torch.no_grad()
def _forward_logps(model, step: dict, chunks: list[slice], temperature: float, hidden: bool = False,
                   shared_prompt: bool = False) -> tuple[torch.Tensor, list | None]:
    """No-grad per-token log-probs [N, T-1] of the step batch, one micro-batch at a time (each cut to its own
    width); with ``hidden`` also ``[(rows, width, last hidden state [n, width-1, H])]`` for PPO's value head."""
    n, width = step["input_ids"].shape
    logps = torch.zeros((n, width - 1), dtype=torch.float32)
    states = [] if hidden else None
    device = _device(model)
    for rows in chunks:
        w = int(step["attention_mask"][rows].sum(-1).max())
        ids = step["input_ids"][rows, :w].to(device)
        attn = step["attention_mask"][rows, :w].to(device)
        comp = step["completion_mask"][rows, :w].to(device)  # a group's samples: one prompt copy (as the update)
        if not hidden:
            logps[rows, : w - 1] = shared_token_logps(model, ids, attn, comp, temperature,
                                                      shared_prompt=shared_prompt).float().cpu()
            continue
        lp, last_hidden = logps_and_hidden(model, ids, attn, comp, temperature, shared_prompt=shared_prompt)
        logps[rows, : w - 1] = lp.cpu()
        states.append((rows, w, last_hidden.detach()))
    return logps, states


def _reference_logps(reference, step: dict, chunks, temperature: float, shared_prompt: bool = False) -> torch.Tensor:
    if not reference.enabled:
        raise ValueError("this online configuration needs reference log-probs (kl_coef or reward_kl_coef != 0) but "
                         "no reference model was built (Algorithm.needs_reference said no)")
    with reference.active() as ref_model:
        return _forward_logps(ref_model, step, chunks, temperature, shared_prompt=shared_prompt)[0]


# ---------------------------------------------------------------------------------------------------------------------
# the three rollout phases: (bare policy, reference, tokenizer, algo, loss_hp, rc, examples, mb_size, ...) ->
# (micro-batches, stats)


def _policy_gradient_batches(policy, reference, tokenizer, algo, loss_hp, rc, examples, mb_size, *,
                             max_length, seed, step, memory, pool, collectives, shared_prompt):
    n = len(examples)
    first = sample_groups(policy, tokenizer, examples, list(range(n)), rc, sampling_seed(seed, step, 0))
    stats = rollout_stats(first)
    groups = first
    if rc["dynamic_sampling"]:
        groups = [g for g in first if g.informative]
        tries = 0
        while len(groups) < n and tries < rc["max_sampling_tries"]:
            tries += 1
            start = len(examples)  # new prompts go after the ones sampled so far; Group.example indexes them
            examples = examples + draw_prompts(pool or examples[:n], n,
                                               sampling_seed(seed, step, tries) + 7_919 * collectives.rank)
            extra = sample_groups(policy, tokenizer, examples, list(range(start, start + n)), rc,
                                  sampling_seed(seed, step, tries))
            groups += [g for g in extra if g.informative][: n - len(groups)]
        stats.update({"dynamic_sampling/kept_frac": len(groups) / n, "dynamic_sampling/tries": float(tries)})
    if not groups:
        return [], stats
    estimator = ESTIMATORS[rc["advantage"]]
    if estimator.needs_greedy:
        greedy_scores(policy, tokenizer, examples, groups, rc, sampling_seed(seed, step, 10_000))

    G = rc["num_samples"]
    rollout = ScoredRollout.of(groups, tokenizer.pad_token_id, max_length)
    batch, mask = rollout.tensors, rollout.mask
    chunks = _chunks(len(rollout.scores), [mb_size * G] * len(groups))
    temperature = float(rc["temperature"])

    need_ref = algo.needs_reference({**loss_hp, **rc})
    off_policy = rc["num_iterations"] * rc["num_minibatches"] > 1  # later updates need pi_old's log-probs
    need_old = off_policy or float(rc["reward_kl_coef"] or 0.0) != 0.0 or estimator.needs_old_logps
    critic = value_head(policy, memory, rc, seed) if estimator.needs_values else None
    states = None
    if need_old:
        rollout.old_logps, states = _forward_logps(policy, batch, chunks, temperature, hidden=critic is not None,
                                                   shared_prompt=shared_prompt)
    values = predict_values(critic.head, states, mask.shape) if critic is not None else None
    if need_ref:
        rollout.ref_logps = _reference_logps(reference, batch, chunks, temperature, shared_prompt)
    old_logps, ref_logps = rollout.old_logps, rollout.ref_logps
    inputs = AdvantageInputs(
        scores=rollout.scores, group_size=G, mask=mask, rc=rc, old_logps=old_logps, ref_logps=ref_logps,
        values=values,
        greedy_scores=(torch.tensor([g.greedy_score for g in groups for _ in g.completion_ids], dtype=torch.float32)
                       if estimator.needs_greedy else None))
    advantages = estimator(inputs)
    if critic is not None:
        stats["value_loss"] = fit_value_head(critic.head, critic.optimizer, states, values, inputs.extra["returns"],
                                             mask, rc, collectives)
        stats["value_mean"] = float(values[mask].mean()) if mask.any() else 0.0
    if ref_logps is not None and old_logps is not None and mask.any():
        stats["kl_ref_rollout"] = float((old_logps - ref_logps)[mask].mean())
    per_token = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(mask)
    stats["advantage_abs_mean"] = float(per_token[mask].abs().mean()) if mask.any() else 0.0

    rollout_completion = None
    if rc["mask_truncated"]:  # DAPO overlong filtering: truncated completions leave the loss (and ctx.tokens)
        rollout_completion = batch["completion_mask"].clone()
        batch["completion_mask"][rollout.truncated] = 0

    out = []
    for rows_ in chunks:
        w = int(batch["attention_mask"][rows_].sum(-1).max())
        mb = {key: batch[key][rows_, :w] for key in ("input_ids", "attention_mask", "completion_mask")}
        if rollout_completion is not None:  # the rows as the old / reference passes saw them, before the filter:
            # the update packs rows that share a prompt the same way, so its log-probs match theirs to the bit
            mb["rollout_completion_mask"] = rollout_completion[rows_, :w]
        mb["advantages"] = advantages[rows_] if advantages.dim() == 1 else advantages[rows_, : w - 1]
        if ref_logps is not None:
            mb["ref_logps"] = ref_logps[rows_, : w - 1]
        if off_policy:
            mb["old_logps"] = old_logps[rows_, : w - 1]
        mb["examples"] = rows_.stop - rows_.start
        out.append(mb)
    return out, stats


def _pairwise_batches(policy, reference, tokenizer, algo, loss_hp, rc, examples, mb_size, *, max_length, seed,
                      step, memory, pool, collectives, shared_prompt):
    groups = sample_groups(policy, tokenizer, examples, list(range(len(examples))), rc,
                           sampling_seed(seed, step, 0))
    stats = rollout_stats(groups)
    build = PAIR_BUILDERS[rc["chosen"]]
    pairs: list[list[tuple]] = [[] for _ in range(0, len(examples), mb_size)]
    for g in groups:
        pairs[g.example // mb_size].extend(build(g, examples[g.example], tokenizer, algo.name))
    stats["pairs"] = float(sum(len(b) for b in pairs))
    out = []
    for bucket in pairs:
        if not bucket:
            continue
        rows = [(p, c) for p, c, _ in bucket] + [(p, r) for p, _, r in bucket]
        mb = pad_rows(rows, tokenizer.pad_token_id, max_length)
        mb.update(pairs=len(bucket), examples=len(bucket))
        if reference.enabled:  # here, not in the objective: with LoRA under ZeRO-3 the reference is the sharded
            # policy, and ranks with fewer pairs must not skip its forwards (the objective's logits: temperature 1)
            mb["ref_token_logps"] = _reference_logps(reference, mb, [slice(0, len(rows))], 1.0, shared_prompt)
        out.append(mb)
    return out, stats


def _supervised_batches(policy, reference, tokenizer, algo, loss_hp, rc, examples, mb_size, *, max_length, seed,
                        step, memory, pool, collectives, shared_prompt):
    groups = sample_groups(policy, tokenizer, examples, list(range(len(examples))), rc,
                           sampling_seed(seed, step, 0))
    stats = rollout_stats(groups)
    kept: list[list[tuple]] = [[] for _ in range(0, len(examples), mb_size)]
    for g in groups:
        seen = set()
        for ids, score in zip(g.completion_ids, g.score.tolist()):
            if score < float(rc["keep_threshold"]) or (rc["dedupe"] and tuple(ids) in seen):
                continue
            seen.add(tuple(ids))
            kept[g.example // mb_size].append((g.prompt_ids, ids))
    stats["kept"] = float(sum(len(k) for k in kept))
    out = []
    for rows in kept:
        if rows:
            mb = pad_rows(rows, tokenizer.pad_token_id, max_length)
            mb["examples"] = len(rows)
            out.append(mb)
    return out, stats


def _rollout_phase(build):
    def prepare(policy, reference, tokenizer, algo, hparams, micro_batches, *, max_length, seed, step,
                memory: LoopMemory | None = None, pool: list | None = None, collectives=PROCESS_GROUP,
                shared_prompt: bool = False):
        """The rollout phase (an online Family's ``prepare``): ``(updates, rollout_stats)`` for one batch of prompts,
        ``updates`` being ``num_iterations * num_minibatches`` lists of micro-batches (see ``schedule_updates``).

        ``micro_batches`` are the step's examples as the loop split them (``micro_batch_size`` prompts each); the
        rollout samples the whole step at once (better generation batches) and splits the result the same way.
        ``pool`` is the whole training set, where DAPO's dynamic sampling draws its back-fill prompts. Under
        ZeRO-3 every rank gathers the policy's weights for the whole rollout phase (sampling and the no-grad
        forwards), so each rank may generate and score a different number of sequences.
        ``collectives``: every collective of the phase goes through it (the loop's engine). ``shared_prompt``
        (trainer.shared_prompt): the no-grad forwards run a group's samples behind one prompt copy, as the updates.
        ``rollout_stats`` (logged as ``rollout/*``; ``reward_mean`` feeds the reward curve): reward_mean / reward_std
        (task reward over every completion sampled first), accuracy_mean, score_mean (after shaping),
        frac_zero_std_groups, completion_length_mean (tokens), truncated_frac, plus what the method adds (pairs,
        kept, dynamic_sampling/*, value_loss, kl_ref_rollout, advantage_abs_mean).
        """
        loss_hp, rc = split_hparams(algo, hparams)
        examples = [e for mb in micro_batches for e in mb]
        if not examples:
            return schedule_updates([], rc), {}
        mb_size = max(len(mb) for mb in micro_batches)
        with gathered(policy) as bare:  # ZeRO-3: full weights on every rank (collective); the bare module otherwise
            batches, stats = build(bare, reference, tokenizer, algo, loss_hp, rc, examples, mb_size,
                                   max_length=max_length, seed=seed, step=step,
                                   memory=memory if memory is not None else LoopMemory(), pool=pool,
                                   collectives=collectives, shared_prompt=shared_prompt)
        return schedule_updates(batches, rc), stats

    return prepare


prepare_policy_gradient = _rollout_phase(_policy_gradient_batches)
prepare_pairwise = _rollout_phase(_pairwise_batches)
prepare_supervised = _rollout_phase(_supervised_batches)


# ---------------------------------------------------------------------------------------------------------------------
# the objectives


def policy_gradient_objective(policy, reference, batch, algo, hparams, ctx):
    """The ``online_policy_gradient`` objective on one micro-batch from its rollout phase.

    Per-token log-probs (``shared_token_logps``; logits / temperature when it is not 1), then
    ``policy_gradient(algo.loss, logps, old_logps, advantages, mask, ref_logps, **loss hparams)`` (``old_logps``
    None, ratio exactly 1, with one update per rollout: see the module docstring), logging pg/clip_frac,
    pg/ratio_mean, pg/kl_ref (with a reference), pg/advantage_mean, entropy (sampled-token estimate) and
    logps/completion.
    """
    loss_hp, rc = split_hparams(algo, hparams)
    step_tokens = uses_step_tokens(algo, loss_hp)
    device = _device(policy)
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    mask = batch["completion_mask"][:, 1:].to(device).bool()
    layout = batch.get("rollout_completion_mask", batch["completion_mask"]).to(device)  # as the rollout's passes
    lp = shared_token_logps(policy, ids, attn, layout, float(rc["temperature"]), shared_prompt=ctx.shared_prompt)
    if step_tokens:
        loss_hp["num_items"] = ctx.tokens
    ref, old = batch.get("ref_logps"), batch.get("old_logps")  # old: only with several updates per rollout
    loss, pg = policy_gradient_and_stats(algo.loss, lp, None if old is None else old.to(device),
                                         batch["advantages"].to(device), mask,
                                         ref_logps=None if ref is None else ref.to(device), **loss_hp)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {f"pg/{k}": v for k, v in pg.items()
                 if k in ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "kl_ref",
                          "advantage_mean") and v == v}  # NaN (no reference) is left out
        # entropy estimate from the sampled tokens: E[-log pi(y_t)] (unbiased at temperature 1, top_p 1)
        stats["entropy"] = float(-(lp.detach() * mask).sum() / n)
        stats["logps/completion"] = float(((lp.detach() * mask).sum(-1)).mean())
    return (loss if step_tokens else loss * float(batch["examples"]) / ctx.examples), stats


def pairwise_objective(policy, reference, batch, algo, hparams, ctx):
    """The ``online_pairwise`` objective: the offline pairwise objective on the generated pairs (normalised over the
    update's pairs, all ranks), with the loss's own hyperparameters."""
    return objectives.pairwise(policy, reference, batch, algo, split_hparams(algo, hparams)[0], ctx)
