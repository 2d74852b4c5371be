"""Tokenise examples into padded tensors with a completion mask (prompt and padding masked out).

Prompt and completion are tokenised apart and concatenated (the completion gets the EOS token), so the mask is
exact whatever the tokenizer. Pairs put chosen and rejected in one batch of 2B rows (one forward, same padding;
docs/algorithms.md 6.3). Unpaired batches hold the examples' own rows only: KTO's mismatched rows (a prompt with another
example's completion, for its reference point z0) are chosen for the whole optimizer step by
:func:`mismatched_partners` before the step is split into micro-batches and ranks, and run in the step's no-grad
anchor pass (:func:`mismatched_rows`; posttrain.algorithms.objectives), never in the gradient forward. Every
right-padded batch, offline or generated (:func:`pad_rows`), goes through the one ``_pad``.
"""

from __future__ import annotations

import random

import torch

#: Random draws from the training set for a row whose step holds no other prompt, before the pool is scanned.
POOL_DRAWS = 64


def _encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + c)[:max_length]
    return ids, min(len(p), len(ids))


def pad_sequences(tokenizer, prompts: list[str], completions: list[str], max_length: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` [N, T]."""
    return _pad([_encode(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)], tokenizer.pad_token_id)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``completion_mask`` [N, T] from (prompt ids, completion ids)
    already tokenised (the sampler's own completion token ids: no re-tokenisation), cut at ``max_length``."""
    encoded = []
    for p, c in rows:
        ids = (list(p) + list(c))[:max_length]
        encoded.append((ids, min(len(p), len(ids))))
    return _pad(encoded, pad_id)


def _pad(encoded: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """THE right-padding of the project: rows of (token ids, prompt length) -> padded tensors with their masks."""
    width = max(1, max(len(ids) for ids, _ in encoded))
    input_ids = torch.full((len(encoded), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    completion = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        completion[row, n_prompt: len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def collate(kind: str, tokenizer, examples: list[dict], max_length: int) -> dict:
    """Batch tensors for one micro-batch of ``examples`` of data ``kind``."""
    if kind == "pairs":
        prompts = [e["prompt"] for e in examples] * 2
        completions = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        batch = {**pad_sequences(tokenizer, prompts, completions, max_length), "pairs": len(examples)}
        return {**batch, **_cached_reference(examples, "ref_seq_logps", ("ref_chosen", "ref_rejected"))}
    if kind == "unpaired":
        batch = pad_sequences(tokenizer, [e["prompt"] for e in examples], [e["completion"] for e in examples],
                              max_length)
        return {**batch, "rows": len(examples), "desirable": torch.tensor([bool(e["desirable"]) for e in examples]),
                **_cached_reference(examples, "ref_logps", ("ref_logp",))}
    if kind in ("selfplay_chosen", "gold"):
        return pad_sequences(tokenizer, [e["prompt"] for e in examples], [e["completion"] for e in examples],
                             max_length)
    raise ValueError(f"no collator for data kind {kind!r}")


def _cached_reference(examples: list[dict], key: str, fields: tuple[str, ...]) -> dict:
    """``{key: float32 [len(fields) * N]}`` when every example carries its rows' cached reference log-probs (fields in
    row order: chosen rows, then rejected rows), else ``{}`` (posttrain.algorithms.reference_cache)."""
    if not examples or any(f not in e for e in examples for f in fields):
        return {}
    return {key: torch.tensor([e[f] for f in fields for e in examples], dtype=torch.float32)}


def mismatched_rows(tokenizer, examples: list[dict], max_length: int, *, matched: bool) -> dict:
    """The rows of KTO's anchor pass for one micro-batch of examples annotated by :func:`mismatched_partners`:
    ``(x_i, y'_i)`` for every example (its prompt, its partner's completion), after the examples' own rows
    ``(x_i, y_i)`` when ``matched`` (one reference forward gives both). ``rows`` = the number of examples."""
    if any("kl_completion" not in e for e in examples):
        raise ValueError("unpaired examples without a mismatched partner (kl_completion): annotate each optimizer "
                         "step with mismatched_partners (the unpaired Family's step_hook) before its anchor pass")
    prompts = [e["prompt"] for e in examples]
    partners = [e["kl_completion"] for e in examples]
    if matched:
        batch = pad_sequences(tokenizer, prompts + prompts, [e["completion"] for e in examples] + partners,
                              max_length)
    else:
        batch = pad_sequences(tokenizer, prompts, partners, max_length)
    return {**batch, "rows": len(examples)}


def mismatched_partners(examples: list[dict], pool: list[dict], *, seed: int, step: int) -> list[dict]:
    """Each example of ONE optimizer step, copied with ``kl_completion``: the completion of another example whose
    prompt differs, for KTO's reference point z0 (Ethayarajh et al. 2024, arXiv 2402.01306, section 3.1: the KL
    term is estimated from mismatched pairs ``(x_i, y_j)``).

    Decided on the whole step before it is split into micro-batches and ranks, so z0 does not depend on the split,
    and a pure function of ``(seed, step, examples)`` (a resumed run draws what the uninterrupted one drew). The
    step's examples are ordered with equal prompts together (in order of first appearance), and each takes the
    completion ``m`` places further, cyclically, where ``m`` is the largest number of examples sharing a prompt
    (2 on our unpaired data: a prompt's desirable and undesirable completion): while no prompt holds more than half
    of the step, this is a permutation of the step's own completions with no row paired with its own prompt, as
    TRL's rotation keeps the mismatched set equal to the matched one. Otherwise an example takes the next one in that
    order whose prompt differs, and an example with no other prompt in its step (a step of one example, or of one
    prompt) draws one from ``pool`` (the whole training set) with a RNG seeded by ``(seed, step)``.

    Where we differ from TRL on purpose: TRL's KTOTrainer rotates completions by one inside each per-device batch,
    so at a per-device batch of 1 (every real scale here: micro-batch 1 x 8 accumulation) a row is its own partner
    and z0 is its own log-ratio (TRL refuses per-device batch 1 for that reason); its rotation may also pair a row
    with its own prompt's other completion, which is not a mismatched pair.
    """
    if not examples:
        return []
    groups: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example["prompt"], []).append(i)
    order = [i for members in groups.values() for i in members]
    shift, n = max(len(members) for members in groups.values()), len(examples)
    partners, rng = {}, None
    for k, i in enumerate(order):
        prompt = examples[i]["prompt"]
        j = next((order[(k + offset) % n] for offset in range(shift, shift + n)
                  if examples[order[(k + offset) % n]]["prompt"] != prompt), None)
        if j is None:
            rng = rng or random.Random(f"kto-partner:{seed}:{step}")
            partners[i] = _draw_other_prompt(pool, prompt, rng)["completion"]
        else:
            partners[i] = examples[j]["completion"]
    return [{**example, "kl_completion": partners[i]} for i, example in enumerate(examples)]


def _draw_other_prompt(pool: list[dict], prompt: str, rng: random.Random) -> dict:
    for _ in range(POOL_DRAWS if pool else 0):
        candidate = pool[rng.randrange(len(pool))]
        if candidate["prompt"] != prompt:
            return candidate
    others = [e for e in pool if e["prompt"] != prompt]
    if not others:
        raise ValueError("KTO's reference point z0 needs mismatched pairs (a prompt with another prompt's "
                         "completion), but every training example has the same prompt: train on at least two "
                         "prompts, or use a loss without z0 (algo=apo_zero_unpaired or algo=bco_unpaired)")
    return others[rng.randrange(len(others))]
