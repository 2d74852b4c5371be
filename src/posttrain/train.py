"""THE training loop, shared by every algorithm (the study's point: identical infrastructure).

Read top to bottom: plan the steps, build the engine, (resume), then for each batch of examples (micro-batches in a
seeded order) let the family prepare its optimizer updates (offline: tokenise, one update; online: the rollout
phase -- generate from the current policy, score, compute advantages -- then ``num_iterations`` x
``num_minibatches`` updates on the same samples), and for each update ask the family objective for each
micro-batch's loss, backward, step, log; checkpoint between batches. Nothing here knows an algorithm's name; the
registry entry names its Family record (``families.of(algo)``: prepare, objective, updates per batch, step hook),
its data kind and whether a reference is needed; its hyperparameters are validated once
(posttrain.algorithms.hparams).

``state.step`` counts optimizer steps (``trainer.max_steps`` caps them), ``state.batches`` batches of examples
(= rollouts for online methods). State an algorithm carries across steps (beta-DPO's margin EMA, BCO's delta, PPO's
value head, a reference that moves: SPIN / TR-DPO, see algorithms/reference_sync) lives in a :class:`LoopMemory`
that is checkpointed with the weights.

Determinism: the example order of epoch e is a permutation seeded by (run seed, e), so a run resumed from a
checkpoint after batch k sees exactly the examples the uninterrupted run saw after batch k.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from posttrain.algorithms import families
from posttrain.algorithms.hparams import validate
from posttrain.algorithms.memory import LoopMemory
from posttrain.algorithms.objectives import StepContext, prime_memory
from posttrain.algorithms.reference_sync import ReferenceSync, ReferenceWeights, split_loop_options, sync_reference
from posttrain.models.distributed import world_size
from posttrain.models.engine import gathered, make_engine
from posttrain.models.shared_prompt import applies as shared_prompt_applies
from posttrain.preemption import Preemption

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    batches: int = 0  # batches of examples done (online: rollouts; each gives one or more optimizer steps)
    examples: int = 0
    tokens: int = 0  # tokens of the rows trained on (prompt + completion, no padding; a prompt that packed rows share
    # counts once per row, as in bench/throughput.py, so tokens_per_s compares with and without trainer.shared_prompt)
    seconds: float = 0.0
    prepare_seconds: float = 0.0  # of ``seconds``, in the family's prepare (online: the rollout phase -- generation,
    # scoring, old/reference log-probs; offline: tokenising), the rest in the optimizer updates
    loss_curve: list = field(default_factory=list)  # [[step, loss], ...]
    reward_curve: list = field(default_factory=list)  # [[step, mean reward], ...] (online methods)
    resumed_from: int | None = None  # the checkpoint step this run resumed from (preemption, time-out), if any
    shared_prompt: bool = False  # rows sharing a prompt ran behind one copy of it (trainer.shared_prompt)


def plan(n_examples: int, trainer, updates_per_batch: int = 1) -> tuple[int, int]:
    """(batches per epoch, total optimizer steps) for ``n_examples`` and the trainer config; a batch of examples
    (``micro_batch_size * grad_accum``) gives ``updates_per_batch`` optimizer steps; ``max_steps`` caps the steps."""
    if n_examples == 0:
        raise ValueError("no training examples: the data produced nothing to train on (for self-play pairs: "
                         "no prompt had both a correct and an incorrect sample)")
    per_step = int(trainer.micro_batch_size) * int(trainer.grad_accum)
    steps_per_epoch = math.ceil(n_examples / per_step)
    total = steps_per_epoch * int(trainer.epochs) * int(updates_per_batch)
    if trainer.max_steps is not None:
        total = min(total, int(trainer.max_steps))
    return steps_per_epoch, total


def example_length(example: dict) -> int:
    """A padding-relevant length of an example in characters: its prompt plus its longest completion (chosen and
    rejected rows are padded to one width in the same batch)."""
    return len(example.get("prompt", "")) + max((len(example[k]) for k in ("chosen", "rejected", "completion")
                                                 if isinstance(example.get(k), str)), default=0)


def step_batches(examples: list, trainer, seed: int, start_batch: int, total_batches: int, rank: int = 0,
                 world_size: int = 1, annotate: Callable[[list, int], list] | None = None,
                 group_by_length: bool = False) -> Iterator[list[list]]:
    """The micro-batches of each batch of examples (``micro_batch_size * grad_accum``: one optimizer step's worth,
    or one rollout's) from ``start_batch`` to ``total_batches``: a seeded permutation per epoch. ``annotate(examples,
    batch index)`` (the family's ``step_hook``) sees each whole batch before it is split.

    ``group_by_length`` (``trainer.group_by_length`` for the offline families: ``Family.groups_by_length``): a step's
    examples are sorted by length (stable) before they are split, so each micro-batch holds examples of similar
    length and carries less padding; on several ranks after the short last step's repeats are chosen, so the same
    examples are repeated. The step holds the same examples and every loss is normalised by the whole step's example
    or token count, so the step's gradient is the same (up to float rounding; beta-DPO's very first step, which uses
    each micro-batch's own mean, aside). Not for online families: their step is sampled in prompt order, so another
    order draws other samples. Nothing to gain at micro-batch 1: no sorting then.

    With ``world_size`` ranks, each rank takes its share of every step's micro-batches (``trainer.grad_accum`` counts
    the micro-batches of a step over all ranks, so the effective batch does not depend on the number of GPUs).
    """
    micro, accum = int(trainer.micro_batch_size), int(trainer.grad_accum)
    if accum % world_size:
        raise ValueError(f"trainer.grad_accum ({accum}) must be a multiple of the number of ranks ({world_size}): "
                         f"each rank takes grad_accum / ranks micro-batches of every optimizer step")
    per_step = micro * accum
    steps_per_epoch = math.ceil(len(examples) / per_step)
    for step in range(start_batch, total_batches):
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        chunk = [examples[i] for i in order[within * per_step:(within + 1) * per_step].tolist()]
        if annotate is not None:
            chunk = annotate(chunk, step)
        order = example_length if group_by_length and micro > 1 else None
        if world_size == 1:
            chunk = sorted(chunk, key=order) if order else chunk
            yield [chunk[i:i + micro] for i in range(0, len(chunk), micro)]
        else:
            yield shard_step(chunk, micro, rank, world_size, order)


def shard_step(chunk: list, micro: int, rank: int, world_size: int,
               order: Callable[[dict], int] | None = None) -> list[list]:
    """This rank's micro-batches of one step: every rank gets the same number (ZeRO-2/3 reduce in each backward).

    A full step splits exactly as on one process (micro-batch i goes to rank i % world_size). The last, shorter
    step of an epoch is split into as many near-equal micro-batches as full ones would need (rounded up to a
    multiple of the ranks, none larger than ``micro``); only when it has fewer examples than that are its first
    examples repeated to fill them (as torch's DistributedSampler pads).
    """
    slots = world_size * math.ceil(math.ceil(len(chunk) / micro) / world_size)
    if len(chunk) < slots:
        chunk = (chunk * math.ceil(slots / len(chunk)))[:slots]
    if order is not None:  # length grouping, after the repeats are chosen
        chunk = sorted(chunk, key=order)
    base, extra = divmod(len(chunk), slots)
    bounds = [0]
    for i in range(slots):
        bounds.append(bounds[-1] + base + (i < extra))
    return [chunk[bounds[i]:bounds[i + 1]] for i in range(rank, slots, world_size)]


def _save_checkpoint(path: Path, engine, state: TrainState, memory: LoopMemory, fingerprint: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine_state = engine.state_dict()  # every rank (DeepSpeed writes its partitions); then rank 0 commits
    if engine.rank != 0:
        return
    tmp = path.with_suffix(".tmp")
    torch.save({"engine": engine_state, "state": asdict(state), "memory": memory.state_dict(),
                "fingerprint": fingerprint, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, engine, fingerprint: str | None) -> tuple[TrainState, LoopMemory] | None:
    """The saved state, or None when the checkpoint belongs to another configuration (or predates fingerprints)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if fingerprint is not None and ckpt.get("fingerprint") != fingerprint:
        if engine.rank == 0:
            print(f"[checkpoint] {path} was written by config {ckpt.get('fingerprint') or '(unknown)'}, this run is "
                  f"config {fingerprint}: starting over", flush=True)
        return None
    engine.load_state_dict(ckpt["engine"])
    torch.set_rng_state(ckpt["torch_rng"])
    random.setstate(ckpt["python_rng"])
    return TrainState(**ckpt["state"]), LoopMemory(ckpt.get("memory"))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _padding_passes(engine, own: int) -> int:
    """How many zero-loss passes this rank adds so that every rank runs as many forward/backward passes per update
    as the busiest one (ZeRO-2/3 reduce inside each backward, ZeRO-3 gathers inside each forward: unequal counts
    hang). A rank whose rollout gave fewer micro-batches (DAPO's filter, online DPO's ties, RFT's verifier) pads. Asked
    BEFORE the first backward: a collective between two backwards would interleave with their reductions."""
    if engine.world_size == 1:
        return 0
    return int(engine.all_reduce_max([own])[0]) - own


def _pad_backward(engine, model, passes: int) -> None:
    for _ in range(passes):  # one token through the whole network: every parameter gets its (zero) gradient
        dummy = torch.zeros((1, 1), dtype=torch.long, device=engine.device)
        engine.backward(model(input_ids=dummy).logits.float().sum() * 0.0)


def optimizer_update(engine, model, reference, objective, algo, hparams, update: list[dict],
                     memory: LoopMemory, shared_prompt: bool = False) -> tuple[float, dict, float, int]:
    """One optimizer step on ``update``'s micro-batches: ``(loss, objective stats, grad norm, tokens seen)``.

    Losses arrive already divided by the update's example / completion-token count over all ranks (``StepContext``),
    so the step does not depend on how it is split into micro-batches or ranks (except that, on the very first step,
    beta-DPO falls back to each micro-batch's own mean before its running mean exists; the unpaired family's
    preparer gives BCO the whole step's mean). An update without a
    micro-batch on any rank advances the schedule only (``engine.skip_step``).
    """
    update = [_to(b, engine.device) for b in update]
    n_batches, n_examples, n_tokens = engine.all_reduce_sum(
        [len(update), sum(int(b.get("examples", 0)) for b in update),
         int(sum(b["completion_mask"][:, 1:].sum() for b in update))])
    if n_batches == 0:  # nothing on any rank (DAPO kept no group, a minibatch the short last step left empty)
        engine.skip_step()
        return 0.0, {}, 0.0, 0
    ctx = StepContext(examples=int(n_examples), tokens=int(n_tokens), memory=memory, shared_prompt=shared_prompt)
    padding = _padding_passes(engine, len(update))
    step_loss, stats = 0.0, {}
    for batch in update:
        with engine.autocast():  # bf16-mixed: bf16 forwards over float32 master weights; backward outside
            loss, micro_stats = objective(model, reference, batch, algo, hparams, ctx)
        engine.backward(loss)
        step_loss += loss.item()
        for key, value in micro_stats.items():
            stats[key] = stats.get(key, 0.0) + value / len(update)
    _pad_backward(engine, model, padding)
    grad_norm = engine.step()
    memory.commit(engine.all_reduce_sum)
    step_loss, seen = engine.all_reduce_sum([step_loss, int(sum(b["attention_mask"].sum() for b in update))])
    return step_loss, engine.mean_over_ranks(stats), grad_norm, int(seen)


def train(policy, reference, tokenizer, algo, hparams: dict, examples: list, trainer, *, max_length: int,
          seed: int, log: Callable[[dict, int], None] | None = None, checkpoint_dir: Path | None = None,
          progress: bool = True, deepspeed=None, fingerprint: str | None = None) -> TrainState:
    """Post-train ``policy`` in place with ``algo`` on ``examples``; returns the training record.

    Checkpoints (with ``checkpoint_dir``) come every ``trainer.checkpoint_every`` steps, at every epoch end, every
    ``trainer.checkpoint_minutes`` of wall time, and at the step a requeue signal arrives in (posttrain/preemption.py).
    ``fingerprint`` (the cell's config hash) is stored in each checkpoint; a checkpoint with another one (the config
    changed since it was written) is not resumed from: the run starts over."""
    # without a checkpoint directory there is nothing to save: the signal keeps whatever handler it had
    watch = Preemption(trainer.get("checkpoint_minutes", 30)) if checkpoint_dir is not None else nullcontext()
    with watch as preempt:
        try:
            return _train(policy, reference, tokenizer, algo, hparams, examples, trainer, max_length=max_length,
                          seed=seed, log=log, checkpoint_dir=checkpoint_dir, progress=progress, deepspeed=deepspeed,
                          fingerprint=fingerprint, preempt=preempt)
        except BaseException as exc:  # Ctrl-C, SIGTERM, a failure: the caller records the steps done (run.py)
            exc.train_state = getattr(preempt, "state", None)
            raise


def _train(policy, reference, tokenizer, algo, hparams: dict, examples: list, trainer, *, max_length: int, seed: int,
           log, checkpoint_dir: Path | None, progress: bool, deepspeed, fingerprint: str | None,
           preempt: Preemption | None) -> TrainState:
    family = families.of(algo)
    loop_options, hparams = split_loop_options(algo, validate(algo.name, hparams))
    sync = ReferenceSync.from_options(loop_options, reference, algo.name)
    objective = family.objective
    updates_per_batch = int(family.updates_per_batch(algo, hparams, int(trainer.grad_accum) // world_size()))
    batches_per_epoch, total = plan(len(examples), trainer, updates_per_batch)
    total_batches = math.ceil(total / updates_per_batch)
    engine = make_engine(policy, trainer, total, deepspeed, checkpoint_dir=checkpoint_dir)
    model = engine.model  # forwards go through the engine (DeepSpeed wraps the module); == policy without it
    state, memory = TrainState(), LoopMemory()
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    saved = _load_checkpoint(ckpt_path, engine, fingerprint) if ckpt_path is not None and ckpt_path.exists() \
        else None
    if saved is not None:
        state, memory = saved
        state.resumed_from = state.step
        if engine.rank == 0:
            print(f"[resumed] training continues from step {state.step} of {total}: {ckpt_path} holds an interrupted "
                  "run of this config", flush=True)
    if preempt is not None:
        preempt.state = state  # live: an exception out of the loop carries the steps done (train() above)
    prime_memory(algo, hparams, memory)
    if sync.every is not None:  # a moving reference is part of the run's state (restored here on resume)
        memory.get("reference", lambda: ReferenceWeights(reference))
    every = int(trainer.checkpoint_every or 0)
    policy.train()
    bar = tqdm(total=total, initial=state.step, desc=f"training {algo.name}", unit="step",
               disable=not progress or engine.rank != 0)
    annotate = family.step_hook(algo, hparams, pool=examples, seed=seed)
    grouped = bool(trainer.get("group_by_length", False)) and family.groups_by_length
    state.shared_prompt = shared_prompt_applies(trainer.get("shared_prompt", "auto"), model, algo, hparams)
    for micro_batches in step_batches(examples, trainer, seed, state.batches, total_batches, engine.rank,
                                      engine.world_size, annotate, grouped):
        started, step_before = time.perf_counter(), state.step
        with engine.autocast():
            updates, rollout_stats = family.prepare(model, reference, tokenizer, algo, hparams, micro_batches,
                                                    max_length=max_length, seed=seed, step=state.batches,
                                                    memory=memory, pool=examples, collectives=engine,
                                                    shared_prompt=state.shared_prompt)
        prepared = time.perf_counter() - started
        state.prepare_seconds += prepared
        rollout_stats = engine.mean_over_ranks({**rollout_stats, "seconds": prepared} if rollout_stats else {})
        reward = rollout_stats.get("reward_mean")
        for update in updates[: total - state.step]:
            update_started = time.perf_counter()
            step_loss, stats, grad_norm, seen_tokens = optimizer_update(engine, model, reference, objective, algo,
                                                                        hparams, update, memory, state.shared_prompt)
            stats["update_seconds"] = time.perf_counter() - update_started
            state.step += 1
            state.tokens += seen_tokens
            state.loss_curve.append([state.step, round(step_loss, 6)])
            if log is not None and (state.step % int(trainer.log_every or 1) == 0 or state.step == total):
                log({"train/loss": step_loss, "train/lr": engine.lr, "train/grad_norm": grad_norm,
                     "train/epoch": state.step / (batches_per_epoch * updates_per_batch),
                     **{f"train/{k}": v for k, v in stats.items()},
                     **{f"rollout/{k}": v for k, v in rollout_stats.items()}}, state.step)
                rollout_stats = {}  # a rollout's statistics are logged once, with its first logged update
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
        state.batches += 1
        state.examples += int(engine.all_reduce_sum([sum(len(mb) for mb in micro_batches)])[0])
        state.seconds += time.perf_counter() - started
        if reward is not None and state.step > step_before:  # at the rollout's first step, as W&B's rollout/*
            state.reward_curve.append([step_before + 1, round(float(reward), 6)])
        if sync.due(step_before, state.step, state.batches, batches_per_epoch) and state.step < total:
            with gathered(model) as bare:  # ZeRO-3: every rank gathers, every rank moves its reference copy
                sync_reference(reference, bare, sync.alpha)
        due = (every and state.step // every > step_before // every) or state.batches % batches_per_epoch == 0
        timed, stop = preempt.due(engine.all_reduce_max) if preempt is not None else (False, False)
        if ckpt_path is not None and ((due or timed) and state.step < total or stop):
            _save_checkpoint(ckpt_path, engine, state, memory, fingerprint)
            preempt.saved()
        if stop:  # the requeue signal came during this step: checkpointed, now requeue (submitit) / exit
            bar.close()
            preempt.hand_over()
    bar.close()
    return state
