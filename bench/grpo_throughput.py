"""GRPO throughput: posttrain's online loop against TRL's GRPOTrainer, generation and training measured apart
(issue 14, "Benchmarks"; the loop: docs/design.md "Layers", GRPO: docs/algorithms.md 5.2).

    python bench/grpo_throughput.py --device cpu --scale tiny-s --out bench/results/grpo_cpu.jsonl
    python bench/grpo_throughput.py --device cuda --scale 0.5b --out bench/results/grpo_cuda.jsonl

As bench/throughput.py (the DPO benchmark) does: one process, the same model (a deep copy per arm), the same prompts
in the same order, one torch thread per arm (``--threads``), the arms taking turns one optimizer step at a time
(bench/throughput_arms.Baton; the order rotates every round), thread CPU time on CPU, synchronised wall time on CUDA:

- ``posttrain``: ``posttrain.train.train`` with ``algo=grpo`` (conf/algo/grpo.yaml as composed by Hydra: loss_type
  dapo, clip 0.2/0.2, kl_coef 0, group z-score advantages, reward ``strict``), the online family's rollout phase
  (posttrain.algorithms.online: ``posttrain.rollout.sample``, HF generate with a KV cache, then scoring with
  posttrain.rewards) and ``optimizer_update``, timed by wrapping those three calls (bench/grpo_arms.py);
- ``trl``: TRL's ``GRPOTrainer`` with its defaults (gradient checkpointing on) and the same reward function, group
  size, max completion length, temperature / top_p (top_k off), learning rate, beta, loss type, clip range and
  reward scaling, driven by its own ``train()``; ``_generate`` and ``_generate_and_score_completions`` are wrapped
  for timing; ``trl_no_gc``: the same with ``gradient_checkpointing=False``.

A step = one rollout of ``prompts`` prompts x ``G`` samples and one optimizer update on it (on-policy: one update per
rollout, as both defaults). Measured per step: generation (the sampling call: tokenise, ``generate``, decode),
rollout (generation + rewards + advantages + batching), training (the rest of the step: the policy's forward and
backward over the rollout, clipping, the optimizer). ``gen_tokens_per_s`` = completion tokens sampled (EOS
included, no padding) per second of generation; ``train_tokens_per_s`` = non-pad prompt + completion tokens through
the policy's forward/backward per second of training. Tokens are counted per implementation (their samples differ
unless ``--same-seeds`` makes them equal), the same way for both.

``--same-seeds`` (default on) seeds TRL's generation of rollout k with the seed posttrain's sampler sets for it
(``posttrain.rollout.groups.sampling_seed(seed, k, 0)``); with the same weights, prompts, generation settings and
batch layout, HF ``generate`` then draws the same tokens, so the first steps' rewards and losses can be compared
exactly (later steps drift once float rounding differences flip a sample). Peak memory: the last step of each arm
runs under torch's profiler (CPU) or ``max_memory_allocated`` (CUDA), untimed: its peak above what was held before
it, plus the arm's resident weights, gradients and optimizer states.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # rehearsal_assets: compose_config, the published Qwen2.5 architectures

import torch  # noqa: E402
from grpo_arms import GRPORecord, posttrain_arm, trl_arm  # noqa: E402
from throughput import build_model, run_arm  # noqa: E402
from throughput_arms import Baton, append_lines  # noqa: E402

#: name -> model, rollout shape (prompts per micro-batch x micro-batches per step, G samples each, max new tokens),
#: learning rate and precision. tiny-s: the project's embedded base (trained: non-zero rewards, completions that end);
#: cpu-s: the DPO benchmark's random-init h256/L4 (rewards all 0: same work, zero advantages); 0.5b / 1.5b: Qwen2.5's
#: published architectures, random-init, bf16 autocast, with the character tokenizer.
SCALES = {
    "tiny-s": dict(embedded="tiny-s", micro=8, accum=1, G=4, max_new=96, lr=1e-5, precision="fp32"),
    "cpu-s": dict(hidden=256, layers=4, heads=4, kv_heads=2, mlp=1024, vocab=None, micro=8, accum=1, G=4, max_new=96,
                  lr=1e-5, precision="fp32"),
    # the smoke test's (tests/test_bench_grpo.py): the code path in seconds, nothing measured
    "cpu-xs": dict(hidden=32, layers=1, heads=2, kv_heads=1, mlp=64, vocab=None, micro=2, accum=1, G=2, max_new=8,
                   lr=1e-5, precision="fp32"),
    "0.5b": dict(qwen="0.5b", micro=4, accum=2, G=8, max_new=256, lr=1e-6, precision="bf16-mixed"),
    "1.5b": dict(qwen="1.5b", micro=4, accum=2, G=8, max_new=256, lr=1e-6, precision="bf16-mixed"),
}
IMPLS = ("posttrain", "trl", "trl_no_gc")
NOTES = {
    "common": "same initial weights and prompts in the same order; one rollout and one optimizer update per step; "
              "HF generate with a KV cache for both; reward posttrain.rewards '{reward}' (weight 1); "
              "AdamW 0.9/0.999 eps 1e-8, no weight decay, constant LR, clipping 1.0; samples {samples}",
    "posttrain": "policy log-probs through posttrain.models.logps (LM head on completion positions, float32); rows "
                 "right-padded and cut to the micro-batch's width; the rest of conf/trainer/default.yaml as composed",
    "trl": "TRL defaults: gradient checkpointing on; entropy computed in every training forward (logging); "
           "left-padded prompts + right-padded completions; logits_to_keep = completion width; "
           "cast_lm_head_to_fp32 off",
    "trl_no_gc": "as trl with gradient_checkpointing=False",
}


def compose(scale: dict, total: int, seed: int):
    """The run config Hydra composes for ``algo=grpo`` on the embedded data (what ``launch.py algo=grpo`` runs with),
    with the bench's shape and optimizer settings."""
    from rehearsal_assets import compose_config

    return compose_config([
        "algo=grpo", "scale=tiny-s", f"seed={seed}", f"algo.num_samples={scale['G']}",
        f"algo.max_new_tokens={scale['max_new']}", f"trainer.lr={scale['lr']}", "trainer.schedule=constant",
        "trainer.warmup_ratio=0.0", "trainer.betas=[0.9,0.999]", "trainer.eps=1e-8", "trainer.weight_decay=0.0",
        "trainer.max_grad_norm=1.0", f"trainer.micro_batch_size={scale['micro']}",
        f"trainer.grad_accum={scale['accum']}", f"trainer.max_steps={total}", "trainer.epochs=1",
        f"trainer.precision={scale['precision']}"])


