"""The completion-only log-prob path (posttrain.models.logps, issue 14) against the plain full-logits path: same
values and gradients on real Qwen2 models (tied and untied head, bf16, autocast, peft LoRA with adapters on and off,
temperature), and a peak allocation far below the [B, T, V] logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.models import logps


def _model(tied: bool = True, vocab: int = 97, hidden: int = 32, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=256)
    return Qwen2ForCausalLM(cfg).eval()


def _batch(vocab: int = 97, b: int = 4, t: int = 23, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    comp = torch.zeros(b, t, dtype=torch.long)
    for row in range(b):  # prompts of different lengths, right padding of different lengths
        prompt, length = 3 + 2 * row, t - 3 * row
        attn[row, length:] = 0
        comp[row, prompt:length] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


PAIR_COMPLETIONS, PAIR_SPAN = 3 * (4 + 6), 10 + 4 + 6  # completion positions; longest prompt + chosen + rejected


def _pair_batch(vocab: int = 97, seed: int = 1) -> dict:
    """3 pairs (chosen rows, then rejected rows): prompts of 6, 8, 10 tokens, completions of 4 and 6 tokens."""
    from posttrain.data.collate import pad_rows

    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [draw(6 + 2 * i) for i in range(3)]
    rows = [(p, draw(4)) for p in prompts] + [(p, draw(6)) for p in prompts]
    return {**pad_rows(rows, 0, 64), "pairs": 3}


def _shared(model, batch, shared_prompt):
    return logps.shared_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                    shared_prompt=shared_prompt)


def _plain(model, batch, temperature=1.0):
    mask = batch["completion_mask"][:, 1:].bool()
    lp = logps.token_logps(model, batch["input_ids"], batch["attention_mask"], temperature)
    return torch.where(mask, lp, torch.zeros(()))


def _fast(model, batch, temperature=1.0):
    return logps.token_logps(model, batch["input_ids"], batch["attention_mask"], temperature,
                             completion_mask=batch["completion_mask"])


def _used_head_rows(model, fn) -> int:
    """Rows the LM head saw during ``fn()``: the fast path sends only completion positions."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return sum(seen)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_path_equals_plain_path_fp32(tied, temperature):
    model, batch = _model(tied), _batch()
    plain, fast = _plain(model, batch, temperature), _fast(model, batch, temperature)
    assert fast.shape == plain.shape == (4, 22) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    n_completion = int(batch["completion_mask"][:, 1:].sum())
    assert _used_head_rows(model, lambda: _fast(model, batch, temperature)) == n_completion
    assert _used_head_rows(model, lambda: _plain(model, batch, temperature)) == 4 * 23


def test_chunks_and_shifted_mask_and_sequence_logps(monkeypatch):
    model, batch = _model(), _batch()
    plain = _plain(model, batch)
    monkeypatch.setattr(logps, "CHUNK", 5)  # several chunks, the last one partial
    shifted = logps.token_logps(model, batch["input_ids"], batch["attention_mask"],
                                completion_mask=batch["completion_mask"][:, 1:])
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=0)
    seq, lengths = logps.sequence_logps(model, batch)
    torch.testing.assert_close(seq, plain.sum(-1), atol=1e-5, rtol=0)
    assert lengths.tolist() == batch["completion_mask"][:, 1:].sum(-1).float().tolist()


def test_switch_off_gives_the_plain_path(monkeypatch):
    model, batch = _model(), _batch()
    monkeypatch.setattr(logps, "COMPLETION_ONLY", False)
    assert _used_head_rows(model, lambda: _fast(model, batch)) == 4 * 23
    torch.testing.assert_close(_fast(model, batch), _plain(model, batch), atol=0, rtol=0)


def test_bad_mask_shape_is_one_line():
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match="completion_mask has shape"):
        logps.token_logps(model, batch["input_ids"], batch["attention_mask"],
                          completion_mask=batch["completion_mask"][:, 2:])


def test_model_without_a_head_takes_the_plain_path():
    model, batch = _model(), _batch()
    body = model.model

    class Wrapped(torch.nn.Module):  # a forward that gives logits but exposes no head nor body
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    assert body is not None
    torch.testing.assert_close(_fast(Wrapped(), batch), _plain(model, batch), atol=0, rtol=0)


def test_a_model_that_reshapes_its_logits_after_the_head_takes_the_plain_path():
    """Gemma-2's soft-capping and Cohere's logit scale act after the head, inside the CausalLM's forward: calling
    the head alone would skip them, so such a model keeps the full path (same values as the plain call)."""
    model, batch = _model(), _batch()
    model.config.final_logit_softcapping = 30.0
    assert logps._pieces(model) is None
    torch.testing.assert_close(_fast(model, batch), _plain(model, batch))


