"""The shared prompt where layouts meet in one loss (posttrain.models.shared_prompt): policy and in-loop reference on
the same layout, so DPO's first-step margin (policy == reference) stays exactly 0 in bf16 -- plain DPO, WPO (two
rows on both sides), online DPO (reference log-probs from the rollout phase) -- and models where a packed row would
not give the same values (sliding-window attention) are not packed."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.algorithms import get
from posttrain.algorithms.objectives import StepContext, pairwise
from posttrain.data.collate import pad_rows
from posttrain.models import shared_prompt
from posttrain.models.loading import Reference


def _model(kernel="sdpa", vocab=97, hidden=64, layers=2, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=kernel, **extra)
    return Qwen2ForCausalLM(cfg).eval()


def _pairs(n=4, vocab=97, seed=1, max_length=40):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(3 + 4 * i)] for i in range(n)]
    chosen = [[rng.randrange(1, vocab) for _ in range(2 + 3 * i)] for i in range(n)]
    rejected = [[rng.randrange(1, vocab) for _ in range(9 - 2 * i)] for i in range(n)]
    rows = [(p, c) for p, c in zip(prompts, chosen)] + [(p, r) for p, r in zip(prompts, rejected)]
    return {**pad_rows(rows, 0, max_length), "pairs": n}


def _step0(model, batch, hparams, shared):
    """DPO's stats at step 0 with an in-loop reference equal to the policy (a frozen copy of it)."""
    ctx = StepContext(examples=batch["pairs"], tokens=1, shared_prompt=shared)
    with torch.no_grad():
        loss, stats = pairwise(model, Reference(model), batch, get("dpo"), hparams, ctx)
    return stats


def test_in_loop_reference_on_the_same_path_is_exact():
    """Plain DPO: policy and reference both packed, so the step-0 margin stays exactly 0 (bf16 weights)."""
    model = _model().to(torch.bfloat16)
    for shared in (False, True):
        stats = _step0(model, _pairs(), {}, shared)
        assert stats["rewards/chosen"] == stats["rewards/rejected"] == stats["rewards/margins"] == 0.0


def test_wpo_step0_margin_is_exact_with_shared_prompt():
    model = _model().to(torch.bfloat16)
    assert _step0(model, _pairs(), {"wpo": True}, shared=False)["rewards/margins"] == 0.0  # two rows both sides
    assert _step0(model, _pairs(), {"wpo": True}, shared=True)["rewards/margins"] == 0.0


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_sliding_window_model_is_not_packed(kernel):
    """transformers hands a custom 4-D mask to sliding-window layers as it is: packed rows would attend past the
    window (measured: log-probs off by 0.33 at window 6), so auto leaves such a model unpacked and true is refused."""
    model = _model(kernel, use_sliding_window=True, sliding_window=6, max_window_layers=0)
    assert "sliding_attention" in model.config.layer_types
    assert shared_prompt.decide("auto", model) is False
    with pytest.raises(ValueError, match="sliding-window attention layers"):
        shared_prompt.decide("true", model)
    assert shared_prompt.decide("auto", _model(kernel)) is True  # the same model without the window packs


def test_online_dpo_first_step_margin_is_exact(tmp_path):
    """online_dpo through the real loop, bf16 weights: the rollout phase's reference log-probs (ref_token_logps) and
    the objective's policy log-probs must come from the same layout, so the first step's margin is exactly 0."""
    from posttrain.data.tokenizer import build_char_tokenizer
    from posttrain.rewards import REWARD_FUNCTIONS
    from posttrain.train import train

    tok = build_char_tokenizer(tmp_path / "tok")
    REWARD_FUNCTIONS.setdefault("review_parity",
                                lambda completions, answers: torch.tensor(
                                    [float(bool(c) and ord(c[0]) % 2 == 0) for c in completions]))
    prompts = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "answer": str(2 * i)} for i in range(4)]
    hp = {"rewards": {"review_parity": 1.0}, "accuracy_reward": "review_parity", "max_new_tokens": 6,
          "num_samples": 4}
    trainer = OmegaConf.create(dict(lr=1e-3, epochs=1, micro_batch_size=4, grad_accum=1, max_steps=1,
                                    warmup_ratio=0.0, schedule="constant", betas=[0.9, 0.95], eps=1e-8,
                                    weight_decay=0.0, max_grad_norm=1.0, checkpoint_every=0, log_every=1,
                                    shared_prompt="auto"))
    margins = {}
    for seed in range(3):  # a random model's rollout may give no pair (ties): try a few seeds
        model = _model(vocab=len(tok), seed=seed).to(torch.bfloat16)
        model.train()
        logged = []
        state = train(model, Reference(model), tok, get("online_dpo"), hp, prompts, trainer, max_length=64,
                      seed=seed, progress=False, log=lambda row, step: logged.append(row))
        assert state.shared_prompt is True
        if logged and "train/rewards/margins" in logged[0]:
            margins[seed] = (logged[0]["train/rewards/margins"], logged[0]["train/rewards/chosen"])
    assert margins, "no rollout gave a pair"
    assert all(m == 0.0 and c == 0.0 for m, c in margins.values()), margins
