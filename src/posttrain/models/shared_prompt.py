"""Rows that share a prompt behind one copy of it (``trainer.shared_prompt``; issue 14, "Speed, per run").

A pair batch holds each prompt twice (chosen rows, then rejected rows: posttrain.data.collate); an online rollout holds
it once per sample (``num_samples`` rows per prompt, next to each other); self-play pairs may repeat a prompt across
pairs. On the benchmark's synthetic pairs the second copy is a fifth of the tokens; with the study's 8-shot GSM8K
prompts (about 1,500 tokens before a completion of a few hundred) the repeated prompts are most of them. Packed, the
rows of one prompt become one row ``prompt + completion_1 + ... + completion_k`` with

- each completion at the position ids it has in its own row (``p .. p+c_j-1``);
- a block attention mask: prompt tokens attend causally within the prompt, a completion's tokens to the prompt and to
  that completion's tokens before them, never to another completion; padding attends to itself only (a query with no
  key would give NaN).

Every completion token then sees exactly the keys, values and positions it sees in its own row, so its log-prob is
the same number up to floating-point rounding (tests/test_shared_prompt.py: within 1e-5 in float32). The first token
of every completion is predicted from the prompt's last position, which they share. The log-probs come back in the
unpacked [N, T-1] layout, so every objective reads them unchanged. A group is cut into several packed rows where one
would pass twice the batch's width (:func:`pack`'s ``max_span``): the packed row's attention work (its mask is dense)
stays within four times a row's.

Where the model allows: the mask is a custom 4-D mask, which transformers passes to the ``sdpa`` and ``eager`` kernels
as it is; FlashAttention-2/3 and flex attention take no such mask, and sliding-window layers would have the custom
mask overrule their window, so ``auto`` leaves rows unpacked there and ``true`` is refused with what to change. A
batch in which no two rows share a prompt (gold SFT, KTO's unpaired rows), or whose rows are not right-padded
``prompt + completion``, runs as it is. Where we differ from TRL: TRL's DPOTrainer concatenates chosen and rejected as
two rows (``concatenated_forward``) and its GRPOTrainer repeats each prompt for every generation; neither has a
shared-prompt forward, and DPO's ``padding_free`` packs whole rows, prompts included, once per row.
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


def _obstacle(model) -> str | None:
    """Why this model cannot run packed rows, or None."""
    kernel = attention_kernel(model)
    if kernel not in MASKED_KERNELS:
        return (f"the model's attention kernel ({kernel}) takes no custom mask; use {' or '.join(MASKED_KERNELS)} "
                "attention")
    config = getattr(hf_model(model), "config", None)
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        # transformers hands a custom 4-D mask to sliding-window layers as it is: packed rows would see past the window
        return "the model has sliding-window attention layers, which a custom mask would overrule"
    return None


def refusal(setting: Any, model) -> str | None:
    """One line saying what to change when ``trainer.shared_prompt`` cannot be honoured, else None."""
    value = str(setting).lower()
    if value not in SETTINGS:
        return f"trainer.shared_prompt={setting!r}: expected one of {', '.join(SETTINGS)}"
    obstacle = _obstacle(model)
    if value == "true" and obstacle is not None:
        return (f"trainer.shared_prompt=true: {obstacle}; or set trainer.shared_prompt=auto to pack rows only where "
                "the model allows")
    return None


def decide(setting: Any, model) -> bool:
    """Whether rows that share a prompt are packed: ``true`` / ``false`` as set (``true`` checked by
    :func:`refusal`), ``auto`` where the attention kernel takes a custom mask and no layer is sliding-window."""
    problem = refusal(setting, model)
    if problem is not None:
        raise ValueError(problem)
    value = str(setting).lower()
    return value == "true" or (value == "auto" and _obstacle(model) is None)


def algorithm_packs(algo, hparams) -> bool:
    """Whether ``algo``'s forwards can pack: a family whose forwards can (``shares_prompt``: not TDPO's logits or
    KTO's unpaired rows), and not WPO (full-vocabulary logits, two rows). The sweep plan counts tokens by it."""
    from posttrain.algorithms.families import of

    return of(algo).shares_prompt and not (hparams or {}).get("wpo")


def applies(setting: Any, model, algo, hparams) -> bool:
    """Whether a run of ``algo`` packs its rows: :func:`decide` and :func:`algorithm_packs`."""
    return decide(setting, model) and algorithm_packs(algo, hparams)


@dataclass(frozen=True)
class Packing:
    """A batch packed one row per prompt group, and where each unpacked log-prob position comes from."""
    input_ids: torch.Tensor       # [G, L]
    attention_mask: torch.Tensor  # [G, 1, L, L]: bool (True: attend) or additive float
    position_ids: torch.Tensor    # [G, L]
    source: tuple[torch.Tensor, torch.Tensor]  # (packed row, position) whose hidden state predicts ...
    targets: torch.Tensor         # ... this token id
    dest: tuple[torch.Tensor, torch.Tensor]    # (row, column) in the unpacked [N, T-1] log-probs
    shape: tuple[int, int]        # [N, T-1]


