"""Online methods in the one training loop: the rollout phase and the objective of the ``online`` family.

``prepare_online`` is the family's PREPARERS entry. For the optimizer step's examples (data kind ``prompts``:
``{prompt, answer}``; SPIN's ``gold``: ``{prompt, completion}``) it samples ``num_samples`` completions per prompt
from the CURRENT policy with :func:`posttrain.rollout.sample` (seeded by run seed and step, so a resumed run
regenerates the same rollouts), scores them with :mod:`posttrain.rewards`, and turns them into padded micro-batches
for the objective the registry entry names (``Algorithm.objective``):

- ``policy_gradient`` (sgrpo, gspo, cispo, grpo, dr_grpo, dapo, rloo, reinforce_pp, remax, ppo): advantages by the
  entry's ``advantage`` estimator (group z-score, leave-one-out, REINFORCE++, ReMax's greedy baseline, PPO's GAE on a
  value head), reference log-probs only when the loss's ``kl_coef`` or a KL folded into the reward
  (``reward_kl_coef``) is non-zero; the objective runs :func:`posttrain.losses.policy_gradient`;
- ``pairwise`` (online_dpo, spin): generated pairs (best vs worst sample by reward, or gold vs sample) through the
  pairwise objective of :mod:`posttrain.algorithms.objectives`;
- ``supervised`` (rft): the samples that pass the verifier, de-duplicated, through the SFT objective.

There is no chain over algorithm names: everything is driven by the registry entry's ``options`` and the run's
hyperparameters (``algo.*``), merged in that order. The hyperparameters are split by the loss spec's defaults:
keys the loss accepts go to the loss, the rest must be rollout keys (``ROLLOUT_DEFAULTS``; anything else is a
ValueError naming both lists).

Updates per rollout (ALGORITHMS 5, "common rollout loop"): the rollout of a batch of prompts feeds
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

Aggregation and gradient accumulation (``ctx`` = the whole optimizer update over all ranks): losses in
``STEP_TOKEN_MEAN`` (cispo, reinforce_pp, remax, ppo, grpo with loss_type dapo) divide their token sum by
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

PPO keeps a value head (an MLP on the policy's detached last hidden state, zero-initialised output) with its own
Adam optimizer in the loop's memory (checkpointed with the weights, so a resumed PPO run continues with the same
critic; seeded and fitted on all ranks' rollouts together, so every rank holds the same head). It is fitted in the
rollout phase on each rollout's returns (clipped value loss, ``vf_epochs`` passes) after the advantages were
computed with the pre-update values. PPO runs TRL's ``num_ppo_epochs`` = 4 policy passes per rollout
(``num_iterations``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.algorithms.memory import LoopMemory
from posttrain.algorithms.reference_sync import LOOP_OPTIONS
from posttrain.losses import advantages as adv_lib
from posttrain.losses.policy_gradient import policy_gradient_and_stats, ppo_value_loss
from posttrain.models import distributed
from posttrain.models.engine import gathered
from posttrain.models.logps import logps_from_logits, token_logps
from posttrain.rewards import REWARD_FUNCTIONS, compute_rewards, overlong_penalty, weighted_sum
from posttrain.rollout import SamplingConfig, sample


def _objectives():
    """posttrain.algorithms.objectives, imported at call time: it imports this module to register the family."""
    from posttrain.algorithms import objectives

    return objectives


#: Every rollout hyperparameter with its default (the registry entry's ``options`` and ``algo.*`` override them).
ROLLOUT_DEFAULTS: dict[str, Any] = {
    "objective": "policy_gradient",  # policy_gradient | pairwise | supervised (set by the registry entry)
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
    "advantage": "group_zscore",  # see ADVANTAGES
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
    "chosen": "best_sample",  # best_sample (online DPO: best vs worst by reward) | gold (SPIN: gold vs sample)
    # supervised objective on filtered samples (RFT)
    "keep_threshold": 0.5,
    "dedupe": True,
}

#: Policy-gradient losses normalised by the token count of the whole optimizer step (``num_items = ctx.tokens``).
STEP_TOKEN_MEAN = frozenset({"cispo", "reinforce_pp", "remax", "ppo"})
#: grpo loss_types normalised the same way (TRL's dapo: ``num_items_in_batch``).
STEP_TOKEN_MEAN_GRPO_TYPES = frozenset({"dapo"})


# ---------------------------------------------------------------------------------------------------------------------
# hyperparameters


def split_hparams(algo, hparams: dict | None) -> tuple[dict, dict]:
    """``(loss hparams, rollout settings)`` from the entry's ``options`` and the run's ``hparams`` (which win).

    Keys the loss spec accepts (its ``defaults``) go to the loss; every other key must be a rollout key. The rollout
    settings come back complete (``ROLLOUT_DEFAULTS`` filled in). dr_grpo's ``max_completion_length`` defaults to
    ``max_new_tokens`` (ALGORITHMS 6.8: keep the constant consistent with the generation length).
    """
    merged = {k: v for k, v in {**dict(algo.options), **dict(hparams or {})}.items() if k not in LOOP_OPTIONS}
    spec = algo.loss_spec
    loss_keys = set(spec.defaults) if spec is not None else set()
    loss_hp = {k: v for k, v in merged.items() if k in loss_keys}
    rollout = {k: v for k, v in merged.items() if k not in loss_keys}
    unknown = sorted(set(rollout) - set(ROLLOUT_DEFAULTS))
    if unknown:
        raise ValueError(f"{algo.name}: unknown hyperparameter(s) {unknown}; the loss "
                         f"{algo.loss!r} accepts {sorted(loss_keys)}, the rollout accepts {sorted(ROLLOUT_DEFAULTS)}")
    rc = {**ROLLOUT_DEFAULTS, **rollout}
    rc["rewards"] = {str(k): float(v) for k, v in dict(rc["rewards"]).items()}
    if "max_completion_length" in loss_keys and "max_completion_length" not in loss_hp:
        loss_hp["max_completion_length"] = int(rc["max_new_tokens"])
    for key in ("num_samples", "max_new_tokens", "generation_batch_size", "max_sampling_tries", "vf_epochs",
                "num_iterations", "num_minibatches"):
        rc[key] = int(rc[key])
    for key in ("num_samples", "num_iterations", "num_minibatches"):
        if rc[key] < 1:
            raise ValueError(f"{algo.name}: {key} must be >= 1, got {rc[key]}")
    if rc["advantage"] not in ADVANTAGES:
        raise ValueError(f"{algo.name}: unknown advantage {rc['advantage']!r}; known: {sorted(ADVANTAGES)}")
    if rc["objective"] not in PREPARE:
        raise ValueError(f"{algo.name}: unknown objective {rc['objective']!r}; known: {sorted(PREPARE)}")
    if rc["advantage"] in _NEEDS_VALUES and rc["dynamic_sampling"]:
        raise ValueError(f"{algo.name}: dynamic_sampling cannot be combined with advantage={rc['advantage']!r} (the "
                         "value head is fitted on every rollout of every rank)")
    unknown_rewards = sorted({*rc["rewards"], rc["accuracy_reward"]} - set(REWARD_FUNCTIONS))
    if unknown_rewards:
        raise ValueError(f"{algo.name}: unknown reward function(s) {unknown_rewards}; known: "
                         f"{sorted(REWARD_FUNCTIONS)}")
    return loss_hp, rc


def updates_per_step(algo, hparams: dict | None, micro_batches_per_rank: int | None = None) -> int:
    """Optimizer updates per rollout (UPDATES_PER_STEP["online"]): ``num_iterations * num_minibatches``.

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


