"""The two arms of bench/grpo_throughput.py: posttrain's online loop and TRL's GRPOTrainer, each timed by phase
(generation, rollout, training) while it holds the baton of bench/throughput_arms.py (see grpo_throughput.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch
from throughput_arms import Clock, PeakMemory, _resident_bytes


class GRPORecord:
    """Per-step measurements of one arm. A step is one rollout (generation + scoring) and its optimizer update.

    ``step`` runs from the arm getting the baton to its handing it back; ``rollout`` is the rollout phase (posttrain:
    the online family's ``prepare``; TRL: ``_generate_and_score_completions``), ``gen`` the sampling call inside it
    (posttrain: ``posttrain.rollout.sample``; TRL: ``_generate``); training = step - rollout. The last step of a run
    is the memory step (under torch's profiler on CPU): it is never timed."""

    def __init__(self, cuda: bool, total: int):
        self.cuda, self.total = cuda, total
        self.step, self.rollout, self.gen = Clock(cuda), Clock(cuda), Clock(cuda)
        self.gen_tokens, self.train_tokens, self.prompts, self.samples = [], [], [], []
        self.losses, self.rewards = [], []
        self.prompt_digest = hashlib.sha256()
        self.peak = self.resident = None
        self._meter = None
        self.pending = dict(train_tokens=0, loss=0.0)

    def take_turn(self, baton, name):
        """Wait for the arm's turn; the first time, first hand back the setup turn (see :func:`setup_turn`)."""
        if self._setup:
            self._setup = False
            baton.hand_back()
        baton.wait_turn(name)

    def setup_turn(self, baton, name):
        """An arm's setup (TRL's train() before its first step, posttrain's engine) runs in a turn of its own, so it
        neither overlaps another arm's timed step nor draws from torch's global RNG while another arm samples."""
        self._setup = True
        baton.wait_turn(name)

    @property
    def done(self) -> int:
        return len(self.step.steps)

    def begin(self):
        if self.done == self.total - 1:  # the memory step
            self._meter = PeakMemory(self.cuda)
            self._meter.start()
        self.pending = dict(train_tokens=0, loss=0.0)
        self.step.start()

    def generated(self, prompts: list[str], completion_lengths: list[int], group: int):
        distinct = prompts[::group]
        self.prompts.append(len(distinct))
        self.samples.append(len(completion_lengths))
        self.gen_tokens.append(int(sum(completion_lengths)))
        for p in distinct:
            self.prompt_digest.update(p.encode() + b"\0")

    def end(self, resident):
        self.step.stop()
        self.train_tokens.append(int(self.pending["train_tokens"]))
        self.losses.append(float(self.pending["loss"]))
        if self._meter is not None:
            self.peak = self._meter.stop()
            self.resident = _resident_bytes(*resident)
            self._meter = None


# ----------------------------------------------------------------------------------------------------------------
# posttrain: posttrain.train.train itself, with the loop's two calls (the family's prepare, optimizer_update) and
# the sampler wrapped for timing; nothing else of the loop is touched.

def posttrain_arm(model, tokenizer, examples, trainer, hparams, device, seed, rec, baton, *, max_length,
                  name="posttrain"):
    import posttrain.train as loop
    from posttrain.algorithms import families, get
    from posttrain.models.loading import Reference
    from posttrain.rollout import groups

    algo = get("grpo")
    model.to(device)
    reference = Reference(model if algo.needs_reference(hparams) else None)
    family, update, sample = families.of(algo), loop.optimizer_update, groups.sample

    def timed_prepare(*a, **k):
        rec.take_turn(baton, name)
        rec.begin()
        rec.rollout.start()
        updates, stats = family.prepare(*a, **k)
        rec.rollout.stop()
        rec.rewards.append(stats.get("reward_mean"))
        return updates, stats

    def timed_sample(policy, tok, prompts, cfg, **k):
        rec.gen.start()
        out = sample(policy, tok, prompts, cfg, **k)
        rec.gen.stop()
        rec.generated([p for p in prompts for _ in range(cfg.num_samples)],
                      [len(ids) for r in out for ids in r.completion_ids], cfg.num_samples)
        return out

    def timed_update(engine, *a, **k):
        loss, stats, grad_norm, seen = update(engine, *a, **k)
        rec.pending.update(train_tokens=seen, loss=loss)
        rec.end((model, engine.optimizer, *([reference._copy] if reference._copy is not None else [])))
        baton.hand_back()
        return loss, stats, grad_norm, seen

    def run():
        rec.setup_turn(baton, name)
        families.FAMILIES[algo.family] = dataclasses.replace(family, prepare=timed_prepare)
        loop.optimizer_update, groups.sample = timed_update, timed_sample
        try:
            loop.train(model, reference, tokenizer, algo, hparams, examples, trainer, max_length=max_length, seed=seed,
                       progress=False)
        finally:
            families.FAMILIES[algo.family] = family
            loop.optimizer_update, groups.sample = update, sample

    return run


# ----------------------------------------------------------------------------------------------------------------
# TRL: GRPOTrainer driven by its own train(), its rollout and generation methods wrapped for timing.

def trl_arm(model, tokenizer, examples, setting, device, seed, rec, baton, *, name, gradient_checkpointing,
            same_seeds):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rewards import REWARD_FUNCTIONS
    from posttrain.rollout.groups import sampling_seed

    hp, cuda = setting["hparams"], device.type == "cuda"
    (reward_name, weight), = hp["rewards"].items()
    if weight != 1.0:
        raise SystemExit(f"the TRL arm takes one reward of weight 1, got {hp['rewards']}")
    reward_fn = REWARD_FUNCTIONS[reward_name]

    def reward(completions, answer, **kwargs):  # posttrain.rewards' function, as TRL calls a reward function
        return reward_fn(completions, answer).tolist()

    reward.__name__ = reward_name
    G, micro, accum = int(hp["num_samples"]), setting["micro"], setting["accum"]
    args = GRPOConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_grpo_{name}"),
        per_device_train_batch_size=micro * G, gradient_accumulation_steps=accum, steps_per_generation=accum,
        num_generations=G, num_iterations=int(hp["num_iterations"]), max_completion_length=int(hp["max_new_tokens"]),
        temperature=float(hp["temperature"]), top_p=float(hp["top_p"]), top_k=0, repetition_penalty=1.0,
        beta=float(hp["kl_coef"]), loss_type=str(hp["loss_type"]), epsilon=float(hp["eps_low"]),
        epsilon_high=float(hp["eps_high"]), scale_rewards=str(hp["scale_rewards"]), shuffle_dataset=False,
        max_steps=rec.total, learning_rate=setting["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=gradient_checkpointing, bf16=setting["precision"] == "bf16-mixed", use_cpu=not cuda,
        report_to=[], save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, seed=seed,
        dataloader_num_workers=0)
    state = {"rollouts": 0}

    class Bench(GRPOTrainer):
        def _generate(self, prompts):
            if same_seeds:  # the seed posttrain's sampler sets for this rollout (run seed, rollout index, salt 0)
                torch.manual_seed(sampling_seed(seed, state["rollouts"], 0))
            state["rollouts"] += 1
            rec.gen.start()
            out = super()._generate(prompts)
            rec.gen.stop()
            rec.generated(list(prompts), [len(ids) for ids in out[1]], G)
            return out

        def _generate_and_score_completions(self, inputs):
            rec.rollout.start()
            out = super()._generate_and_score_completions(inputs)
            rec.rollout.stop()
            rec.rewards.append(self._metrics["train"]["reward"][-1])
            return out

        def compute_loss(self, model, inputs, *a, **k):
            loss = super().compute_loss(model, inputs, *a, **k)
            rec.pending["train_tokens"] += int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
            rec.pending["loss"] += float(loss.detach())
            return loss

    class Turns(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            rec.take_turn(baton, name)
            rec.begin()

        def on_step_end(self, args, st, control, **kw):
            rec.end((trainer.model, trainer.optimizer, *([trainer.ref_model] if trainer.ref_model is not None else [])))
            baton.hand_back()

    data = Dataset.from_list([{"prompt": e["prompt"], "answer": e["answer"]} for e in examples])
    trainer = Bench(model=model.to(device), args=args, reward_funcs=[reward], train_dataset=data,
                    processing_class=tokenizer, callbacks=[Turns()])

    def run():
        rec.setup_turn(baton, name)
        trainer.train()

    return run
