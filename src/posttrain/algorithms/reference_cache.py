"""Reference log-probs computed once per scale, shared by every algorithm and seed (docs/training.md, "Shared
per-scale work").

Every offline method at a scale starts from the same base model, so its reference (the frozen initial policy; with
LoRA the base with the adapter off) gives every training row the same sequence log-prob ``log pi_ref(y|x)``
whatever the algorithm or seed. Those values are computed in one no-grad pass over the training rows (sorted by
length, so little padding), cached on disk (posttrain.cache, ``reference_logps/<key>.json``) under a key of what
determines them -- base model, tokenizer, load dtype and compute precision, ``data.max_length``, and the rows
themselves -- and attached to the examples (``ref_chosen`` / ``ref_rejected`` for pairs, ``ref_logp`` for unpaired
rows). The loop's objectives then read them from the batch (``ref_seq_logps`` / ``ref_logps``, posttrain.data.collate)
and the run keeps no reference copy in memory (:class:`CachedReference`). TRL's ``precompute_ref_log_probs`` does the
same within one run; here the pass is paid once per scale (the per-scale preparation job, posttrain.prepare), not once
per run.

Numerics: the pass runs the loop's own log-prob code (posttrain.models.logps) on the same weights under the same
autocast, so a cached value equals the in-loop one up to the rounding of a different batch composition (tested within
1e-5 in fp32, tests/test_reference_cache.py); all runs of a scale then share exactly the same reference values.

Not cached (:meth:`Algorithm.reference_cacheable`): a reference that moves (SPIN, TR-DPO), LD-DPO (per-token values),
TDPO (full-vocabulary reference logits), KTO's z0 (mismatched rows drawn per step), online methods (fresh samples).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch
from tqdm.auto import tqdm

from posttrain.cache import cached_json_on_all_ranks, stable_hash
from posttrain.data.collate import pad_sequences
from posttrain.models.logps import sequence_logps

#: data kind -> the completion fields whose (prompt, completion) rows the reference scores.
ROW_FIELDS = {"pairs": ("chosen", "rejected"), "unpaired": ("completion",)}
#: example field -> the key the cached value is attached under.
ATTACHED = {"chosen": "ref_chosen", "rejected": "ref_rejected", "completion": "ref_logp"}
VERSION = 1


class CachedReference:
    """The reference of a run whose reference log-probs all come with its batches: enabled, but with no model to
    run (and none kept in memory). A forward asked of it is a bug of the objective, said as such."""

    enabled = True
    movable = False
    has_model = False
    calls = 0

    def active(self):
        raise RuntimeError("reference log-probs of this run come from the per-scale cache (trainer.reference_cache); "
                           "a batch reached the objective without them")


def row_key(prompt: str, completion: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{completion}".encode()).hexdigest()[:20]


def rows(kind: str, examples: Iterable[dict]) -> list[tuple[str, str]]:
    """The distinct (prompt, completion) rows of ``examples`` of data ``kind`` the reference scores, in a fixed
    order."""
    seen: dict[str, tuple[str, str]] = {}
    for example in examples:
        for name in ROW_FIELDS[kind]:
            seen.setdefault(row_key(example["prompt"], example[name]), (example["prompt"], example[name]))
    return [seen[k] for k in sorted(seen)]


@torch.no_grad()
def score_rows(model, tokenizer, row_list: list[tuple[str, str]], *, max_length: int, batch_size: int, autocast,
               progress: bool = True) -> dict[str, float]:
    """``{row_key: sum of the completion tokens' log-probs}`` under ``model``, ``batch_size`` rows per forward,
    shortest rows first (little padding), each batch inside a fresh ``autocast()`` context."""
    device = next(model.parameters()).device
    order = sorted(range(len(row_list)), key=lambda i: len(row_list[i][0]) + len(row_list[i][1]))
    was_training = model.training
    model.eval()
    table: dict[str, float] = {}
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="reference log-probs", unit="batch",
                          disable=not progress):
            chunk = [row_list[i] for i in order[start:start + batch_size]]
            batch = pad_sequences(tokenizer, [p for p, _ in chunk], [c for _, c in chunk], max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                seq = sequence_logps(model, batch)[0].float().cpu()
            for (prompt, completion), value in zip(chunk, seq.tolist()):
                table[row_key(prompt, completion)] = value
    finally:
        model.train(was_training)
    return table


@torch.no_grad()
def score_rows_on_all_ranks(model, tokenizer, row_list: list[tuple[str, str]], *, max_length: int, batch_size: int,
                            autocast, progress: bool = True) -> dict[str, float]:
    """:func:`score_rows` shared by the ranks of a process group (collective: every rank calls it): each rank scores
    every ``world``-th row of the length order, runs as many forwards as the busiest rank (a ZeRO-3 model gathers its
    weights inside each forward, so unequal counts hang), and every rank gets the whole table."""
    from posttrain.models.distributed import world_size

    world = world_size()
    if world == 1:
        return score_rows(model, tokenizer, row_list, max_length=max_length, batch_size=batch_size,
                          autocast=autocast, progress=progress)
    rank = torch.distributed.get_rank()
    order = sorted(row_list, key=lambda row: len(row[0]) + len(row[1]))
    shares = [order[r::world] for r in range(world)]
    forwards = [-(-len(share) // batch_size) for share in shares]
    table = score_rows(model, tokenizer, shares[rank], max_length=max_length, batch_size=batch_size,
                       autocast=autocast, progress=progress)
    device = next(model.parameters()).device
    for _ in range(max(forwards) - forwards[rank]):
        with autocast():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, table)
    return {key: value for part in parts for key, value in part.items()}


def cache_key(*, model_id: str, tokenizer_id: str, load_dtype: str, precision: str, max_length: int,
              row_list: list[tuple[str, str]]) -> str:
    """What determines the values: the reference's weights and numerics, the truncation, and the rows."""
    return stable_hash({"v": VERSION, "model": model_id, "tokenizer": tokenizer_id, "dtype": load_dtype,
                        "precision": precision, "max_length": int(max_length),
                        "rows": stable_hash([row_key(p, c) for p, c in row_list], length=32)}, length=16)


def reference_table(model, tokenizer, kind: str, examples: list[dict], *, model_id: str, tokenizer_id: str,
                    load_dtype: str, precision: str, max_length: int, batch_size: int, autocast,
                    progress: bool = True) -> dict[str, float]:
    """The cached table of ``examples``' rows, computed the first time under the cache's file lock; under a process
    group by every rank together (rank 0 decides hit or miss and writes; no rank waits on the lock inside a
    collective while another computes)."""
    row_list = rows(kind, examples)
    key = cache_key(model_id=model_id, tokenizer_id=tokenizer_id, load_dtype=load_dtype, precision=precision,
                    max_length=max_length, row_list=row_list)
    return cached_json_on_all_ranks("reference_logps", key, lambda: score_rows_on_all_ranks(
        model, tokenizer, row_list, max_length=max_length, batch_size=batch_size, autocast=autocast,
        progress=progress))


def attach(kind: str, examples: list[dict], table: dict[str, float]) -> list[dict]:
    """Copies of ``examples`` carrying their rows' cached reference log-probs (posttrain.data.collate batches them)."""
    out = []
    for example in examples:
        extra = {}
        for name in ROW_FIELDS[kind]:
            key = row_key(example["prompt"], example[name])
            if key not in table:
                raise KeyError(f"reference log-prob cache has no row for an example of kind {kind!r}: rebuild it "
                               f"(delete the reference_logps entry under POSTTRAIN_CACHE)")
            extra[ATTACHED[name]] = table[key]
        out.append({**example, **extra})
    return out