def uses_step_tokens(loss: str, loss_hp: dict) -> bool:
    """True when the loss divides by the whole step's completion-token count (see the module docstring)."""
    if loss in STEP_TOKEN_MEAN:
        return True
    return loss == "grpo" and loss_hp.get("loss_type", "dapo") in STEP_TOKEN_MEAN_GRPO_TYPES


def _sampling_seed(seed: int, step: int, salt: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + int(salt) * 104_729) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------------------------------
# sampling and scoring


@dataclass
class Group:
    """The samples of one prompt (one example of the step) with their rewards."""

    example: int  # index into the step's examples
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    reward: torch.Tensor  # [G] task reward: weighted sum of the reward functions
    accuracy: torch.Tensor  # [G] raw accuracy (accuracy_reward)
    score: torch.Tensor  # [G] what the advantages see: reward + overlong punishment - missing-EOS penalty
    greedy_score: float | None = None  # ReMax baseline

    @property
    def informative(self) -> bool:
        """Not all-0 / all-1 in raw accuracy (DAPO's dynamic-sampling filter)."""
        return bool(self.accuracy.max() != self.accuracy.min())


def _answer(example: dict) -> str:
    # prompts: the bare answer; gold: the full solution ending in "#### N" (lm-eval's normalisation strips the rest)
    return str(example.get("answer", example.get("completion", "")))


