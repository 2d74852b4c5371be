"""THE training loop, shared by every algorithm (the study's point: identical infrastructure).

Read top to bottom: plan the steps, build the engine, (resume), then for each optimizer step take its
micro-batches in a seeded order, let the family prepare them (offline: tokenise; online: the rollout phase,
generate from the current policy, score, compute advantages), ask the family objective for each micro-batch's
loss, backward, step, log, checkpoint. Nothing here knows an algorithm's name; the registry entry says which family objective,
which data kind and whether a reference is needed.

Determinism: the example order of epoch e is a permutation seeded by (run seed, e), so a run resumed from a
checkpoint at step k sees exactly the examples the uninterrupted run saw after step k.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from posttrain.algorithms.objectives import OBJECTIVES, PREPARERS, StepContext
from posttrain.models.engine import make_engine

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    examples: int = 0
    tokens: int = 0  # tokens through the policy's forward passes (prompt + completion, no padding)
    seconds: float = 0.0
    loss_curve: list = field(default_factory=list)  # [[step, loss], ...]
    reward_curve: list = field(default_factory=list)  # [[step, mean reward], ...] (online methods)
    resumed_from: int | None = None  # the checkpoint step this run resumed from (preemption, time-out), if any


def plan(n_examples: int, trainer) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for ``n_examples`` and the trainer config."""
    if n_examples == 0:
        raise ValueError("no training examples: the data produced nothing to train on (for self-play pairs: "
                         "no prompt had both a correct and an incorrect sample)")
    per_step = int(trainer.micro_batch_size) * int(trainer.grad_accum)
    steps_per_epoch = math.ceil(n_examples / per_step)
    total = steps_per_epoch * int(trainer.epochs)
    if trainer.max_steps is not None:
        total = min(total, int(trainer.max_steps))
    return steps_per_epoch, total