def test_a_batch_without_completion_tokens_still_backpropagates():
    """DAPO's overlong filter can mask every completion of a micro-batch: the fast path still calls the head (once,
    on no row), so the zero loss stays in the graph and backward runs, giving zero gradients as the plain path."""
    model, batch = _model(), _batch()
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    try:
        lp = _fast(model, batch)
    finally:
        handle.remove()
    # the model's own head call sees no position (logits_to_keep), ours sees no row: no logits computed at all
    assert torch.count_nonzero(lp) == 0 and lp.shape == (4, 22) and lp.grad_fn is not None
    assert len(calls) == 2 and all(shape.numel() == 0 for shape in calls)
    lp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("tied,recompute", [(True, False), (False, False), (True, True), (False, True)])
def test_gradients_equal(tied, recompute, monkeypatch):
    monkeypatch.setattr(logps, "CHUNK", 16)  # several chunks
    monkeypatch.setattr(logps, "RECOMPUTE_HEAD", recompute)  # the head's logits recomputed in the backward pass
    batch = _batch()
    plain_model = _model(tied)
    fast_model = copy.deepcopy(plain_model)
    _plain(plain_model, batch).sum().backward()
    _fast(fast_model, batch).sum().backward()
    grads = dict(fast_model.named_parameters())
    for name, p in plain_model.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_and_bf16_model():
    batch = _batch()
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fast = _plain(model, batch), _fast(model, batch)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, atol=2e-2, rtol=0)  # bf16 matmuls on different row blocks
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    torch.testing.assert_close(_fast(bf16, batch), _plain(bf16, batch), atol=2e-2, rtol=0)


def test_peft_lora_adapters_on_and_disabled():
    peft = pytest.importorskip("peft")
    batch = _batch()
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    torch.testing.assert_close(_fast(model, batch), _plain(model, batch), atol=1e-5, rtol=0)
    assert _used_head_rows(model, lambda: _fast(model, batch)) == int(batch["completion_mask"][:, 1:].sum())
    with model.disable_adapter():  # the LoRA reference: the same network without its adapters
        base = _fast(model, batch)
        torch.testing.assert_close(base, _plain(model, batch), atol=1e-5, rtol=0)
    assert (base - _fast(model, batch)).abs().max() > 1e-4  # the adapters (not zero-initialised) do move it
    loss = _fast(model, batch).sum()
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def _peak_bytes(fn) -> int:
    """Peak bytes of CPU tensor memory held at once during ``fn()``, from torch's profiler (its allocation and free
    records in time order; tracemalloc does not see torch's CPU allocator)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:  # self memory of each op in time order: allocations positive, frees negative
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def test_fast_path_peak_memory_far_below_full_logits(monkeypatch):
    monkeypatch.setattr(logps, "CHUNK", 16)  # 16 positions through the head at a time
    vocab = 151_936  # Qwen's vocabulary; a small body
    model = _model(vocab=vocab, hidden=16, layers=1)
    batch = _batch(vocab=vocab, b=4, t=64)
    batch["completion_mask"][:, :48] = 0  # a typical long prompt: 16 completion positions a row at most
    full = 4 * 64 * vocab * 4  # one float32 [B, T, V]
    with torch.no_grad():
        plain = _peak_bytes(lambda: _plain(model, batch))
        fast = _peak_bytes(lambda: _fast(model, batch))
    assert plain >= full  # the plain path holds at least one [B, T, V] float32
    # measured: 19.5 MB (two [16, V] float32: the chunk's logits and logsumexp's buffer) against 155.6 MB
    assert fast * 6 < plain, (fast, plain)


def test_training_step_peak_memory(monkeypatch):
    """Forward + backward: the plain path keeps [B, T, V] logits (and their gradient) for the backward; the fast
    path keeps completion positions x V; with RECOMPUTE_HEAD one chunk's logits at a time."""
    monkeypatch.setattr(logps, "CHUNK", 16)
    model = _model(vocab=151_936, hidden=16, layers=1)
    batch = _batch(vocab=151_936, b=4, t=64)
    batch["completion_mask"][:, :48] = 0

    def step(fn):
        return lambda: fn(model, batch).sum().backward()

    plain, fast = _peak_bytes(step(_plain)), _peak_bytes(step(_fast))
    assert fast * 5 < plain, (fast, plain)  # measured: 39 MB against 309 MB
    batch["completion_mask"][:, 8:] = 1  # 14 chunks: kept for the backward, or recomputed one at a time
    kept = _peak_bytes(step(_fast))
    monkeypatch.setattr(logps, "RECOMPUTE_HEAD", True)
    recomputed = _peak_bytes(step(_fast))
    assert recomputed * 4 < kept, (recomputed, kept)  # measured: 19 MB against 142 MB


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed: the fast path through the engine module (its forward runs), in worker processes as
# tests/test_deepspeed.py (this file run as a script); under ZeRO-3 the plain path runs (models/logps.py).