def _score(texts, answers, lengths, truncated, rc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = sorted({*rc["rewards"], rc["accuracy_reward"]})
    scored = compute_rewards(names, texts, answers)
    reward = weighted_sum({k: scored[k] for k in rc["rewards"]}, rc["rewards"])
    accuracy = scored[rc["accuracy_reward"]]
    score = reward.clone()
    frac = float(rc["overlong_buffer_frac"] or 0.0)
    if frac > 0:
        cache = max(1, int(round(frac * rc["max_new_tokens"])))
        score = score + float(rc["overlong_penalty_factor"]) * overlong_penalty(
            lengths, max_length=rc["max_new_tokens"], cache_length=min(cache, rc["max_new_tokens"] - 1))
    if rc["missing_eos_penalty"] is not None:
        score = score - float(rc["missing_eos_penalty"]) * torch.tensor(truncated, dtype=torch.float32)
    return reward, accuracy, score


def _stop_strings(examples: list[dict], indices) -> tuple[str, ...]:
    """The prompt format's stop strings, carried by the examples (a few-shot prompt stops at lm-eval's ``until``)."""
    return tuple(examples[indices[0]].get("stop_strings", ())) if len(indices) else ()


def _sample_groups(policy, tokenizer, examples: list[dict], indices: list[int], rc: dict, seed: int) -> list[Group]:
    cfg = SamplingConfig(num_samples=rc["num_samples"], temperature=float(rc["temperature"]),
                         top_p=float(rc["top_p"]), max_new_tokens=rc["max_new_tokens"],
                         stop_strings=_stop_strings(examples, indices), batch_size=rc["generation_batch_size"])
    rollouts = sample(policy, tokenizer, [examples[i]["prompt"] for i in indices], cfg, seed=seed)
    groups = []
    for i, r in zip(indices, rollouts):
        lengths = [len(ids) for ids in r.completion_ids]
        reward, accuracy, score = _score(r.completions, [_answer(examples[i])] * len(r.completions), lengths,
                                         r.truncated, rc)
        prompt_ids = tokenizer(examples[i]["prompt"], add_special_tokens=False)["input_ids"]
        groups.append(Group(i, prompt_ids, r.completion_ids, r.completions, r.truncated, reward, accuracy, score))
    return groups


def _greedy_scores(policy, tokenizer, examples: list[dict], groups: list[Group], rc: dict, seed: int) -> None:
    """ReMax's baseline: one greedy decode per prompt, scored like the samples."""
    wanted = sorted({g.example for g in groups})
    cfg = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=rc["max_new_tokens"],
                         stop_strings=_stop_strings(examples, wanted), batch_size=rc["generation_batch_size"])
    rollouts = sample(policy, tokenizer, [examples[i]["prompt"] for i in wanted], cfg, seed=seed)
    by_example = {}
    for i, r in zip(wanted, rollouts):
        _, _, score = _score(r.completions, [_answer(examples[i])], [len(r.completion_ids[0])], r.truncated, rc)
        by_example[i] = float(score[0])
    for g in groups:
        g.greedy_score = by_example[g.example]


def rollout_stats(groups: list[Group]) -> dict[str, float]:
    """What a step's sampling looked like (over every group sampled first, before any filtering)."""
    if not groups:
        return {}
    reward = torch.cat([g.reward for g in groups])
    score = torch.cat([g.score for g in groups])
    accuracy = torch.cat([g.accuracy for g in groups])
    lengths = torch.tensor([len(c) for g in groups for c in g.completion_ids], dtype=torch.float32)
    truncated = torch.tensor([t for g in groups for t in g.truncated], dtype=torch.float32)
    sizes = {len(g.reward) for g in groups}
    frac_zero = (adv_lib.frac_zero_std_groups(score, sizes.pop()) if len(sizes) == 1
                 else sum(float(g.score.max() == g.score.min()) for g in groups) / len(groups))
    return {
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std()) if reward.numel() > 1 else 0.0,
        "accuracy_mean": float(accuracy.mean()),
        "score_mean": float(score.mean()),
        "frac_zero_std_groups": frac_zero,
        "completion_length_mean": float(lengths.mean()),
        "truncated_frac": float(truncated.mean()),
    }