def _lengths(attention: torch.Tensor, completion: torch.Tensor) -> tuple[list, list] | None:
    """Per row: (prompt length, completion length), or None unless every row is ``prompt + completion`` then right
    padding (what posttrain.data.collate builds; a left-padded or holed row is not packed)."""
    total, comp = attention.sum(-1), completion.sum(-1)
    positions = torch.arange(attention.shape[1])
    expected_attention = positions < total[:, None]
    expected_completion = expected_attention & (positions >= (total - comp)[:, None])
    if not (torch.equal(attention.bool(), expected_attention) and torch.equal(completion.bool(), expected_completion)):
        return None
    return (total - comp).tolist(), comp.tolist()


def prompt_groups(ids: torch.Tensor, prompt: list, completion: list, max_span: int) -> list[list[int]]:
    """Rows with the same prompt ids, in order of first appearance; a group is cut where its packed row (prompt +
    every completion) would pass ``max_span`` tokens. Rows without a completion token (nothing to compute: DAPO's
    overlong filter zeroes a row's completion mask) are left out."""
    by_prompt: dict[tuple, list[list[int]]] = {}
    for row, p in enumerate(prompt):
        if completion[row] == 0:
            continue
        chunks = by_prompt.setdefault((p, tuple(ids[row, :p].tolist())), [[]])
        span = p + sum(completion[r] for r in chunks[-1]) + completion[row]
        if chunks[-1] and span > max_span:
            chunks.append([])
        chunks[-1].append(row)
    return [group for chunks in by_prompt.values() for group in chunks]


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, *,
         kernel: str = "sdpa", align: int = 1, max_span: int | None = None) -> Packing | None:
    """Pack the rows that share a prompt one packed row per group, ``prompt + completion_1 + ... + completion_k``
    (at most ``max_span`` tokens, default twice the batch's width: for pairs, always the whole pair); None when no
    two rows share a prompt (nothing to save) or a row is not right-padded ``prompt + completion``."""
    rows, width = input_ids.shape
    ids = input_ids.cpu()
    lengths = _lengths(attention_mask.cpu(), completion_mask.cpu())
    if lengths is None or rows < 2:
        return None
    prompt, completion = lengths
    groups = prompt_groups(ids, prompt, completion, max_span or 2 * width)
    if all(len(group) == 1 for group in groups):  # no two rows to put behind one prompt (or no row to compute)
        return None
    spans = [prompt[g[0]] + sum(completion[r] for r in g) for g in groups]
    length = -(-max(spans) // align) * align
    n = len(groups)
    packed = torch.zeros((n, length), dtype=torch.long)  # padding: token 0
    positions = torch.zeros((n, length), dtype=torch.long)
    segments = torch.full((n, length), -1, dtype=torch.long)  # 0: the prompt, j: completion j, -1: padding
    source, targets, dest = ([], []), [], ([], [])
    for k, group in enumerate(groups):
        p = prompt[group[0]]
        packed[k, :p] = ids[group[0], :p]
        positions[k, :p] = torch.arange(p)
        segments[k, :p] = 0
        offset = p
        for j, row in enumerate(group, start=1):
            c = completion[row]
            block = slice(offset, offset + c)
            packed[k, block] = ids[row, p:p + c]
            positions[k, block] = torch.arange(p, p + c)
            segments[k, block] = j
            # unpacked column t (p-1 <= t < p+c-1) predicts token t+1: the prompt's last position predicts every
            # completion's first token (shared), token t+1 for t >= p comes from t's packed place
            cols = torch.arange(max(p - 1, 0), p + c - 1)
            source[0].append(torch.full_like(cols, k))
            source[1].append(torch.where(cols >= p, cols - p + offset, cols))
            dest[0].append(torch.full_like(cols, row)), dest[1].append(cols)
            targets.append(ids[row, cols + 1])
            offset += c
    device = input_ids.device
    cat = lambda parts: torch.cat(parts).to(device)  # noqa: E731
    return Packing(packed.to(device), block_mask(segments.to(device), kernel), positions.to(device),
                   (cat(source[0]), cat(source[1])), cat(targets), (cat(dest[0]), cat(dest[1])), (rows, width - 1))


def block_mask(segments: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
    """The [G, 1, L, L] attention mask of packed rows from their segment ids [G, L] (0: the prompt, j > 0: completion
    j, -1: padding), built where the segments are (the device): a query attends to the keys at or before it in the
    prompt or in its own segment -- the prompt causally, a completion to the prompt and its own earlier tokens,
    padding to earlier padding (never an empty row). Booleans (True: attend) for sdpa, additive float32 for eager."""
    length = segments.shape[1]
    at_or_before = torch.ones((length, length), dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    seen = ((key == 0) & (query >= 0)) | (key == query)  # [G, query, key]
    allowed = (seen & at_or_before).unsqueeze(1)
    if kernel != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=segments.device).masked_fill_(
        ~allowed, torch.finfo(torch.float32).min)
