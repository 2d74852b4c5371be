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
from posttrain.models.engine import TorchEngine

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


def step_batches(examples: list, trainer, seed: int, start_step: int, total: int) -> Iterator[list[list]]:
    """The micro-batches of each optimizer step from ``start_step``: a seeded permutation per epoch."""
    micro, accum = int(trainer.micro_batch_size), int(trainer.grad_accum)
    per_step = micro * accum
    steps_per_epoch = math.ceil(len(examples) / per_step)
    for step in range(start_step, total):
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        chunk = [examples[i] for i in order[within * per_step:(within + 1) * per_step].tolist()]
        yield [chunk[i:i + micro] for i in range(0, len(chunk), micro)]


def _save_checkpoint(path: Path, engine, state: TrainState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"engine": engine.state_dict(), "state": asdict(state), "torch_rng": torch.get_rng_state(),
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
          progress: bool = True) -> TrainState:
    """Post-train ``policy`` in place with ``algo`` on ``examples``; returns the training record."""
    objective = OBJECTIVES[algo.family]
    prepare = PREPARERS[algo.family]
    steps_per_epoch, total = plan(len(examples), trainer)
    engine = TorchEngine(policy, trainer, total)
    state = TrainState()
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    if ckpt_path is not None and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, engine)
        state.resumed_from = state.step
    every = int(trainer.checkpoint_every or 0)
    policy.train()
    bar = tqdm(total=total, initial=state.step, desc=f"training {algo.name}", unit="step", disable=not progress)
    for micro_batches in step_batches(examples, trainer, seed, state.step, total):
        started = time.perf_counter()
        batches, rollout_stats = prepare(policy, reference, tokenizer, algo, hparams, micro_batches,
                                         max_length=max_length, seed=seed, step=state.step)
        ctx = StepContext(examples=sum(len(mb) for mb in micro_batches),
                          tokens=int(sum(b["completion_mask"][:, 1:].sum() for b in batches)))
        step_loss, stats = 0.0, {}
        for batch in batches:
            loss, micro_stats = objective(policy, reference, batch, algo, hparams, ctx)
            engine.backward(loss)
            step_loss += loss.item()
            for key, value in micro_stats.items():
                stats[key] = stats.get(key, 0.0) + value / len(batches)
        grad_norm = engine.step()
        state.step += 1
        state.examples += ctx.examples
        state.tokens += int(sum(b["attention_mask"].sum() for b in batches))
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
