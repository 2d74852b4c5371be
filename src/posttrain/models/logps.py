"""Per-token log-probabilities of a causal LM: the one place the project turns logits into log-probs.

Every objective, the rollout phase and the reference use these (docs/algorithms.md 0 and 6): log-probs in float32,
position t holding ``log pi(x_{t+1} | x_<=t)`` (so ``[B, T-1]`` for ``[B, T]`` ids), the logits divided by the
sampling temperature when it is not 1 (docs/algorithms.md 6.2).

Log-probs only where they are needed (docs/design.md, issue 14): given a ``completion_mask``, :func:`token_logps`
runs the network body once for its hidden states and the LM head + float32 log-softmax only on the positions whose
next token is a completion token, :data:`CHUNK` positions at a time, so the full-vocabulary logits of the batch
([B, T, V]: gigabytes at Qwen's 152K vocabulary) are never materialised; the other positions hold 0. The body and
the head are found with ``get_decoder()`` / ``get_output_embeddings()`` (not class names) and the model is called
as a whole with ``logits_to_keep`` empty, so every wrapper's forward still runs: a peft ``PeftModel`` (adapters on or
disabled), a DeepSpeed engine module (its forward resets ZeRO's per-micro-batch state and hooks its backward
prologue onto the log-probs, which the forward returns), autocast. A model where either piece is not found, or
whose forward takes no ``logits_to_keep``, takes the plain path (full logits, then the mask); so does a ZeRO-3
partitioned head: ZeRO-3 gathers its weights in every call, this path calls it more often than a plain forward,
and ranks that pad an uneven step with plain forwards must match each other's gathers one for one.
"""

from __future__ import annotations

import inspect

import torch
import torch.utils.checkpoint

from posttrain.models.wrappers import unwrapped

#: Honour a caller's completion mask with the head-only-where-needed path (``False``: the plain full-logits path,
#: same values; bench/throughput.py's ``--logps plain`` sets it to compare the two).
COMPLETION_ONLY = True
#: Positions sent through the LM head at a time on the completion-only path (256 x Qwen's 151,936-row head: 156 MB
#: of float32 logits per chunk; 1024 made the reference forward's chunks the step's memory peak on the benchmark).
CHUNK = 256
#: With gradients, recompute each chunk's logits in the backward pass instead of keeping them for it (reentrant
#: activation checkpointing of the head, chunk by chunk): CHUNK x V held at a time instead of completion positions
#: x V, for one more head forward per chunk. Off by default (speed); tested on plain models, not under ZeRO-3.
RECOMPUTE_HEAD = False


def shifted_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Next-token logits [B, T-1, V] in float32 (divided by ``temperature`` when it is positive and not 1).

    Only for what needs the full distribution (WPO's squared-probability mass, TDPO's sequential KL); log-probs of
    the taken tokens come from :func:`token_logps`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return _scaled(logits, temperature)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = float(temperature)
    return logits / t if t > 0 and t != 1.0 else logits


def _picked_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float32 log-softmax of ``logits`` [..., V] (divided by ``temperature``) picked at ``targets`` [...]."""
    logits = _scaled(logits.float(), temperature)
    return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def logps_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-softmax picked at the next tokens: [B, T-1, V] logits -> [B, T-1] log-probs."""
    return _picked_logps(logits, input_ids[:, 1:])