# ---------------------------------------------------------------------------------------------------------------------
# tensors


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``completion_mask`` [N, T] from (prompt ids, completion ids)
    (the sampler's own completion token ids: no re-tokenisation), cut at ``max_length``."""
    encoded = []
    for p, c in rows:
        ids = (list(p) + list(c))[:max_length]
        encoded.append((ids, min(len(p), len(ids))))
    width = max(1, max(len(ids) for ids, _ in encoded))
    input_ids = torch.full((len(encoded), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    completion = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        completion[row, n_prompt: len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def policy_token_logps(model, input_ids, attention_mask, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs [B, T-1] at the sampling temperature (:func:`posttrain.models.logps.token_logps`)."""
    return token_logps(model, input_ids, attention_mask, temperature)


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
def _forward_logps(model, step: dict, chunks: list[slice], temperature: float,
                   hidden: bool = False) -> tuple[torch.Tensor, list | None]:
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
        if not hidden:
            logps[rows, : w - 1] = policy_token_logps(model, ids, attn, temperature).float().cpu()
            continue
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        t = float(temperature)
        logits = out.logits[:, :-1].float()
        lp = logps_from_logits(logits / t if t > 0 and t != 1.0 else logits, ids)
        logps[rows, : w - 1] = lp.cpu()
        states.append((rows, w, out.hidden_states[-1][:, :-1].float().detach()))
    return logps, states


@torch.no_grad()
def _values(head, states, shape) -> torch.Tensor:
    values = torch.zeros(shape, dtype=torch.float32)
    for rows, w, h in states:
        values[rows, : w - 1] = head(h).squeeze(-1).float().cpu()
    return values


# ---------------------------------------------------------------------------------------------------------------------
# advantages: fn(inputs) -> [N] (one per completion, copied to every token by the loss) or [N, T-1] (per token)


@dataclass
class AdvantageInputs:
    scores: torch.Tensor  # [N] shaped sequence rewards
    group_size: int
    mask: torch.Tensor  # [N, T-1] completion tokens
    rc: dict
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    greedy_scores: torch.Tensor | None = None  # [N] ReMax
    values: torch.Tensor | None = None  # [N, T-1] PPO
    extra: dict = field(default_factory=dict)  # returns for the value head, stats


def _kl_scores(a: AdvantageInputs) -> torch.Tensor:
    """Sequence rewards with the KL folded in (RLOO's ``R - beta * sum_t KL_t``) when ``reward_kl_coef != 0``."""
    coef = float(a.rc["reward_kl_coef"] or 0.0)
    if coef == 0.0:
        return a.scores
    return adv_lib.kl_penalized_scores(a.scores, a.old_logps, a.ref_logps, a.mask, kl_coef=coef,
                                       estimator=a.rc["reward_kl_estimator"])


def _token_rewards(a: AdvantageInputs) -> torch.Tensor:
    """Per-token rewards (PPO, REINFORCE++): ``-c * KL_t`` on every token plus the score at the last one."""
    coef = float(a.rc["reward_kl_coef"] or 0.0)
    ref = a.ref_logps if coef != 0.0 else a.old_logps
    return adv_lib.kl_shaped_token_rewards(a.scores, a.old_logps, ref, a.mask, kl_coef=coef,
                                           estimator=a.rc["reward_kl_estimator"])


def _adv_group_zscore(a):
    return adv_lib.group_zscore(_kl_scores(a), a.group_size, eps=float(a.rc["adv_eps"]),
                                scale=str(a.rc["scale_rewards"]))


def _adv_leave_one_out(a):
    return adv_lib.leave_one_out(_kl_scores(a), a.group_size)


def _adv_reinforce_pp(a):
    return adv_lib.reinforce_pp_advantages(_token_rewards(a), a.mask, gamma=float(a.rc["gae_gamma"]),
                                           eps=float(a.rc["adv_eps"]))


def _adv_reinforce_pp_baseline(a):
    return adv_lib.reinforce_pp_baseline_advantages(_kl_scores(a), a.group_size, eps=float(a.rc["adv_eps"]))


def _adv_remax(a):
    return adv_lib.remax_advantages(_kl_scores(a), a.greedy_scores)


def _adv_gae(a):
    adv, returns = adv_lib.gae(_token_rewards(a), a.values, a.mask, gamma=float(a.rc["gae_gamma"]),
                               lam=float(a.rc["gae_lambda"]))
    a.extra["returns"] = returns
    if a.rc["whiten_advantages"] and a.mask.sum() > 1:
        adv = torch.where(a.mask, adv_lib.masked_whiten(adv, a.mask), torch.zeros_like(adv))
    return adv


#: Advantage estimators by name (the registry entry's ``advantage`` option).
ADVANTAGES = {
    "group_zscore": _adv_group_zscore,  # GRPO family (scale_rewards group | batch | none)
    "leave_one_out": _adv_leave_one_out,  # RLOO
    "reinforce_pp": _adv_reinforce_pp,  # REINFORCE++: per-token returns-to-go, global normalisation
    "reinforce_pp_baseline": _adv_reinforce_pp_baseline,  # REINFORCE++-baseline (G > 1)
    "remax": _adv_remax,  # ReMax: R - R(greedy)
    "gae": _adv_gae,  # PPO: GAE on the value head, whitened over the step
}
_NEEDS_OLD_LOGPS = {"reinforce_pp", "gae"}  # per-token rewards use old log-probs even at reward_kl_coef 0
_NEEDS_GREEDY = {"remax"}
_NEEDS_VALUES = {"gae"}


# ---------------------------------------------------------------------------------------------------------------------
# PPO's value head (in the loop's memory: checkpointed; fitted in the rollout phase)


class ValueHead:
    """PPO's critic: an MLP on the policy's detached last hidden state (output layer zero: V = 0 at start) and its
    own Adam optimizer; ``state_dict``/``load_state_dict`` let the loop checkpoint both."""

    def __init__(self, hidden_size: int, lr: float, device, seed: int):
        with torch.random.fork_rng(devices=[]):  # the same initial head on every rank, whatever they sampled
            torch.manual_seed(seed)
            self.head = torch.nn.Sequential(torch.nn.Linear(hidden_size, hidden_size), torch.nn.Tanh(),
                                            torch.nn.Linear(hidden_size, 1)).to(device)
        torch.nn.init.zeros_(self.head[2].weight)
        torch.nn.init.zeros_(self.head[2].bias)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=float(lr))

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def value_head(policy, memory: LoopMemory, rc: dict, seed: int) -> ValueHead:
    """The run's value head, created on first use (identically on every rank: seeded by the run seed)."""
    return memory.get("value_head", lambda: ValueHead(_hidden_size(policy), rc["vf_lr"], _device(policy), seed))


def _hidden_size(policy) -> int:
    cfg = getattr(policy, "config", None)
    size = getattr(cfg, "hidden_size", None)
    if size is None:
        raise ValueError("ppo's value head needs the policy's config.hidden_size")
    return int(size)


def _fit_value_head(head, optimizer, states, old_values, returns, mask, rc) -> float:
    """``vf_epochs`` full-batch passes of PPO's clipped value loss on this rollout; returns the last pass's loss.

    Over several ranks the loss is a token mean over ALL ranks' rollouts and the gradients are summed over the ranks
    before each step, so every rank keeps the same head (the one rank 0 checkpoints)."""
    last = 0.0
    n_tokens = max(1.0, distributed.all_reduce_sum([float(mask.sum())])[0])
    for _ in range(rc["vf_epochs"]):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows, w, h in states:
            v = head(h).squeeze(-1)
            dev = v.device
            loss = ppo_value_loss(v, old_values[rows, : w - 1].to(dev), returns[rows, : w - 1].to(dev),
                                  mask[rows, : w - 1].to(dev), clip_range_value=rc["cliprange_value"],
                                  num_items=n_tokens)
            loss.backward()
            total += float(loss.detach())
        distributed.all_reduce_grads_(head.parameters())
        optimizer.step()
        last = total
    optimizer.zero_grad(set_to_none=True)
    return distributed.all_reduce_sum([last])[0]  # the last pass's loss over all ranks


# ---------------------------------------------------------------------------------------------------------------------
# the three objectives' rollout phases


def _reference_logps(reference, step: dict, chunks, temperature: float) -> torch.Tensor:
    if not reference.enabled:
        raise ValueError("this online configuration needs reference log-probs (kl_coef or reward_kl_coef != 0) but "
                         "no reference model was built (Algorithm.needs_reference said no)")
    with reference.active() as ref_model:
        return _forward_logps(ref_model, step, chunks, temperature)[0]


def _draw_prompts(pool: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` prompts of the training set for a dynamic-sampling round (distinct within the round, seeded)."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in (order * math.ceil(n / len(pool)))[:n]]


def _prepare_policy_gradient(policy, reference, tokenizer, algo, loss_hp, rc, examples, mb_size, *,
                             max_length, seed, step, memory, pool):
    n = len(examples)
    first = _sample_groups(policy, tokenizer, examples, list(range(n)), rc, _sampling_seed(seed, step, 0))
    stats = rollout_stats(first)
    groups = first
    if rc["dynamic_sampling"]:
        groups = [g for g in first if g.informative]
        tries = 0
        while len(groups) < n and tries < rc["max_sampling_tries"]:
            tries += 1
            start = len(examples)  # new prompts go after the ones sampled so far; Group.example indexes them
            examples = examples + _draw_prompts(pool or examples[:n], n,
                                                _sampling_seed(seed, step, tries) + 7_919 * distributed.rank())
            extra = _sample_groups(policy, tokenizer, examples, list(range(start, start + n)), rc,
                                   _sampling_seed(seed, step, tries))
            groups += [g for g in extra if g.informative][: n - len(groups)]
        stats.update({"dynamic_sampling/kept_frac": len(groups) / n, "dynamic_sampling/tries": float(tries)})
    if not groups:
        return [], stats
    if rc["advantage"] in _NEEDS_GREEDY:
        _greedy_scores(policy, tokenizer, examples, groups, rc, _sampling_seed(seed, step, 10_000))

    G = rc["num_samples"]
    rows = [(g.prompt_ids, c) for g in groups for c in g.completion_ids]
    batch = pad_rows(rows, tokenizer.pad_token_id, max_length)
    mask = batch["completion_mask"][:, 1:].bool()
    chunks = _chunks(len(rows), [mb_size * G] * len(groups))
    temperature = float(rc["temperature"])

    need_ref = algo.needs_reference({**loss_hp, **rc})
    off_policy = rc["num_iterations"] * rc["num_minibatches"] > 1  # later updates need pi_old's log-probs
    need_old = off_policy or float(rc["reward_kl_coef"] or 0.0) != 0.0 or rc["advantage"] in _NEEDS_OLD_LOGPS
    critic = value_head(policy, memory, rc, seed) if rc["advantage"] in _NEEDS_VALUES else None
    old_logps, states = _forward_logps(policy, batch, chunks, temperature, hidden=critic is not None) \
        if need_old else (None, None)
    values = _values(critic.head, states, mask.shape) if critic is not None else None
    ref_logps = _reference_logps(reference, batch, chunks, temperature) if need_ref else None
    inputs = AdvantageInputs(
        scores=torch.cat([g.score for g in groups]), group_size=G, mask=mask, rc=rc, old_logps=old_logps,
        ref_logps=ref_logps, values=values,
        greedy_scores=(torch.tensor([g.greedy_score for g in groups for _ in g.completion_ids], dtype=torch.float32)
                       if rc["advantage"] in _NEEDS_GREEDY else None))
    advantages = ADVANTAGES[rc["advantage"]](inputs)
    if critic is not None:
        stats["value_loss"] = _fit_value_head(critic.head, critic.optimizer, states, values, inputs.extra["returns"],
                                              mask, rc)
        stats["value_mean"] = float(values[mask].mean()) if mask.any() else 0.0
    if ref_logps is not None and old_logps is not None and mask.any():
        stats["kl_ref_rollout"] = float((old_logps - ref_logps)[mask].mean())
    per_token = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(mask)
    stats["advantage_abs_mean"] = float(per_token[mask].abs().mean()) if mask.any() else 0.0

    if rc["mask_truncated"]:  # DAPO overlong filtering: truncated completions leave the loss (and ctx.tokens)
        truncated = torch.tensor([t for g in groups for t in g.truncated], dtype=torch.bool)
        batch["completion_mask"][truncated] = 0

    step_tokens = uses_step_tokens(algo.loss, loss_hp) and loss_hp.get("num_items") is None
    out = []
    for rows_ in chunks:
        w = int(batch["attention_mask"][rows_].sum(-1).max())
        mb = {key: batch[key][rows_, :w] for key in ("input_ids", "attention_mask", "completion_mask")}
        mb["advantages"] = advantages[rows_] if advantages.dim() == 1 else advantages[rows_, : w - 1]
        if ref_logps is not None:
            mb["ref_logps"] = ref_logps[rows_, : w - 1]
        if off_policy:
            mb["old_logps"] = old_logps[rows_, : w - 1]
        mb.update(objective="policy_gradient", loss_hparams=loss_hp, temperature=temperature,
                  step_tokens=step_tokens, examples=rows_.stop - rows_.start)
        out.append(mb)
    return out, stats


def _prepare_pairwise(policy, reference, tokenizer, algo, loss_hp, rc, examples, mb_size, *, max_length, seed,
                      step, memory, pool):
    groups = _sample_groups(policy, tokenizer, examples, list(range(len(examples))), rc,
                            _sampling_seed(seed, step, 0))
    stats = rollout_stats(groups)
    eos = tokenizer.eos_token_id
    pairs: list[list[tuple]] = [[] for _ in range(0, len(examples), mb_size)]
    for g in groups:
        bucket = pairs[g.example // mb_size]
        if rc["chosen"] == "gold":  # SPIN: the gold solution beats each of the policy's samples
            if "completion" not in examples[g.example]:
                raise ValueError(f"{algo.name}: chosen=gold needs examples with a gold 'completion' (data kind gold)")
            gold = tokenizer(examples[g.example]["completion"], add_special_tokens=False)["input_ids"] + [eos]
            bucket.extend((g.prompt_ids, gold, c) for c in g.completion_ids)
        elif rc["chosen"] == "best_sample":  # online DPO: best vs worst sample by reward; ties give no pair
            if float(g.score.max()) > float(g.score.min()):
                best, worst = int(torch.argmax(g.score)), int(torch.argmin(g.score))
                bucket.append((g.prompt_ids, g.completion_ids[best], g.completion_ids[worst]))
        else:
            raise ValueError(f"{algo.name}: unknown chosen {rc['chosen']!r}; known: best_sample, gold")
    total = sum(len(b) for b in pairs)
    stats["pairs"] = float(total)
    out = []
    for bucket in pairs:
        if not bucket:
            continue
        rows = [(p, c) for p, c, _ in bucket] + [(p, r) for p, _, r in bucket]
        mb = pad_rows(rows, tokenizer.pad_token_id, max_length)
        mb.update(pairs=len(bucket), examples=len(bucket), objective="pairwise", loss_hparams=loss_hp)
        if reference.enabled:  # here, not in the objective: with LoRA under ZeRO-3 the reference is the sharded
            # policy, and ranks with fewer pairs must not skip its forwards (the objective's logits: temperature 1)
            mb["ref_token_logps"] = _reference_logps(reference, mb, [slice(0, len(rows))], temperature=1.0)
        out.append(mb)
    return out, stats


def _prepare_supervised(policy, reference, tokenizer, algo, loss_hp, rc, examples, mb_size, *, max_length, seed,
                        step, memory, pool):
    groups = _sample_groups(policy, tokenizer, examples, list(range(len(examples))), rc,
                            _sampling_seed(seed, step, 0))
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
            mb.update(examples=len(rows), objective="supervised", loss_hparams=loss_hp)
            out.append(mb)
    return out, stats


#: Objective on the samples -> its rollout phase.
PREPARE = {"policy_gradient": _prepare_policy_gradient, "pairwise": _prepare_pairwise,
           "supervised": _prepare_supervised}


def prepare_online(policy, reference, tokenizer, algo, hparams, micro_batches, *, max_length, seed, step,
                   memory: LoopMemory | None = None, pool: list | None = None):
    """The rollout phase (PREPARERS["online"]): ``(updates, rollout_stats)`` for one batch of prompts, ``updates``
    being ``num_iterations * num_minibatches`` lists of micro-batches (see ``schedule_updates``).

    ``micro_batches`` are the step's examples as the loop split them (``micro_batch_size`` prompts each); the
    rollout samples the whole step at once (better generation batches) and splits the result the same way.
    ``pool`` is the whole training set, where DAPO's dynamic sampling draws its back-fill prompts. Under
    ZeRO-3 every rank gathers the policy's weights for the whole rollout phase (sampling and the no-grad forwards),
    so each rank may generate and score a different number of sequences.
    ``rollout_stats`` (logged as ``rollout/*``; ``reward_mean`` feeds the reward curve): reward_mean / reward_std
    (task reward over every completion sampled first), accuracy_mean, score_mean (after shaping),
    frac_zero_std_groups, completion_length_mean (tokens), truncated_frac, plus what the method adds (pairs, kept,
    dynamic_sampling/*, value_loss, kl_ref_rollout, advantage_abs_mean).
    """
    loss_hp, rc = split_hparams(algo, hparams)
    examples = [e for mb in micro_batches for e in mb]
    if not examples:
        return schedule_updates([], rc), {}
    mb_size = max(len(mb) for mb in micro_batches)
    with gathered(policy) as bare:  # ZeRO-3: full weights on every rank (collective); the bare module otherwise
        batches, stats = PREPARE[rc["objective"]](bare, reference, tokenizer, algo, loss_hp, rc, examples, mb_size,
                                                  max_length=max_length, seed=seed, step=step,
                                                  memory=memory if memory is not None else LoopMemory(),
                                                  pool=pool)
    return schedule_updates(batches, rc), stats


# ---------------------------------------------------------------------------------------------------------------------
# the objective


def _policy_gradient_objective(policy, reference, batch, algo, hparams, ctx):
    device = _device(policy)
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    lp = policy_token_logps(policy, ids, attn, batch.get("temperature", 1.0))
    mask = batch["completion_mask"][:, 1:].to(device).bool()
    hp = dict(batch["loss_hparams"])
    if batch.get("step_tokens"):
        hp["num_items"] = ctx.tokens
    ref, old = batch.get("ref_logps"), batch.get("old_logps")  # old: only with several updates per rollout
    loss, pg = policy_gradient_and_stats(algo.loss, lp, None if old is None else old.to(device),
                                         batch["advantages"].to(device), mask,
                                         ref_logps=None if ref is None else ref.to(device), **hp)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {f"pg/{k}": v for k, v in pg.items()
                 if k in ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "kl_ref",
                          "advantage_mean") and v == v}  # NaN (no reference) is left out
        # entropy estimate from the sampled tokens: E[-log pi(y_t)] (unbiased at temperature 1, top_p 1)
        stats["entropy"] = float(-(lp.detach() * mask).sum() / n)
        stats["logps/completion"] = float(((lp.detach() * mask).sum(-1)).mean())
    return (loss if batch.get("step_tokens") else loss * float(batch["examples"]) / ctx.examples), stats


def _pairwise_objective(policy, reference, batch, algo, hparams, ctx):
    return _objectives().pairwise(policy, reference, batch, algo, batch["loss_hparams"], ctx)


def _supervised_objective(policy, reference, batch, algo, hparams, ctx):
    return _objectives().supervised(policy, reference, batch, algo, batch["loss_hparams"], ctx)


_OBJECTIVES = {"policy_gradient": _policy_gradient_objective, "pairwise": _pairwise_objective,
               "supervised": _supervised_objective}


def online(policy, reference, batch, algo, hparams, ctx):
    """The ``online`` family's objective (OBJECTIVES["online"]) on one micro-batch from ``prepare_online``.

    policy_gradient: per-token log-probs (``token_logps``; logits / temperature when it is not 1), then
    ``policy_gradient(algo.loss, logps, old_logps, advantages, mask, ref_logps, **loss_hparams)`` (``old_logps``
    None, ratio exactly 1, with one update per rollout: see the module docstring), logging pg/clip_frac,
    pg/ratio_mean, pg/kl_ref (with a reference), pg/advantage_mean, entropy (sampled-token estimate) and
    logps/completion. pairwise / supervised: the offline objectives on the generated pairs / kept samples, normalised
    over the update's pairs / tokens (all ranks).
    """
    return _OBJECTIVES[batch["objective"]](policy, reference, batch, algo, hparams, ctx)
