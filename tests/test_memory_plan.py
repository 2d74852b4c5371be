"""Gradient checkpointing when memory requires it, and liger-kernel when installed (posttrain/models/memory_plan.py,
posttrain/models/kernels.py; issue 14, "Speed, per run").

The decisions are checked on the published Qwen2.5-Instruct shapes (tests/rehearsal_assets.py) with hand-computed
state sizes; the activation formula against the tensors torch actually saves for backward; checkpointing against
the plain path (same losses and gradients, LoRA too) on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from posttrain.models import memory_plan as mp
from posttrain.models.kernels import apply_liger, liger_import_error, refusal
from rehearsal_assets import QWEN25 as ARCHITECTURES

GIB = 1024 ** 3
H100, CARD24 = 80 * GIB, 24 * GIB


def shape(scale: str) -> mp.Shape:
    a = ARCHITECTURES[scale]
    return mp.Shape(a["hidden_size"], a["intermediate_size"], a["layers"], a["num_attention_heads"],
                    a["num_key_value_heads"], a["vocab_size"], a["tie_word_embeddings"])


@pytest.mark.parametrize("scale,published", [("0.5b", 0.49), ("1.5b", 1.54), ("3b", 3.09), ("7b", 7.62)])
def test_parameter_counts_match_the_published_sizes(scale, published):
    assert round(shape(scale).params / 1e9, 2) == published  # the model cards' "Number of Parameters", in billions


def test_lora_adapter_count_by_hand():
    # Qwen2.5-7B, r 16 on q,k,v,o,gate,up,down: 16 x [(3584+3584) + 2(3584+512) + (3584+3584) + 2(3584+18944)
    # + (18944+3584)] per layer x 28 layers
    per_layer = 16 * ((3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584))
    assert shape("7b").lora_params(16) == 28 * per_layer == 40_370_176


def test_states_by_hand_7b_zero3_over_8_ranks():
    s = shape("7b")
    full = mp.estimate(s, mp.Setup("bf16-mixed", zero_stage=3, ranks=8, reference_copy=True, sequences=2,
                                   max_length=3072))
    p = s.params  # 7,615,616,512
    # DeepSpeed bf16: 2-byte module + 4-byte fp32 gradient partition + 12 bytes fp32 master/m/v, all / 8 ranks
    assert full.states == pytest.approx(p * (2 + 4 + 12) / 8 / GIB)
    assert full.reference == pytest.approx(p * 2 / GIB)  # a whole bf16 copy on every rank
    lora = mp.estimate(s, mp.Setup("bf16-mixed", lora=True, zero_stage=3, ranks=8, reference_copy=True,
                                   sequences=2, max_length=3072))
    t = s.lora_params(16)
    assert lora.states == pytest.approx(((p - t) * 2 + t * (2 + 4 + 12)) / 8 / GIB)
    assert lora.reference == 0  # LoRA's reference is the adapter switched off
    plain = mp.estimate(shape("0.5b"), mp.Setup("bf16-mixed", sequences=2, max_length=512))
    q = shape("0.5b").params  # float32 master weights + grads + m + v, plus autocast's bf16 copies
    assert plain.states == pytest.approx(q * (4 + 4 + 8 + 2) / GIB)
    z2off = mp.estimate(shape("3b"), mp.Setup("bf16-mixed", zero_stage=2, ranks=1, offload_optimizer=True))
    assert z2off.states == pytest.approx(shape("3b").params * (2 + 2) / GIB)  # weights and bf16 grads stay


def test_activation_terms_by_hand():
    # 7b, bf16 module, 2 sequences x 3072 tokens: per layer and token 24h + 8i + 4 heads + 2 x 3072 (mask) bytes
    s, tokens = shape("7b"), 2 * 3072
    e = mp.estimate(s, mp.Setup("bf16-mixed", zero_stage=3, ranks=8, sequences=2, max_length=3072,
                                completion_tokens=512))
    per_layer = (24 * 3584 + 8 * 18944 + 4 * 28 + 2 * 3072) * tokens
    outside = (2 + 4) * 3584 * tokens
    assert e.activations == pytest.approx((28 * per_layer + outside) / GIB)
    assert e.activations_checkpointed == pytest.approx((28 * 2 * 3584 * tokens + per_layer + outside) / GIB)
    assert e.head == pytest.approx((2 * 512 * (4 * 152064 + 2 * 3584) + 256 * 152064 * 10) / GIB)


def _dpo(**kw):
    return mp.Setup("bf16-mixed", sequences=2, completion_tokens=512, **kw)


#: (scale, setup, device bytes, checkpointing on, fits with it). Full fine-tuning keeps a reference copy (DPO).
CASES = [
    # the motivating case: 7b full FT, ZeRO-3 over 8 H100s, micro-batch 1 pair x 3072 tokens
    ("7b", dict(zero_stage=3, ranks=8, reference_copy=True, max_length=3072), H100, True, True),
    ("7b", dict(zero_stage=3, ranks=8, reference_copy=True, max_length=1024), H100, False, True),
    ("7b", dict(lora=True, zero_stage=3, ranks=8, max_length=3072), H100, False, True),
    ("7b", dict(lora=True, zero_stage=3, ranks=8, max_length=3072), CARD24, True, True),
    ("0.5b", dict(reference_copy=True, max_length=512), H100, False, True),
    ("0.5b", dict(reference_copy=True, max_length=512), CARD24, False, True),
    ("1.5b", dict(reference_copy=True, max_length=3072), H100, False, True),
    ("1.5b", dict(reference_copy=True, max_length=3072), CARD24, True, False),  # states alone exceed 24 GiB
    ("1.5b", dict(lora=True, max_length=3072), CARD24, True, True),
    ("3b", dict(zero_stage=3, ranks=8, reference_copy=True, max_length=3072), CARD24, True, True),
]


@pytest.mark.parametrize("scale,kw,device,on,fits", CASES)
def test_auto_decides_from_the_estimate_and_the_device(scale, kw, device, on, fits):
    est = mp.estimate(shape(scale), _dpo(**kw))
    d = mp.decide("auto", est, device)
    assert d.budget_gib == pytest.approx(device / GIB * 0.9 - 2.0, abs=0.01)
    assert d.enabled is on, d.reason
    assert (d.checkpointed_gib <= d.budget_gib) is fits
    assert ("exceeds" in d.reason) is on and ("still exceeds" in d.reason) is (not fits)


def test_cpu_and_explicit_settings():
    est = mp.estimate(shape("7b"), _dpo(max_length=3072))
    cpu = mp.decide("auto", est, None)
    assert not cpu.enabled and cpu.budget_gib is None and "no GPU" in cpu.reason
    assert mp.decide(True, est, None).enabled and mp.decide("true", None, None).enabled
    assert not mp.decide(False, est, CARD24).enabled
    assert set(cpu.record()) == {"setting", "enabled", "estimate_gib", "checkpointed_gib", "budget_gib", "reason"}
    with pytest.raises(ValueError, match="must be auto, true or false"):
        mp.decide("yes", est, None)


# ---------------------------------------------------------------------------------------------------------------
# The activation formula against what torch saves


def _saved_bytes(model, ids, mask, autocast: bool) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        body(input_ids=ids, attention_mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("layout,lora,ckpt", [("fp32", False, False), ("fp32", False, True), ("bf16", False, False),
                                              ("bf16", False, True), ("fp32", True, False), ("bf16", True, False)])
def test_activation_estimate_matches_saved_tensors(layout, lora, ckpt):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, use_cache=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if layout == "bf16" else torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    model.train()
    if ckpt:
        mp.apply(model, mp.decide(True, None, None))
    ids = torch.randint(0, 300, (2, 96))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # padding: the mask is materialised, as in real batches
    measured = _saved_bytes(model, ids, mask, autocast=layout == "bf16")
    setup = mp.Setup("bf16-pure" if layout == "bf16" else "fp32", lora=lora, sequences=2, max_length=96)
    est = mp.estimate(mp.Shape.from_config(cfg), setup)
    predicted = (est.activations_checkpointed if ckpt else est.activations) * GIB
    if ckpt:  # checkpointed, one layer's recompute happens in the backward, not in this forward
        lay = mp.LAYOUTS[setup.layout()]
        predicted -= (lay["c_h"] * 256 + lay["c_i"] * 704 + 4 * 4 + lay["compute"] * 96) * 2 * 96
    # within 2% under (the ops the formula rounds) and 7% over (LoRA's small rank-r tensors, rounded up): safe side
    assert 0.93 < measured / predicted < 1.02


# ---------------------------------------------------------------------------------------------------------------
# Checkpointing changes nothing but memory


def _tiny(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                                        tie_word_embeddings=True))


def _dpo_loss_and_grads(model, reference, batch):
    from posttrain.losses import pairwise
    from posttrain.models.logps import sequence_logps

    model.train()
    model.zero_grad(set_to_none=True)
    policy, _ = sequence_logps(model, batch)
    with torch.no_grad():
        ref, _ = sequence_logps(reference, batch)
    n = batch["input_ids"].shape[0] // 2
    loss = pairwise("dpo", policy[:n], policy[n:], ref[:n], ref[n:], beta=0.1).mean()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True])
def test_checkpointing_gives_the_same_loss_and_gradients(lora):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    ids = torch.randint(1, 50, (4, 20))
    attention = torch.ones_like(ids)
    attention[1, 15:] = 0
    completion = torch.zeros_like(ids)
    completion[:, 8:] = 1
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion * attention}
    base = _tiny()
    reference = copy.deepcopy(base).eval()
    model = base
    if lora:
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                task_type="CAUSAL_LM", init_lora_weights=False))
    plain_loss, plain_grads = _dpo_loss_and_grads(model, reference, batch)
    with mp.applied(model, mp.decide(True, None, None)):
        layers = mp.hf_model(model).model.layers
        assert all(layer.gradient_checkpointing for layer in layers) and not mp.hf_model(model).config.use_cache
        ckpt_loss, ckpt_grads = _dpo_loss_and_grads(model, reference, batch)
    assert not any(layer.gradient_checkpointing for layer in layers) and mp.hf_model(model).config.use_cache
    assert not getattr(mp.hf_model(model), "_require_grads_hooks", None)  # the model is as it was
    assert plain_grads and plain_grads.keys() == ckpt_grads.keys()
    assert torch.allclose(plain_loss, ckpt_loss, atol=1e-6, rtol=0)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("algo", ["dpo", "grpo"])
def test_the_training_loop_runs_the_same_with_checkpointing(algo, tmp_path):
    from omegaconf import OmegaConf

    from conftest import random_qwen2
    from posttrain.algorithms import get
    from posttrain.data.tokenizer import build_char_tokenizer
    from posttrain.models.loading import Reference
    from posttrain.train import train

    tok = build_char_tokenizer(tmp_path / "tok")
    examples = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}",
                 "rejected": f" {2 * i + 1}\n#### {2 * i + 1}", "answer": str(2 * i)} for i in range(8)]
    trainer = OmegaConf.create(dict(lr=1e-3, epochs=1, micro_batch_size=2, grad_accum=2, max_steps=2,
                                    warmup_ratio=0.0, schedule="constant", betas=[0.9, 0.95], eps=1e-8,
                                    weight_decay=0.01, max_grad_norm=1.0, checkpoint_every=0, log_every=1))
    spec = get(algo)
    hparams = {"num_samples": 2, "max_new_tokens": 6} if algo == "grpo" else {}
    runs = []
    for on in (False, True):
        model = random_qwen2(len(tok), 0)
        reference = Reference(model if spec.needs_reference(hparams) else None)
        with mp.applied(model, mp.decide(on, None, None)):
            state = train(model, reference, tok, spec, hparams, examples, trainer, max_length=48, seed=0,
                          progress=False)
        runs.append((state.loss_curve, [p.detach().clone() for p in model.parameters()]))
    (curve_off, weights_off), (curve_on, weights_on) = runs
    assert len(curve_off) == 2 and [s for s, _ in curve_on] == [s for s, _ in curve_off]
    assert all(abs(a[1] - b[1]) <= 1e-6 for a, b in zip(curve_off, curve_on)), (curve_off, curve_on)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(weights_off, weights_on))


def test_rollouts_keep_the_kv_cache_while_checkpointing_is_on(tmp_path):
    from conftest import random_qwen2
    from posttrain.data.tokenizer import build_char_tokenizer
    from posttrain.rollout.sampler import SamplingConfig, sample

    tok = build_char_tokenizer(tmp_path / "tok")
    model = random_qwen2(len(tok), 0)
    lengths: list[int] = []
    model.model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                          with_kwargs=True)
    cfg = SamplingConfig(num_samples=2, temperature=1.0, max_new_tokens=6)
    with mp.applied(model, mp.decide(True, None, None)):
        model.train()
        got = sample(model, tok, ["Question: 1+1?", "Question: 2+2?"], cfg, seed=3)
        assert model.training  # the sampler puts the training mode back
    assert len(lengths) > 1 and lengths[0] > 1 and set(lengths[1:]) == {1}  # one new token a step: the KV cache
    assert [r.completion_ids for r in sample(model, tok, ["Question: 1+1?", "Question: 2+2?"], cfg, seed=3)] == \
        [r.completion_ids for r in got]  # and the same samples as without checkpointing


# ---------------------------------------------------------------------------------------------------------------
# The run's call site and config


def _composed(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_packed_rows_count_a_mask_twice_as_wide():
    # trainer.shared_prompt: a packed row spans up to twice max_length, so its mask term is 2 x 2 x 3072 per token
    s, tokens = shape("7b"), 2 * 3072
    kw = dict(zero_stage=3, ranks=8, sequences=2, max_length=3072, completion_tokens=512)
    rows = mp.estimate(s, mp.Setup("bf16-mixed", **kw))
    packed = mp.estimate(s, mp.Setup("bf16-mixed", shared_prompt=True, **kw))
    assert (packed.activations - rows.activations) * GIB == pytest.approx(28 * 2 * 3072 * tokens)


def test_plan_run_on_cpu_reads_the_config():
    from posttrain.algorithms import registry

    cfg = _composed(["algo=dpo"])
    d = mp.plan_run(_tiny(), cfg, registry.get("dpo"), {}, reference_copy=True)
    assert d.setting == "auto" and not d.enabled and d.budget_gib is None and d.estimate_gib > 0
    assert d.checkpointed_gib < d.estimate_gib
    forced = mp.plan_run(_tiny(), _composed(["trainer.gradient_checkpointing=true"]), registry.get("dpo"), {},
                         reference_copy=True)
    assert forced.enabled and forced.reason == "trainer.gradient_checkpointing=true"


def test_sequences_per_example():
    from posttrain.algorithms import registry

    assert mp.sequences_per_example(registry.get("dpo"), {}) == 2
    assert mp.sequences_per_example(registry.get("sft"), {}) == 1
    assert mp.sequences_per_example(registry.get("grpo"), {"num_samples": 6}) == 6


def test_settings_are_validated_and_stay_out_of_the_hash():
    from posttrain import cell
    from posttrain.config_schema import ConfigError, check_run_config

    default = cell.config_hash(_composed([]))
    for key in ("gradient_checkpointing", "liger"):
        for value in ("true", "false", "auto"):
            cfg = _composed([f"trainer.{key}={value}"])
            check_run_config(cfg, algo_too=False)
            assert cell.config_hash(cfg) == default
        with pytest.raises(ConfigError, match=f"trainer.{key}=maybe: must be auto, true or false"):
            check_run_config(_composed([f"trainer.{key}=maybe"]), algo_too=False)


# ---------------------------------------------------------------------------------------------------------------
# liger-kernel


def test_liger_choice_and_refusals_on_cpu():
    assert refusal("auto", cuda=False) is None and refusal(False, cuda=False) is None
    line = refusal(True, cuda=False)
    assert "needs a CUDA GPU" in line and "trainer.liger=auto or false" in line and "\n" not in line
    if liger_import_error() is not None:  # not importable here (no Triton on a CPU machine)
        line = refusal("true", cuda=True)
        assert "does not import" in line and "pip install liger-kernel" in line and "\n" not in line
    model = _tiny()
    assert apply_liger(model, "auto") == {"setting": "auto", "applied": False, "kernels": [],
                                          "reason": "auto: off (the model is not on CUDA)"}
    assert apply_liger(model, False)["reason"] == "trainer.liger=false"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        apply_liger(model, True)
    assert type(model.model.layers[0].mlp).forward is model.model.layers[0].mlp.forward.__func__  # untouched


@pytest.mark.gpu
def test_liger_on_cuda_keeps_the_log_probs():
    if liger_import_error() is not None:
        pytest.skip(f"liger-kernel does not import: {liger_import_error()}")
    from posttrain.models.logps import token_logps

    model = _tiny().cuda()
    ids = torch.randint(1, 50, (2, 16), device="cuda")
    mask = torch.ones_like(ids)
    before = token_logps(model, ids, mask, completion_mask=mask)
    record = apply_liger(model, "auto")
    assert record["applied"] and record["kernels"] == ["rope", "rms_norm", "swiglu"]
    assert torch.allclose(token_logps(model, ids, mask, completion_mask=mask), before, atol=1e-4)


@pytest.mark.gpu
def test_plan_run_on_a_gpu_budgets_from_its_memory():
    from posttrain.algorithms import registry

    total = torch.cuda.get_device_properties(0).total_memory
    d = mp.plan_run(_tiny().cuda(), _composed(["algo=dpo"]), registry.get("dpo"), {}, reference_copy=True)
    assert d.budget_gib == pytest.approx(total / GIB * 0.9 - 2.0, abs=0.01)
    assert not d.enabled and "fits" in d.reason  # a 2-layer toy fits any GPU
