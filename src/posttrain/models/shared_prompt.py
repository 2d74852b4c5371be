"""Chosen and rejected behind one copy of their prompt (``trainer.shared_prompt``; issue 14, "Speed, per run").

A pair batch holds 2N rows, chosen rows first, each ``prompt + completion`` right-padded (posttrain.data.collate).
Rows i and N+i repeat the same prompt: on the study's data the second copy is a fifth of the tokens a pair forward
processes. Packed, pair i is one row ``prompt + chosen + rejected`` with

- position ids ``0 .. p+c-1`` then ``p .. p+r-1``: the rejected completion sits at the positions it has in its own
  row;
- a block attention mask: prompt tokens attend causally within the prompt, chosen tokens to the prompt and the
  chosen tokens before them, rejected tokens to the prompt and the rejected tokens before them (never to the chosen
  ones); padding attends to itself only (a query with no key would give NaN).

Every completion token then sees exactly the keys, values and positions it sees in its own row, so its log-prob is
the same number up to floating-point rounding (tests/test_shared_prompt.py: within 1e-5 in float32). The first token
of each completion is predicted from the prompt's last position, which both completions share. Outputs come back in
the unpacked [2N, T-1] layout, so every objective reads them unchanged.

Where the attention kernel allows: the mask is a custom 4-D mask, which transformers passes to the ``sdpa`` and
``eager`` kernels as it is; FlashAttention-2/3 and flex attention take no such mask, so ``auto`` leaves pairs unpacked
there, and ``true`` is refused with what to change. A pair whose two rows do not start with the same prompt ids (a
prompt cut by ``data.max_length`` in one row only cannot happen with our collator; a hand-built batch could) is left
unpacked: the whole micro-batch then takes the plain two-row forward. Where we differ from TRL: TRL's DPOTrainer
concatenates chosen and rejected as two rows (``concatenated_forward``) and has no shared-prompt forward; its
``padding_free`` packs whole rows, prompts included, twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain.models.wrappers import hf_model

SETTINGS = ("auto", "true", "false")
#: Attention implementations that take an arbitrary 4-D mask (transformers returns a 4-D mask as it is:
#: masking_utils._preprocess_mask_arguments); sdpa wants booleans (True: attend), eager an additive float mask.
MASKED_KERNELS = ("sdpa", "eager")
#: On CUDA the packed width is rounded up to a multiple of this: SDPA's memory-efficient kernel takes an attention
#: bias whose last dimension is aligned, and copies a misaligned one.
CUDA_ALIGN = 16


def attention_kernel(model) -> str | None:
    """The attention implementation of ``model`` (through DeepSpeed / DDP / peft wrappers), or None if unknown."""
    config = getattr(hf_model(model), "config", None)
    kernel = getattr(config, "_attn_implementation", None)
    return kernel if isinstance(kernel, str) else None


def refusal(setting: Any, model) -> str | None:
    """One line saying what to change when ``trainer.shared_prompt`` cannot be honoured, else None."""
    value = str(setting).lower()
    if value not in SETTINGS:
        return f"trainer.shared_prompt={setting!r}: expected one of {', '.join(SETTINGS)}"
    kernel = attention_kernel(model)
    if value == "true" and kernel not in MASKED_KERNELS:
        return (f"trainer.shared_prompt=true: the model's attention kernel ({kernel}) takes no custom mask; use "
                f"{' or '.join(MASKED_KERNELS)} attention, or trainer.shared_prompt=auto to pack pairs only where "
                "the kernel allows")
    return None


def decide(setting: Any, model) -> bool:
    """Whether pair batches are packed: ``true`` / ``false`` as set (``true`` checked by :func:`refusal`), ``auto``
    where the attention kernel takes a custom mask."""
    problem = refusal(setting, model)
    if problem is not None:
        raise ValueError(problem)
    value = str(setting).lower()
    return value == "true" or (value == "auto" and attention_kernel(model) in MASKED_KERNELS)


@dataclass(frozen=True)
class Packing:
    """A pair batch packed one row per pair, and where each unpacked log-prob position comes from."""
    input_ids: torch.Tensor       # [N, L]
    attention_mask: torch.Tensor  # [N, 1, L, L]: bool (True: attend) or additive float
    position_ids: torch.Tensor    # [N, L]
    source: tuple[torch.Tensor, torch.Tensor]  # (pair, packed position) whose hidden state predicts ...
    targets: torch.Tensor         # ... this token id
    dest: tuple[torch.Tensor, torch.Tensor]    # (row, column) in the unpacked [2N, T-1] log-probs
    shape: tuple[int, int]        # [2N, T-1]


def _lengths(batch_ids: torch.Tensor, attention: torch.Tensor, completion: torch.Tensor) -> tuple[list, list]:
    """Per row: (prompt length, completion length) of a right-padded row (completion follows the prompt)."""
    total = attention.sum(-1).tolist()
    comp = completion.sum(-1).tolist()
    return [int(t - c) for t, c in zip(total, comp)], [int(c) for c in comp]


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, pairs: int, *,
         kernel: str = "sdpa", align: int = 1) -> Packing | None:
    """Pack the pair batch (rows i and ``pairs`` + i) one row per pair; None if some pair's prompts differ."""
    n = int(pairs)
    rows, width = input_ids.shape
    if rows != 2 * n or n == 0:
        return None
    ids, attn, comp = input_ids.cpu(), attention_mask.cpu(), completion_mask.cpu()
    prompt, completion = _lengths(ids, attn, comp)
    for i in range(n):
        if prompt[i] != prompt[n + i] or not torch.equal(ids[i, :prompt[i]], ids[n + i, :prompt[i]]):
            return None
    spans = [prompt[i] + completion[i] + completion[n + i] for i in range(n)]
    length = -(-max(spans) // align) * align
    packed = torch.zeros((n, length), dtype=torch.long)  # padding: token 0, attending to itself only
    positions = torch.zeros((n, length), dtype=torch.long)
    allowed = torch.zeros((n, length, length), dtype=torch.bool)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    source, targets, dest = ([], []), [], ([], [])
    for i in range(n):
        p, c, r = prompt[i], completion[i], completion[n + i]
        end = p + c + r
        packed[i, :p + c] = ids[i, :p + c]
        packed[i, p + c:end] = ids[n + i, p:p + r]
        positions[i, :p + c] = torch.arange(p + c)
        positions[i, p + c:end] = torch.arange(p, p + r)
        allowed[i, :p + c, :p + c] = causal[:p + c, :p + c]
        allowed[i, p + c:end, :p] = True
        allowed[i, p + c:end, p + c:end] = causal[:r, :r]
        allowed[i, torch.arange(end, length), torch.arange(end, length)] = True
        # unpacked column t predicts token t+1. Chosen: t in [p-1, p+c-1), packed in place.
        chosen = torch.arange(max(p - 1, 0), p + c - 1)
        # Rejected: t in [p-1, p+r-1); its first token is predicted from the prompt's last position (shared),
        # token t+1 for t >= p from t's packed place t + c.
        rejected = torch.arange(max(p - 1, 0), p + r - 1)
        from_rejected = torch.where(rejected >= p, rejected + c, rejected)
        for row, cols, places in ((i, chosen, chosen), (n + i, rejected, from_rejected)):
            source[0].append(torch.full_like(cols, i)), source[1].append(places)
            dest[0].append(torch.full_like(cols, row)), dest[1].append(cols)
            targets.append(ids[row, cols + 1])
    if kernel == "eager":
        mask = torch.zeros((n, 1, length, length), dtype=torch.float32)
        mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
    else:
        mask = allowed.unsqueeze(1)
    device = input_ids.device
    cat = lambda parts: torch.cat(parts).to(device)  # noqa: E731
    return Packing(packed.to(device), mask.to(device), positions.to(device), (cat(source[0]), cat(source[1])),
                   cat(targets), (cat(dest[0]), cat(dest[1])), (rows, width - 1))
