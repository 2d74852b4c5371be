"""The arms of bench/throughput.py: one optimizer step at a time of the project's loop or of TRL's DPOTrainer, each
while it holds the baton, with its per-step seconds, losses, LM-head rows and peak memory (see throughput.py)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import torch

#: Optimizer hyperparameters shared by every arm (only so that the first losses can be compared; speed-neutral).
OPTIM = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)


class Baton:
    """One arm runs at a time: the controller hands the turn to an arm and waits until it hands it back."""

    def __init__(self, names):
        self.go = {n: threading.Event() for n in names}
        self.back = threading.Event()
        self.error: tuple[str, BaseException] | None = None

    def wait_turn(self, name):
        self.go[name].wait()
        self.go[name].clear()

    def hand_back(self):
        self.back.set()

    def give(self, name):
        self.back.clear()
        self.go[name].set()
        self.back.wait()


def append_lines(path: Path, lines: list[dict]) -> None:
    """Append one JSON line per implementation to a benchmark's results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")


class Clock:
    """Per-step seconds of one arm: its thread's CPU time (CPU) or synchronised wall time (CUDA)."""

    def __init__(self, cuda: bool):
        self.cuda, self.steps, self.wall = cuda, [], []

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
        self._t, self._w = time.thread_time(), time.perf_counter()

    def now(self) -> float:
        """The clock's reading: this thread's CPU time (CPU) or synchronised wall time (CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.thread_time()

    def stop(self):
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._w
        self.wall.append(wall)
        self.steps.append(wall if self.cuda else time.thread_time() - self._t)


def _resident_bytes(*objs) -> int:
    seen, total = set(), 0
    for obj in objs:
        tensors = []
        if isinstance(obj, torch.nn.Module):
            tensors = [p for p in obj.parameters()] + [p.grad for p in obj.parameters() if p.grad is not None]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors = [t for s in obj.state.values() for t in s.values() if torch.is_tensor(t)]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


class PeakMemory:
    """Peak bytes held between ``start()`` and ``stop()`` above what was held at ``start()``: CUDA's allocator
    statistics, or on CPU torch's profiler (its allocation and free records in time order)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.before
        self.prof.__exit__(None, None, None)
        current = peak = 0
        for event in sorted((e for e in self.prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start):
            current += event.self_cpu_memory_usage
            peak = max(peak, current)
        return peak


def step_peak_bytes(fn, cuda: bool) -> int:
    """Peak bytes held during ``fn()`` above what was held before it."""
    meter = PeakMemory(cuda)
    meter.start()
    fn()
    return meter.stop()


class HeadRows:
    """Positions the LM head saw (a forward hook, counting only: nothing is changed)."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.rows += args[0].numel() // args[0].shape[-1]


# ----------------------------------------------------------------------------------------------------------------
# The arms. Each gets the same initial weights and the same pairs in the same order. Built one after the other in
# the main thread (model loading is not thread-safe); each returns run(), which does ``steps`` optimizer steps and
# one memory step, each one between baton.wait_turn and baton.hand_back, in the arm's own thread.

def family_objective(algo):
    """The objective the training loop runs for ``algo`` (the family record; older trees: OBJECTIVES)."""
    try:
        from posttrain.algorithms import families

        return families.of(algo).objective
    except ImportError:
        from posttrain.algorithms.objectives import OBJECTIVES

        return OBJECTIVES[algo.loop_objective]


def masked_pairwise(policy, reference, batch, algo, hparams, ctx):
    """``posttrain_masked``: the pairwise objective as it runs once it hands its completion mask to
    ``token_logps`` (policy and reference: log-probs on completion positions only); the loss is the registry's
    spec, as in posttrain.algorithms.objectives.pairwise (plain DPO: no WPO, no LD-DPO, no running statistics)."""
    from posttrain import losses
    from posttrain.models.logps import token_logps

    n, mask = batch["pairs"], batch["completion_mask"]
    seq = token_logps(policy, batch["input_ids"], batch["attention_mask"], completion_mask=mask).sum(-1)
    with reference.active() as ref_model:
        ref = token_logps(ref_model, batch["input_ids"], batch["attention_mask"], completion_mask=mask).sum(-1)
    lengths = mask[:, 1:].float().sum(-1)
    inputs, fn_hp = losses.pairwise_inputs(algo.loss, seq[:n], seq[n:], ref[:n], ref[n:], chosen_len=lengths[:n],
                                           rejected_len=lengths[n:], **hparams)
    return algo.loss_spec.fn(inputs, **fn_hp).sum() / ctx.examples, {}


def posttrain_arm(model, pairs, tokenizer, scale, algo_name, device, steps, rec, baton, *, name="posttrain",
                  objective=None, cached=False, shared_prompt="auto"):
    """``cached``: as a study runs it -- the reference log-probs from the per-scale cache (their pre-pass timed
    apart, ``rec.prepass_s``: a scale pays it once for all its runs; no reference copy kept) and each step's pairs
    grouped by length (trainer.group_by_length). ``shared_prompt``: trainer.shared_prompt (auto, as the loop:
    chosen and rejected behind one prompt copy where the attention kernel allows; posttrain.models.shared_prompt)."""
    from omegaconf import OmegaConf

    from posttrain.algorithms import get
    from posttrain.algorithms.memory import LoopMemory
    from posttrain.data.collate import collate
    from posttrain.models.engine import make_engine
    from posttrain.models.loading import Reference
    from posttrain.models.shared_prompt import decide
    from posttrain.train import optimizer_update

    algo = get(algo_name)
    trainer = OmegaConf.create(dict(lr=OPTIM["lr"], betas=list(OPTIM["betas"]), eps=OPTIM["eps"],
                                    weight_decay=OPTIM["weight_decay"], max_grad_norm=OPTIM["max_grad_norm"],
                                    warmup_ratio=0.0, schedule="constant", precision=scale["precision"],
                                    micro_batch_size=scale["micro"], grad_accum=scale["accum"]))
    model.to(device).train()
    micro, per_step = scale["micro"], scale["micro"] * scale["accum"]
    if cached:
        from posttrain.algorithms import reference_cache
        from posttrain.models.precision import Precision

        pairs = pairs[:(steps + 1) * per_step]
        started = rec.clock.now()
        table = reference_cache.score_rows(model, tokenizer, reference_cache.rows(algo.data, pairs),
                                           max_length=scale["max_length"], batch_size=2 * micro,
                                           autocast=lambda: Precision.from_config(scale["precision"]).autocast(device),
                                           progress=False)
        rec.prepass_s = rec.clock.now() - started
        pairs = reference_cache.attach(algo.data, pairs, table)
        reference = reference_cache.CachedReference()
    else:
        reference = Reference(model if algo.needs_reference({"beta": 0.1}) else None)
    engine = make_engine(model, trainer, total_steps=steps)
    objective, memory = objective or family_objective(algo), LoopMemory()
    shared = rec.shared_prompt = decide(shared_prompt, model)
    heads = HeadRows(model)

    def run():
        for i in range(steps):
            batches = update(i)  # tokenised outside the timed step, as TRL's dataloader does
            baton.wait_turn(name)
            heads.rows = 0
            rec.clock.start()
            loss, _, _, _ = optimizer_update(engine, engine.model, reference, objective, algo, {"beta": 0.1},
                                             batches, memory, shared)
            rec.clock.stop()
            rec.losses.append(loss)
            rec.head_rows.append(heads.rows)
            baton.hand_back()
        batches = update(steps)
        baton.wait_turn(name)  # the untimed memory step, on the next step's pairs as TRL's
        rec.peak = step_peak_bytes(lambda: optimizer_update(engine, engine.model, reference, objective, algo,
                                                            {"beta": 0.1}, batches, memory, shared), rec.clock.cuda)
        rec.resident = _resident_bytes(model, engine.optimizer, *([reference.module] if reference.movable else []))
        baton.hand_back()
        heads.handle.remove()

    def update(i):
        chunk = pairs[i * per_step:(i + 1) * per_step]
        if cached:
            from posttrain.train import example_length

            chunk = sorted(chunk, key=example_length)
        batches = []
        for k in range(0, len(chunk), micro):
            batch = collate(algo.data, tokenizer, chunk[k:k + micro], scale["max_length"])
            batch["examples"] = len(chunk[k:k + micro])
            batches.append(batch)
        return batches

    return run


def trl_arm(model, pairs, tokenizer, scale, algo_name, device, steps, rec, baton, *, name, gradient_checkpointing):
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if algo_name != "dpo":
        raise SystemExit(f"--algo {algo_name}: the TRL arms compare DPO only (DPOTrainer's sigmoid loss)")
    cuda = device.type == "cuda"
    args = DPOConfig(output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_{name}"), beta=0.1,
                     per_device_train_batch_size=scale["micro"], gradient_accumulation_steps=scale["accum"],
                     max_steps=steps + 1, learning_rate=OPTIM["lr"], lr_scheduler_type="constant",
                     adam_beta1=OPTIM["betas"][0], adam_beta2=OPTIM["betas"][1], adam_epsilon=OPTIM["eps"],
                     weight_decay=OPTIM["weight_decay"], max_grad_norm=OPTIM["max_grad_norm"],
                     max_length=scale["max_length"], gradient_checkpointing=gradient_checkpointing,
                     bf16=scale["precision"] == "bf16-mixed", use_cpu=not cuda, report_to=[], save_strategy="no",
                     dataloader_num_workers=0, seed=0, disable_tqdm=True)
    heads = HeadRows(model)

    class Bench(DPOTrainer):
        def _get_train_sampler(self, *a, **k):  # the pairs in order, as the posttrain arm sees them
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *a, **k):
            out = super().compute_loss(*a, **k)
            micro_losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
            return out

    micro_losses, state, meter = [], {"step": 0}, PeakMemory(cuda)

    class Turns(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            baton.wait_turn(name)
            heads.rows = 0
            micro_losses.clear()
            if state["step"] == steps:  # the untimed memory step
                meter.start()
            else:
                rec.clock.start()

        def on_step_end(self, args, st, control, **kw):
            if state["step"] == steps:
                rec.peak = meter.stop()
                rec.resident = _resident_bytes(trainer.model, trainer.optimizer, trainer.ref_model)
            else:
                rec.clock.stop()
                rec.losses.append(sum(micro_losses) / len(micro_losses))
                rec.head_rows.append(heads.rows)
            state["step"] += 1
            baton.hand_back()

    per_step = scale["micro"] * scale["accum"]
    data = Dataset.from_list(pairs[:(steps + 1) * per_step])
    trainer = Bench(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Turns()])

    def run():
        trainer.train()
        heads.handle.remove()

    return run


class Record:
    def __init__(self, cuda):
        self.clock, self.losses, self.head_rows, self.peak, self.resident = Clock(cuda), [], [], None, None
        self.prepass_s = None
        self.shared_prompt = None  # posttrain arms: whether pairs ran behind one prompt copy
