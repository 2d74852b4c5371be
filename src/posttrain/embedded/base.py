"""Embedded tiny bases: Qwen2-architecture models pretrained from scratch on the synthetic tasks (docs/design.md).

This package builds and checks a model (it pretrains, samples and scores), so it sits above models/ (which loads them)
rather than inside it. A base is cached by its own build config (architecture, step budget, learning rate, build seed):
its build seed belongs to the scale, not to the run, so every algorithm and run seed at a scale starts from the same
weights. Pretraining is budgeted in optimizer steps (machine load changes wall time several-fold, not the result) and
ends on a cosine decay to ``final_lr_frac`` of the peak, so a later "just keep training" arm is not simply the tail of
an unfinished schedule.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from posttrain.cache import cached_dir, stable_hash
from posttrain.data import synth
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.models.schedule import warmup_cosine

BUILD_VERSION = 1  # bump when the generator or the recipe changes what a build produces


def build_key(build: dict) -> str:
    return f"{build['name']}-{stable_hash({'v': BUILD_VERSION, **build})}"


def ensure_tiny_base(build: dict) -> tuple[Path, Path]:
    """``(model_dir, tokenizer_dir)`` of the tiny base described by ``build`` (built and cached when missing)."""
    root = cached_dir("bases", build_key(build), lambda tmp: _build(build, tmp))
    return root / "model", root / "tokenizer"


def _pretrain_texts(rng: random.Random, n: int, mc_fraction: float, eos: str) -> list[str]:
    texts = []
    for _ in range(n):
        if rng.random() < mc_fraction:
            item = synth.mc_items("pretrain", 1, seed=rng.randrange(1 << 30))[0]
            texts.append(synth.mc_text(item) + eos)
        else:
            p = synth.make_problem(rng, rng.randint(1, 2))
            texts.append(p.prompt + p.completion + eos)
    return texts


def _build(build: dict, out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(build["seed"])
    rng = random.Random(build["seed"])
    tokenizer = build_char_tokenizer(out / "tokenizer")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=build["hidden"], num_hidden_layers=build["layers"],
        num_attention_heads=build["heads"], num_key_value_heads=build["kv_heads"],
        intermediate_size=build["mlp"], max_position_embeddings=512, tie_word_embeddings=True,
        attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, use_cache=True,
    )
    model = Qwen2ForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=build["lr"], betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, build["steps"], build["warmup"], build["final_lr_frac"], warmup_offset=0))
    tokenizer.padding_side = "right"
    started = time.time()
    model.train()
    bar = tqdm(range(build["steps"]), desc=f"pretraining {build['name']}", unit="step")
    for _ in bar:
        texts = _pretrain_texts(rng, build["batch_size"], build["mc_fraction"], tokenizer.eos_token)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "tokenizer")
    meta = {"build": build, "build_version": BUILD_VERSION, "seconds": round(time.time() - started, 1),
            "final_loss": round(loss.item(), 4), "parameters": sum(p.numel() for p in model.parameters()),
            "greedy_accuracy": greedy_accuracy(model, tokenizer, n=200)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def greedy_accuracy(model, tokenizer, n: int = 200, hard: bool = False) -> float:
    """Strict-match greedy accuracy on ``n`` test problems (a build-time sanity number, not the evaluation)."""
    from posttrain.rewards import answers_match, extract_strict
    from posttrain.rollout import SamplingConfig, sample

    probs = synth.problems("test", n, hard=hard)
    outs = sample(model, tokenizer, [p.prompt for p in probs], SamplingConfig(temperature=0, max_new_tokens=160))
    return sum(answers_match(extract_strict(o.completions[0]), p.answer) for o, p in zip(outs, probs)) / n