DS_STAGES = (2, 3)


def _ds_worker(out) -> None:
    import json

    from omegaconf import OmegaConf

    from posttrain.models.distributed import setup_distributed
    from posttrain.models.engine import DeepSpeedEngine, gathered

    info = setup_distributed()

    # AdamW's first step is lr * g / (|g| + eps): with eps far above the gradients the update is about g itself
    # (lr = eps), so the weights after one step compare the all-reduced gradients of the two paths
    trainer = OmegaConf.create(dict(lr=100.0, micro_batch_size=4, grad_accum=1, warmup_ratio=0.0, schedule="constant",
                                    betas=[0.9, 0.95], eps=100.0, weight_decay=0.0, max_grad_norm=0.0,
                                    precision="fp32"))
    batch = _batch(seed=1 + info.rank)  # each rank its own rows
    pairs = _pair_batch(seed=1 + info.rank)
    modes = {"plain": (_plain, batch), "fast": (_fast, batch),  # chosen and rejected as two rows, then packed
             "two_rows": (lambda m, b: _shared(m, b, False), pairs),
             "shared": (lambda m, b: _shared(m, b, True), pairs)}
    results = {}
    for stage in DS_STAGES:
        runs = {}
        for mode, (fn, batch) in modes.items():
            engine = DeepSpeedEngine(_model(tied=stage == 3), trainer, 1, {"enabled": True, "stage": stage})
            engine.module.train()
            rows = _used_head_rows(engine.module, lambda: runs.__setitem__("lp", fn(engine.model, batch)))
            lp = runs.pop("lp")
            engine.backward(lp.sum())
            engine.step()
            with gathered(engine.module) as bare:
                weights = {n: p.detach().clone() for n, p in bare.named_parameters()}
            runs[mode] = (lp.detach(), weights, rows)
            engine.close()
        (lp_plain, w_plain, rows_plain), (lp_fast, w_fast, rows_fast) = runs["plain"], runs["fast"]
        (lp_two, w_two, _), (lp_shared, w_shared, rows_shared) = runs["two_rows"], runs["shared"]
        results[f"zero{stage}"] = {
            "logps": float((lp_fast - lp_plain).abs().max()), "head_rows": [rows_plain, rows_fast],
            "completion": int(modes["fast"][1]["completion_mask"][:, 1:].sum()),
            "weights": max(float((w_fast[n] - w_plain[n]).abs().max()) for n in w_plain),
            "moved": max(float((w_plain[n] - _model(tied=stage == 3).state_dict()[n]).abs().max())
                         for n in w_plain),
            # the shared-prompt packing through the engine (ZeRO-3: on the plain full-logits path)
            "shared_logps": float((lp_shared - lp_two).abs().max()), "shared_head_rows": rows_shared,
            "shared_weights": max(float((w_shared[n] - w_two[n]).abs().max()) for n in w_two)}
    (out / f"rank{info.rank}.json").write_text(json.dumps(results))
    torch.save({}, out / f"rank{info.rank}.pt")


@pytest.mark.slow
def test_fast_path_through_a_deepspeed_engine_equals_the_plain_path(tmp_path):
    from conftest import spawn_ranks

    for rank in spawn_ranks(__file__, tmp_path, world_size=2, timeout=600):
        for stage in DS_STAGES:
            got = rank[f"zero{stage}"]
            # ZeRO-2: the fast path ran; ZeRO-3: a partitioned head takes the plain path (gathers matched one for
            # one with ranks padding an uneven step with plain forwards, tests/test_kto_anchor.py)
            fast_rows = got["completion"] if stage == 2 else 4 * 23
            assert got["head_rows"] == [4 * 23, fast_rows], (stage, got)
            assert got["logps"] < 1e-5 and got["moved"] > 1e-3, (stage, got)
            assert got["weights"] < 1e-4, (stage, got)  # the gradients of both paths (see _ds_worker)
            # chosen and rejected behind one prompt copy: same values and gradients; the head saw each completion
            # position once (ZeRO-2) or every packed position (ZeRO-3's plain path: 3 pairs x their longest span)
            assert got["shared_logps"] < 1e-5 and got["shared_weights"] < 1e-4, (stage, got)
            assert got["shared_head_rows"] == (PAIR_COMPLETIONS if stage == 2 else 3 * PAIR_SPAN), (stage, got)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    _ds_worker(Path(sys.argv[1]))
