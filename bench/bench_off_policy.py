"""On-policy vs several updates per rollout for the study's online arm (sgrpo, gspo, cispo) on the tiny-s base.

With one optimizer step per rollout (the study's setting) the importance ratio is exactly 1 and the three methods
differ only in aggregation: their clip fractions are 0. With ``num_iterations`` x ``num_minibatches`` > 1 the later
steps of a rollout see the moved policy, and each method's clipping acts differently. This records, per method and
setting: mean / max clip fraction over the steps, the largest ratio seen, the mean reward of the first and last
quarter of the rollouts, and the wall time, one JSON line each in bench/results/off_policy.jsonl.

    python bench/bench_off_policy.py [--rollouts 16] [--out bench/results/off_policy.jsonl]

Task: the slow sgrpo test's easy one-operation problems (8 prompts, 4 samples each, 32 new tokens, lr 2e-4).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, iterations: int, minibatches: int, rollouts: int) -> dict:
    from transformers import AutoModelForCausalLM

    from posttrain.algorithms import get
    from posttrain.data import synth
    from posttrain.models.loading import Reference, load_tokenizer
    from posttrain.models.tiny import ensure_tiny_base
    from posttrain.train import train

    model_dir, tok_dir = ensure_tiny_base(OmegaConf.to_container(OmegaConf.load(ROOT / "conf/scale/tiny-s.yaml").build))
    tokenizer = load_tokenizer(str(tok_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    rng = random.Random(0)
    examples = [{"prompt": p.prompt, "answer": p.answer} for p in (synth.make_problem(rng, 1) for _ in range(8))]
    trainer = OmegaConf.create(dict(lr=2e-4, epochs=rollouts, micro_batch_size=8 // minibatches, grad_accum=minibatches,
                                    max_steps=None, warmup_ratio=0.0, schedule="constant", betas=[0.9, 0.95],
                                    eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, checkpoint_every=0, log_every=1))
    logs = []
    started = time.perf_counter()
    state = train(model, Reference(None), tokenizer, get(name),
                  {"max_new_tokens": 32, "num_samples": 4, "num_iterations": iterations,
                   "num_minibatches": minibatches}, examples, trainer, max_length=256, seed=0, progress=False,
                  log=lambda metrics, step: logs.append(metrics))
    seconds = time.perf_counter() - started
    clip = [m.get("train/pg/clip_frac", 0.0) for m in logs]
    rewards = [r for _, r in state.reward_curve]
    q = max(1, len(rewards) // 4)
    return {"algo": name, "num_iterations": iterations, "num_minibatches": minibatches, "rollouts": len(rewards),
            "optimizer_steps": state.step, "clip_frac_mean": round(sum(clip) / len(clip), 5),
            "clip_frac_max": round(max(clip), 5),
            "ratio_max": round(max(m.get("train/pg/ratio_max", 1.0) for m in logs), 5),
            "reward_first_quarter": round(sum(rewards[:q]) / q, 4),
            "reward_last_quarter": round(sum(rewards[-q:]) / q, 4), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/off_policy.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for name in ("sgrpo", "gspo", "cispo"):
            for iterations, minibatches in ((1, 1), (2, 2)):
                row = {**run(name, iterations, minibatches, args.rollouts), **machine}
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
