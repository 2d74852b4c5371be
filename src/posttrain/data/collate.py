"""Tokenise examples into padded tensors with a completion mask (prompt and padding masked out).

Prompt and completion are tokenised apart and concatenated (the completion gets the EOS token), so the mask is
exact whatever the tokenizer. Pairs put chosen and rejected in one batch of 2B rows (one forward, same padding;
ALGORITHMS.md 6.3); unpaired batches add each row's mismatched completion (the next row's, rotated by one) for
KTO's KL anchor.
"""

from __future__ import annotations

import torch


def _encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + c)[:max_length]
    return ids, min(len(p), len(ids))


def pad_sequences(tokenizer, prompts: list[str], completions: list[str], max_length: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` [N, T]."""
    encoded = [_encode(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    completion = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        completion[row, n_prompt: len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def collate(kind: str, tokenizer, examples: list[dict], max_length: int) -> dict:
    """Batch tensors for one micro-batch of ``examples`` of data ``kind``."""
    if kind == "pairs":
        prompts = [e["prompt"] for e in examples] * 2
        completions = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        return {**pad_sequences(tokenizer, prompts, completions, max_length), "pairs": len(examples)}
    if kind == "unpaired":
        prompts = [e["prompt"] for e in examples]
        completions = [e["completion"] for e in examples]
        mismatched = completions[1:] + completions[:1]
        batch = pad_sequences(tokenizer, prompts + prompts, completions + mismatched, max_length)
        return {**batch, "rows": len(examples),
                "desirable": torch.tensor([bool(e["desirable"]) for e in examples])}
    if kind in ("selfplay_chosen", "gold"):
        return pad_sequences(tokenizer, [e["prompt"] for e in examples], [e["completion"] for e in examples],
                             max_length)
    raise ValueError(f"no collator for data kind {kind!r}")
