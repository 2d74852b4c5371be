"""Precision that trains: bf16 checkpoints (every Qwen2.5 release) trained at the study's lr 1e-6 move as float32
AdamW moves them (``bf16-mixed``: float32 master weights), and a LoRA run is scored by lm-eval exactly as it trained.

The defect these guard against (measured on main before the fix): AdamW on bf16 weights at lr 1e-6 changed 1.96% of
a q_proj's entries in 10 steps, against 100% in float32; a LoRA adapter merged into bf16 weights kept 32% of its
intended weight change.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from posttrain.algorithms import get
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.models.loading import Reference, load_policy
from posttrain.models.precision import Precision, PrecisionError
from posttrain.train import train

SFT = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "completion": f" {i}+{i}={2 * i}\n#### {2 * i}"}
       for i in range(8)]


def _trainer(precision: str, **kw):
    base = dict(lr=1e-6, epochs=1, micro_batch_size=4, grad_accum=2, max_steps=None, warmup_ratio=0.0,
                schedule="constant", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01, max_grad_norm=1.0,
                checkpoint_every=0, log_every=1, precision=precision)
    return OmegaConf.create({**base, **kw})


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A random Qwen2 saved in bf16 (as the real checkpoints are) with a character tokenizer beside it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("bf16")
    tok = build_char_tokenizer(root / "tok")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                                         max_position_embeddings=256, tie_word_embeddings=True))
    model.to(torch.bfloat16).save_pretrained(root / "model")
    return OmegaConf.create({"name": "bf16-test", "model": str(root / "model"), "tokenizer": str(root / "tok")})


def _load(scale, precision: str, lora: bool = False):
    dtype = Precision.from_config(precision).load_dtype(lora=lora)
    return load_policy(scale, OmegaConf.create({"enabled": False}), dtype=dtype)


def _steps(scale, precision: str, steps: int = 1):
    """(weights before, weights after) of q_proj in layer 0 after ``steps`` SFT steps through THE loop, in float32."""
    loaded = _load(scale, precision)
    q = loaded.model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().float().clone()
    train(loaded.model, Reference(None), loaded.tokenizer, get("sft"), {}, SFT * steps, _trainer(precision),
          max_length=64, seed=0, progress=False)
    return before, q.detach().float().clone(), loaded.model


def test_bf16_mixed_holds_float32_master_weights_and_moves_every_entry_as_fp32_adamw(bf16_checkpoint):
    before, mixed, model = _steps(bf16_checkpoint, "bf16-mixed")
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights in float32"
    before32, fp32, _ = _steps(bf16_checkpoint, "fp32")
    assert torch.equal(before, before32), "a bf16 checkpoint upcasts exactly"
    d_mixed, d_fp32 = mixed - before, fp32 - before
    assert (d_mixed != 0).float().mean() > 0.99, "every entry of q_proj moves at lr 1e-6"
    # Adam's first step is ~lr * sign(g): bf16 compute changes the gradient's sign only where it is ~0.
    cos = torch.nn.functional.cosine_similarity(d_mixed.flatten(), d_fp32.flatten(), dim=0)
    assert cos > 0.97
    assert d_mixed.abs().mean() == pytest.approx(d_fp32.abs().mean().item(), rel=0.05)
    assert d_fp32.abs().mean() == pytest.approx(1e-6, rel=0.1)


def test_bf16_pure_loses_most_updates_at_the_study_lr(bf16_checkpoint, capsys):
    before, pure, model = _steps(bf16_checkpoint, "bf16-pure")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    changed = ((pure - before) != 0).float().mean().item()
    assert changed < 0.2, f"{changed:.1%} of the entries moved: the cost PURE_BF16_COST states"


def test_precision_is_checked_with_one_line():
    with pytest.raises(PrecisionError, match="not one of fp32, bf16-mixed, bf16-pure"):
        Precision.from_config("bf16")
    with pytest.raises(PrecisionError, match="DeepSpeed's bf16 always keeps float32 master weights"):
        Precision.from_config("bf16-pure", deepspeed=True)
    assert Precision.from_config("bf16-mixed", deepspeed=True).deepspeed_bf16, "DeepSpeed mixes, on CPU as on GPU"
    assert not Precision.from_config("bf16-mixed").deepspeed_bf16
    assert Precision.from_config("bf16-mixed", deepspeed=True).load_dtype() == torch.bfloat16
    assert Precision.from_config("bf16-mixed").load_dtype() == torch.float32
    assert Precision.from_config("bf16-mixed").load_dtype(lora=True) == torch.bfloat16


def test_lora_is_scored_by_lm_eval_exactly_as_it_trained(bf16_checkpoint):
    """lm-eval's own forward (HFLM._model_call, the loglikelihood path) on what run.py hands it equals the trained
    adapter's forward; merging the same adapter into the bf16 base (what run.py did before) does not."""
    from lm_eval.models.huggingface import HFLM

    from posttrain.models.loading import add_lora

    loaded = _load(bf16_checkpoint, "bf16-mixed", lora=True)
    lora_cfg = OmegaConf.create({"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0,
                                 "target_modules": "all-linear"})
    policy = add_lora(loaded.model, lora_cfg)
    assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32}, "adapters in fp32"
    assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {torch.bfloat16}, "frozen bf16 base"
    train(policy, Reference(policy, lora=True), loaded.tokenizer, get("sft"), {}, SFT * 4,
          _trainer("bf16-mixed", lr=1e-4), max_length=64, seed=0, progress=False)
    ids = loaded.tokenizer(SFT[0]["prompt"] + SFT[0]["completion"], return_tensors="pt")["input_ids"]
    precision = Precision.from_config("bf16-mixed")
    policy.eval()
    with torch.no_grad(), precision.autocast("cpu"):
        trained = policy(input_ids=ids).logits.float()
    lm = HFLM(pretrained=policy, tokenizer=loaded.tokenizer, batch_size=1, device="cpu",
              mixed_precision_dtype=precision.autocast_dtype)
    scored = lm._model_call(ids).float()
    torch.testing.assert_close(scored, trained, rtol=0, atol=0)
    with torch.no_grad(), precision.autocast("cpu"):
        base = policy.get_base_model()
        with policy.disable_adapter():
            untrained = policy(input_ids=ids).logits.float()
        merged = copy.deepcopy(policy).merge_and_unload()(input_ids=ids).logits.float()
    assert (trained - untrained).abs().max() > 0, "the adapter changed the model"
    lost = ((merged - trained).abs().mean() / (trained - untrained).abs().mean()).item()
    assert lost > 0.1, f"merging into bf16 kept the adapter's effect (lost only {lost:.0%}); the test's premise fails"
    del base