def load(scale: dict, cfg, device):
    """(model, tokenizer): the embedded base as the run loads it, or a random-init model with the character
    tokenizer."""
    from omegaconf import OmegaConf

    from posttrain.data.tokenizer import build_char_tokenizer
    from posttrain.models.loading import load_policy

    if "embedded" in scale:
        loaded = load_policy(cfg.scale, OmegaConf.create({"enabled": False}), device=device)
        return loaded.model, loaded.tokenizer
    tokenizer = build_char_tokenizer(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_char_tokenizer")
    model = build_model(scale, len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def ordered_examples(cfg, total: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The prompts of the first ``total`` steps in the order posttrain's loop takes them (posttrain.train.step_batches:
    a seeded permutation), so TRL (``shuffle_dataset=False``) sees the same prompts in the same steps."""
    from posttrain.data.selfplay import make_examples, stop_strings, training_prompts
    from posttrain.train import step_batches

    examples = make_examples([{"prompt": p.prompt, "answer": p.answer} for p in training_prompts(cfg.data)],
                             "prompts", stop_strings=stop_strings(cfg.data))
    per_step = int(cfg.trainer.micro_batch_size) * int(cfg.trainer.grad_accum)
    if len(examples) < total * per_step:
        raise SystemExit(f"{len(examples)} training prompts: not enough for {total} steps of {per_step}; lower --steps")
    order = [e for mbs in step_batches(examples, cfg.trainer, seed, 0, total) for mb in mbs for e in mb]
    return order, examples


def summary(name, rec: GRPORecord, warmup: int, common: dict) -> dict:
    timed = slice(warmup, rec.total - 1)  # the last step is the memory step
    step, roll, gen = rec.step.steps[timed], rec.rollout.steps[timed], rec.gen.steps[timed]
    train = [s - r for s, r in zip(step, roll)]
    n = len(step)

    def mean(xs):
        return round(sum(xs) / len(xs), 5)

    return {
        "impl": name, **common,
        "gen_tokens_per_s": round(sum(rec.gen_tokens[timed]) / sum(gen), 2),
        "train_tokens_per_s": round(sum(rec.train_tokens[timed]) / sum(train), 2),
        "step_s": mean(step), "gen_s": mean(gen), "rollout_s": mean(roll), "train_s": mean(train),
        "step_wall_s": mean(rec.step.wall[timed]), "timed_steps": n,
        "gen_tokens_per_step": round(sum(rec.gen_tokens[timed]) / n, 1),
        "train_tokens_per_step": round(sum(rec.train_tokens[timed]) / n, 1),
        "prompts": sum(rec.prompts), "samples": sum(rec.samples), "prompts_sha": rec.prompt_digest.hexdigest()[:16],
        "peak_mem_bytes": int(rec.peak + rec.resident), "step_peak_bytes": int(rec.peak),
        "resident_bytes": int(rec.resident),
        "losses": [round(x, 7) for x in rec.losses[:8]], "rewards": [round(float(r), 5) for r in rec.rewards[:8]],
        # per timed step (step i of every arm ran in the same round): for paired ratios
        "gen_s_steps": [round(x, 5) for x in gen], "train_s_steps": [round(x, 5) for x in train],
        "gen_tokens_steps": rec.gen_tokens[timed], "train_tokens_steps": rec.train_tokens[timed],
    }


def paired_ratio(ours: dict, other: dict, phase: str) -> float:
    """Median over the timed steps of (our tokens/s) / (other's tokens/s) in the same round: robust to the bursts
    of a shared machine, which the totals are not."""
    rate = [[t / s for t, s in zip(line[f"{phase}_tokens_steps"], line[f"{phase}_s_steps"])] for line in (ours, other)]
    return round(statistics.median(a / b for a, b in zip(*rate)), 3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--scale", default="tiny-s", help=f"one of {sorted(SCALES)}")
    parser.add_argument("--out", required=True, help="JSON lines, appended: one per implementation")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (rollout + update) per arm (10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per arm (1)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--same-seeds", action=argparse.BooleanOptionalAction, default=True,
                        help="seed TRL's sampling of rollout k as posttrain's sampler seeds it (same samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared-prompt", choices=("auto", "false"), default="auto",
                        help="trainer.shared_prompt for the posttrain arm (auto: a prompt's samples run as one row "
                             "behind one prompt copy in the log-prob forwards, as the loop does)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--note", default="", help="free text stored with each line (how it was run)")
    args = parser.parse_args(argv)
    if args.scale not in SCALES:
        raise SystemExit(f"unknown --scale {args.scale!r}; known: {sorted(SCALES)}")
    impls = [i for i in args.impls.split(",") if i]
    if not impls or set(impls) - set(IMPLS):
        raise SystemExit(f"--impls {args.impls!r}: choose from {IMPLS}")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps {args.steps} --warmup {args.warmup}: need at least one timed step")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    scale, device, cuda = SCALES[args.scale], torch.device(args.device), args.device == "cuda"
    total = args.warmup + args.steps + 1
    cfg = compose(scale, total, args.seed)
    cfg.trainer.shared_prompt = args.shared_prompt
    from omegaconf import OmegaConf

    hparams = {k: v for k, v in OmegaConf.to_container(cfg.algo, resolve=True).items() if k != "name"}
    order, examples = ordered_examples(cfg, total, args.seed)
    base, tokenizer = load(scale, cfg, device)
    base.train()
    warm_imports()
    records = {name: GRPORecord(cuda, total) for name in impls}
    baton = Baton(impls)
    setting = dict(hparams=hparams, micro=scale["micro"], accum=scale["accum"], lr=scale["lr"],
                   precision=scale["precision"])
    runs = {}
    for name in impls:  # built one after the other in the main thread (model loading is not thread-safe)
        model = copy.deepcopy(base)
        if name == "posttrain":
            runs[name] = posttrain_arm(model, tokenizer, examples, cfg.trainer, hparams, device, args.seed,
                                       records[name], baton, max_length=int(cfg.data.max_length))
        else:
            runs[name] = trl_arm(model, tokenizer, order, setting, device, args.seed, records[name], baton,
                                 name=name, gradient_checkpointing=name == "trl", same_seeds=args.same_seeds)
    threads = [threading.Thread(target=run_arm, args=(n, runs[n], baton), daemon=True) for n in impls]
    for t in threads:
        t.start()
    for round_ in range(-1, total):  # round -1: each arm's setup; the last round: the untimed memory step
        for k in range(len(impls)):
            name = impls[(max(round_, 0) + k) % len(impls)]
            baton.give(name)
            if baton.error is not None:
                failed, exc = baton.error
                raise SystemExit(f"arm {failed} failed: {type(exc).__name__}: {exc}") from exc
    for t in threads:
        t.join(timeout=600)
    common = {
        "algo": "grpo", "device": args.device, "scale": args.scale,
        "hardware": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "params": sum(p.numel() for p in base.parameters()), "precision": scale["precision"],
        "prompts_per_step": scale["micro"] * scale["accum"], "num_generations": scale["G"],
        "micro_batch_prompts": scale["micro"], "grad_accum": scale["accum"], "max_completion_length": scale["max_new"],
        "temperature": hparams["temperature"], "top_p": hparams["top_p"], "lr": scale["lr"],
        "beta": hparams["kl_coef"], "loss_type": hparams["loss_type"], "same_seeds": args.same_seeds,
        "threads": args.threads, "seconds_measure": "thread CPU time" if not cuda else "wall time (synchronised)",
        "cmd": " ".join(["python", "bench/grpo_throughput.py", *(sys.argv[1:] if argv is None else argv)]),
        "note": args.note, "shared_prompt": args.shared_prompt,
    }
    reward = next(iter(hparams["rewards"]))
    samples = "seeded alike per rollout (--same-seeds)" if args.same_seeds else "independently seeded"
    lines = []
    for name in impls:
        notes = NOTES["common"].format(reward=reward, samples=samples) + "; " + NOTES[name]
        lines.append({**summary(name, records[name], args.warmup, common), "notes": notes})
    report(lines)
    append_lines(Path(args.out), lines)
    return 0


def warm_imports() -> None:
    """Module imports are not thread-safe (TRL's lazy modules): all of them here, before the arms' threads start."""
    import datasets  # noqa: F401
    from transformers import TrainerCallback  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401

    import posttrain.algorithms.online  # noqa: F401
    import posttrain.train  # noqa: F401


def report(lines: list[dict]) -> None:
    """The table with each phase's tokens per second and their ratios to each TRL arm, and the first steps'
    rewards and losses side by side."""
    by = {line["impl"]: line for line in lines}
    trls = [o for o in by if o.startswith("trl")]
    print(f"{'impl':<10} {'gen tok/s':>9} {'train tok/s':>11} {'step s':>7} {'gen s':>6} {'train s':>7} "
          f"{'peak MiB':>8}  " + "  ".join(f"gen/train x {o}" for o in trls))
    for line in lines:
        ratios = "  ".join(f"{line['gen_tokens_per_s'] / by[o]['gen_tokens_per_s']:>6.3f}/"
                           f"{line['train_tokens_per_s'] / by[o]['train_tokens_per_s']:<{len(o) + 5}.3f}"
                           for o in trls)
        print(f"{line['impl']:<10} {line['gen_tokens_per_s']:>9.1f} {line['train_tokens_per_s']:>11.1f} "
              f"{line['step_s']:>7.3f} {line['gen_s']:>6.3f} {line['train_s']:>7.3f} "
              f"{line['peak_mem_bytes'] / 2 ** 20:>8.1f}  {ratios}")
    for ours in (o for o in by if o == "posttrain"):
        for o in trls:
            print(f"median per-step ratio, {ours} / {o}: generation {paired_ratio(by[ours], by[o], 'gen')}, "
                  f"training {paired_ratio(by[ours], by[o], 'train')}")
    for line in lines:
        print(f"{line['impl']:<10} prompts {line['prompts']} samples {line['samples']} ({line['prompts_sha']}) "
              f"rewards {line['rewards']} losses {line['losses']}")


if __name__ == "__main__":
    sys.exit(main())
