"""Sampling completions from a policy: the one sampler behind self-play pairs, online-RL rollouts and quick checks.

HF ``generate`` batched with left padding and a KV cache. Sampling is seeded per call (``torch.Generator`` state is
set from ``seed``) so the same model, prompts and seed give the same samples, which is what makes cached self-play
data reproducible. Under ZeRO-3 the caller must gather the weights first (see models/engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = 1
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 256  # sequences per generate() call


@dataclass
class Rollout:
    """Samples for one prompt: texts plus the token ids the policy produced (for log-prob recomputation)."""

    prompt: str
    completions: list[str]
    completion_ids: list[list[int]]
    truncated: list[bool]


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], cfg: SamplingConfig, *, seed: int = 0,
           progress: bool = False, desc: str = "sampling") -> list[Rollout]:
    """Generate ``cfg.num_samples`` completions per prompt (in prompt order, samples grouped per prompt)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    flat = [p for p in prompts for _ in range(cfg.num_samples)]
    texts: list[str] = []
    ids_out: list[list[int]] = []
    truncated: list[bool] = []
    greedy = cfg.temperature <= 0
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    bar = tqdm(total=len(flat), desc=desc, disable=not progress, unit="seq", leave=False)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(flat), cfg.batch_size):
            chunk = flat[start:start + cfg.batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            if greedy:
                kwargs.update(do_sample=False)
            else:
                kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:].tolist()
            for row in new:
                if eos in row:
                    row = row[: row.index(eos) + 1]
                    truncated.append(False)
                else:
                    row = [t for t in row if t != tokenizer.pad_token_id]
                    truncated.append(True)
                ids_out.append(row)
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
            bar.update(len(chunk))
    finally:
        tokenizer.padding_side = old_side
        bar.close()
        model.train(was_training)
    k = cfg.num_samples
    return [Rollout(p, texts[i * k:(i + 1) * k], ids_out[i * k:(i + 1) * k], truncated[i * k:(i + 1) * k])
            for i, p in enumerate(prompts)]