def step_batches(examples: list, trainer, seed: int, start_step: int, total: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[list[list]]:
    """The micro-batches of each optimizer step from ``start_step``: a seeded permutation per epoch.

    With ``world_size`` ranks, each rank takes its share of every step's micro-batches (``trainer.grad_accum`` counts
    the micro-batches of a step over all ranks, so the effective batch does not depend on the number of GPUs).
    """
    micro, accum = int(trainer.micro_batch_size), int(trainer.grad_accum)
    if accum % world_size:
        raise ValueError(f"trainer.grad_accum ({accum}) must be a multiple of the number of ranks ({world_size}): "
                         f"each rank takes grad_accum / ranks micro-batches of every optimizer step")
    per_step = micro * accum
    steps_per_epoch = math.ceil(len(examples) / per_step)
    for step in range(start_step, total):
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        chunk = [examples[i] for i in order[within * per_step:(within + 1) * per_step].tolist()]
        if world_size == 1:
            yield [chunk[i:i + micro] for i in range(0, len(chunk), micro)]
        else:
            yield shard_step(chunk, micro, rank, world_size)


def shard_step(chunk: list, micro: int, rank: int, world_size: int) -> list[list]:
    """This rank's micro-batches of one step: every rank gets the same number (ZeRO-2/3 reduce in each backward).

    A full step splits exactly as on one process (micro-batch i goes to rank i % world_size). The last, shorter
    step of an epoch is split into as many near-equal micro-batches as full ones would need (rounded up to a
    multiple of the ranks, none larger than ``micro``); only when it has fewer examples than that are its first
    examples repeated to fill them (as torch's DistributedSampler pads).
    """
    slots = world_size * math.ceil(math.ceil(len(chunk) / micro) / world_size)
    if len(chunk) < slots:
        chunk = (chunk * math.ceil(slots / len(chunk)))[:slots]
    base, extra = divmod(len(chunk), slots)
    bounds = [0]
    for i in range(slots):
        bounds.append(bounds[-1] + base + (i < extra))
    return [chunk[bounds[i]:bounds[i + 1]] for i in range(rank, slots, world_size)]


def _save_checkpoint(path: Path, engine, state: TrainState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine_state = engine.state_dict()  # every rank (DeepSpeed writes its partitions); then rank 0 commits
    if engine.rank != 0:
        return
    tmp = path.with_suffix(".tmp")
    torch.save({"engine": engine_state, "state": asdict(state), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate()}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, engine) -> TrainState:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    engine.load_state_dict(ckpt["engine"])
    torch.set_rng_state(ckpt["torch_rng"])
    random.setstate(ckpt["python_rng"])
    return TrainState(**ckpt["state"])


def train(policy, reference, tokenizer, algo, hparams: dict, examples: list, trainer, *, max_length: int,
          seed: int, log: Callable[[dict, int], None] | None = None, checkpoint_dir: Path | None = None,
          progress: bool = True, deepspeed=None) -> TrainState:
    """Post-train ``policy`` in place with ``algo`` on ``examples``; returns the training record."""
    objective = OBJECTIVES[algo.loop_objective]
    prepare = PREPARERS[algo.family]
    steps_per_epoch, total = plan(len(examples), trainer)
    engine = make_engine(policy, trainer, total, deepspeed, checkpoint_dir=checkpoint_dir)
    model = engine.model  # forwards go through the engine (DeepSpeed wraps the module); == policy without it
    state = TrainState()
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    if ckpt_path is not None and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, engine)
        state.resumed_from = state.step
    every = int(trainer.checkpoint_every or 0)
    policy.train()
    bar = tqdm(total=total, initial=state.step, desc=f"training {algo.name}", unit="step",
               disable=not progress or engine.rank != 0)
    for micro_batches in step_batches(examples, trainer, seed, state.step, total, engine.rank, engine.world_size):
        started = time.perf_counter()
        batches, rollout_stats = prepare(model, reference, tokenizer, algo, hparams, micro_batches,
                                         max_length=max_length, seed=seed, step=state.step)
        batches = [{k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        # the whole step's counts over all ranks: every rank's losses are shares of the same global mean
        n_examples, n_tokens = engine.all_reduce_sum([sum(len(mb) for mb in micro_batches),
                                                      int(sum(b["completion_mask"][:, 1:].sum() for b in batches))])
        ctx = StepContext(examples=int(n_examples), tokens=int(n_tokens))
        step_loss, stats = 0.0, {}
        for batch in batches:
            loss, micro_stats = objective(model, reference, batch, algo, hparams, ctx)
            engine.backward(loss)
            step_loss += loss.item()
            for key, value in micro_stats.items():
                stats[key] = stats.get(key, 0.0) + value / len(batches)
        grad_norm = engine.step()
        seen_tokens = int(sum(b["attention_mask"].sum() for b in batches))
        if engine.world_size > 1:  # the step's loss is the sum of the ranks' shares; statistics are rank means
            keys, rkeys = sorted(stats), sorted(rollout_stats)
            step_loss, seen_tokens, *means = engine.all_reduce_sum(
                [step_loss, seen_tokens, *(stats[k] for k in keys), *(float(rollout_stats[k]) for k in rkeys)])
            stats = {k: v / engine.world_size for k, v in zip(keys, means)}
            rollout_stats = {k: v / engine.world_size for k, v in zip(rkeys, means[len(keys):])}
        state.step += 1
        state.examples += ctx.examples
        state.tokens += int(seen_tokens)
        state.seconds += time.perf_counter() - started
        state.loss_curve.append([state.step, round(step_loss, 6)])
        if "reward_mean" in rollout_stats:
            state.reward_curve.append([state.step, round(float(rollout_stats["reward_mean"]), 6)])
        if log is not None and (state.step % int(trainer.log_every or 1) == 0 or state.step == total):
            log({"train/loss": step_loss, "train/lr": engine.lr, "train/grad_norm": grad_norm,
                 "train/epoch": state.step / steps_per_epoch, **{f"train/{k}": v for k, v in stats.items()},
                 **{f"rollout/{k}": v for k, v in rollout_stats.items()}},
                state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        due = every and state.step % every == 0 or state.step % steps_per_epoch == 0
        if ckpt_path is not None and due and state.step < total:
            _save_checkpoint(ckpt_path, engine, state)
    bar.close()
    return state