def _shifted_mask(completion_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The positions to compute, [B, T-1] bool: a token-level mask [B, T] (as batch["completion_mask"]) is shifted
    by one (position t predicts token t+1); a [B, T-1] mask is taken as already shifted."""
    b, t = input_ids.shape
    if tuple(completion_mask.shape) == (b, t):
        return completion_mask[:, 1:].bool().to(input_ids.device)
    if tuple(completion_mask.shape) == (b, t - 1):
        return completion_mask.bool().to(input_ids.device)
    raise ValueError(f"completion_mask has shape {tuple(completion_mask.shape)}; expected [B, T] = {(b, t)} like "
                     f"input_ids, or [B, T-1] = {(b, t - 1)} already shifted")


def _pieces(model):
    """(module whose forward the call reaches, body, head) or None when the model does not expose them."""
    inner = unwrapped(model)
    try:
        head = inner.get_output_embeddings()
        body = inner.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(head, torch.nn.Module) or not isinstance(body, torch.nn.Module) or body is inner:
        return None
    causal_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft: the HF model
    try:
        accepted = inspect.signature(causal_lm.forward).parameters
    except (TypeError, ValueError):
        return None
    if "logits_to_keep" not in accepted:
        return None
    config = getattr(causal_lm, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None  # the CausalLM reshapes the head's logits after it (Gemma-2 soft-capping, Cohere's scale)
    return inner, body, head


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return _picked_logps(head(hidden), targets, temperature)


def _partitioned(module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the module's parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _head_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax of ``head(hidden)`` at ``targets``, [N], float32, CHUNK rows at a time (with gradients each
    chunk's logits are kept for the backward pass, completion positions x V in all, unless RECOMPUTE_HEAD)."""
    recompute = RECOMPUTE_HEAD and torch.is_grad_enabled() and hidden.requires_grad
    # At least one call, even with no row: the result stays in the autograd graph (a micro-batch whose completions
    # were all masked, DAPO's overlong filter, still gives a loss that backward can run through).
    out = []
    for start in range(0, max(hidden.shape[0], 1), CHUNK):
        args = (head, hidden[start:start + CHUNK], targets[start:start + CHUNK], temperature)
        # reentrant: each chunk's forward and backward run together inside its backward (the non-reentrant form
        # let the autograd engine hold every chunk's recomputed logits at once: measured, no saving)
        out.append(torch.utils.checkpoint.checkpoint(_chunk_logps, *args, use_reentrant=True) if recompute
                   else _chunk_logps(*args))
    return torch.cat(out)


def _completion_logps(model, pieces, inputs: dict, plan, temperature) -> torch.Tensor:
    """The body once, then the head at the plan's positions only: ``plan`` = ((rows, cols) of the hidden states,
    their target ids, (rows, cols) of the result, result shape)."""
    inner, body, head = pieces
    (rows, cols), targets, dest, shape = plan
    captured = {}

    def keep_hidden(module, args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def head_only(module, args, kwargs, output):
        if "hidden" not in captured:  # the body was not called as a module: the caller takes the plain path
            return None
        values = _head_logps(head, captured.pop("hidden")[rows, cols], targets, temperature)
        return torch.zeros(shape, dtype=torch.float32, device=values.device).index_put(dest, values)

    handles = [body.register_forward_hook(keep_hidden),
               inner.register_forward_hook(head_only, with_kwargs=True)]
    try:
        # the whole model runs (wrappers' forwards included); the head inside it sees no position
        no_position = torch.zeros(0, dtype=torch.long, device=targets.device)
        return model(**inputs, logits_to_keep=no_position)
    finally:
        for handle in handles:
            handle.remove()


def _head_pieces(model):
    """:func:`_pieces` where the completion-only path applies (on, and the head not ZeRO-3 partitioned), else None."""
    pieces = _pieces(model) if COMPLETION_ONLY else None
    if pieces is not None and _partitioned(pieces[2]):
        # ZeRO-3 gathers the head's weights in each call of it: this path calls it more often than a plain forward
        # does, and a rank padding its step with plain forwards (uneven micro-batches) would leave the ranks'
        # gathers unmatched. Partitioned heads take the plain path.
        return None
    return pieces


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                completion_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(x_t | x_<t) for t = 1..T-1, float32, shape [B, T-1].

    With ``completion_mask`` ([B, T] token mask as batch["completion_mask"], or [B, T-1] already shifted) only the
    positions predicting a completion token are computed (see the module docstring); the others are 0."""
    if completion_mask is None:
        return logps_from_logits(shifted_logits(model, input_ids, attention_mask, temperature), input_ids)
    mask = _shifted_mask(completion_mask, input_ids)
    pieces = _head_pieces(model)
    out = None
    if pieces is not None:
        rows, cols = mask.nonzero(as_tuple=True)
        plan = (rows, cols), input_ids[:, 1:][rows, cols], (rows, cols), tuple(mask.shape)
        out = _completion_logps(model, pieces, {"input_ids": input_ids, "attention_mask": attention_mask}, plan,
                                temperature)
    if torch.is_tensor(out):
        return out
    lp = logps_from_logits(shifted_logits(model, input_ids, attention_mask, temperature), input_ids)
    return torch.where(mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))


def sequence_logps(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] and completion lengths [N] of a padded batch (completion positions only)."""
    mask = batch["completion_mask"][:, 1:]
    lp = token_logps(model, batch["input_ids"], batch["attention_mask"], temperature, completion_mask=mask)
    return lp.sum(-1), mask.float().sum(-1)


def _packing(model, input_ids, attention_mask, completion_mask):
    from posttrain.models.shared_prompt import CUDA_ALIGN, attention_kernel, pack
    return pack(input_ids, attention_mask, completion_mask, kernel=attention_kernel(model) or "sdpa",
                align=CUDA_ALIGN if input_ids.device.type == "cuda" else 1)


def _packed_inputs(packing) -> dict:
    return {"input_ids": packing.input_ids, "attention_mask": packing.attention_mask,
            "position_ids": packing.position_ids}


def _unpacked(packing, values: torch.Tensor) -> torch.Tensor:
    """Per-position ``values`` ([M] or [M, H], at the plan's places) back in the unpacked [N, T-1(, H)] layout."""
    out = torch.zeros((*packing.shape, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_put(packing.dest, values)


def shared_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                       temperature: float = 1.0, *, shared_prompt: bool) -> torch.Tensor:
    """:func:`token_logps` at the completion positions of a right-padded batch (``completion_mask`` [N, T], as
    batch["completion_mask"]), [N, T-1]. With ``shared_prompt`` the rows that share a prompt (a pair's chosen and
    rejected, an online group's samples) run as one row behind one copy of it (posttrain.models.shared_prompt): the
    same values up to rounding, far fewer tokens where prompts are long."""
    packing = _packing(model, input_ids, attention_mask, completion_mask) if shared_prompt else None
    if packing is None:
        return token_logps(model, input_ids, attention_mask, temperature, completion_mask=completion_mask[:, 1:])
    plan = packing.source, packing.targets, packing.dest, packing.shape
    pieces = _head_pieces(model)
    out = None if pieces is None else _completion_logps(model, pieces, _packed_inputs(packing), plan, temperature)
    if torch.is_tensor(out):
        return out
    logits = model(**_packed_inputs(packing)).logits  # the plain path: full logits of the packed rows, at the plan
    return _unpacked(packing, _picked_logps(logits[packing.source], packing.targets, temperature))


def logps_and_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float = 1.0, *, shared_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [N, T-1] and the last hidden states [N, T-1, H] (float32) of one full-logits forward, for PPO's
    value head. Unpacked: every position. With ``shared_prompt`` (packed as :func:`shared_token_logps`, so the old
    log-probs match the updates' layout): the completion positions, 0 elsewhere (the value head and the loss read
    only those)."""
    packing = _packing(model, input_ids, attention_mask, completion_mask) if shared_prompt else None
    if packing is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        lp = _picked_logps(out.logits[:, :-1], input_ids[:, 1:], temperature)
        return lp, out.hidden_states[-1][:, :-1].float()
    out = model(**_packed_inputs(packing), output_hidden_states=True)
    lp = _picked_logps(out.logits[packing.source], packing.targets, temperature)
    return _unpacked(packing, lp), _unpacked(packing, out.hidden_states[-1][packing.source].float())
