"""Rows that share a prompt behind one copy of it (posttrain.models.shared_prompt, issue 14): a pair's chosen and
rejected, an online group's samples. The packed layout by hand, the same log-probs and gradients as one row each (sdpa
and eager attention, fp32 and bf16, peft LoRA with adapters on and off, the plain full-logits path), groups of several
samples and their cut at the span limit, what is not packed, the setting, and the training loop's losses (DPO, GRPO)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.data.collate import pad_rows
from posttrain.models import logps, shared_prompt
from posttrain.models.logps import shared_token_logps


def _model(kernel: str = "sdpa", vocab: int = 97, hidden: int = 32, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=kernel)
    return Qwen2ForCausalLM(cfg).eval()


def _pairs(n: int = 4, vocab: int = 97, seed: int = 1, max_length: int = 40) -> dict:
    """A pair batch as collate builds it (chosen rows, then rejected rows), prompts and completions of different
    lengths; the last pair's chosen row is cut by ``max_length`` inside its completion."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(3 + 4 * i)] for i in range(n)]
    chosen = [[rng.randrange(1, vocab) for _ in range(2 + 3 * i)] for i in range(n)]
    rejected = [[rng.randrange(1, vocab) for _ in range(9 - 2 * i)] for i in range(n)]
    chosen[-1] += [rng.randrange(1, vocab) for _ in range(max_length)]
    rows = [(p, c) for p, c in zip(prompts, chosen)] + [(p, r) for p, r in zip(prompts, rejected)]
    return {**pad_rows(rows, 0, max_length), "pairs": n}


def pair_token_logps(model, batch, *, shared_prompt):
    return shared_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                              shared_prompt=shared_prompt)


def _pack(batch, **kw):
    return shared_prompt.pack(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], **kw)


def _both(model, batch):
    return (pair_token_logps(model, batch, shared_prompt=False), pair_token_logps(model, batch, shared_prompt=True))


def _forward_widths(model, fn) -> list:
    seen = []
    handle = model.get_decoder().register_forward_hook(lambda m, a, out: seen.append(tuple(out[0].shape[:2])))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_packed_layout_by_hand():
    # pair 0: prompt [1 2 3 4], chosen [5 6 7], rejected [20 21]; pair 1: prompt [8 9], chosen [10..14], rejected [30]
    batch = {**pad_rows([([1, 2, 3, 4], [5, 6, 7]), ([8, 9], [10, 11, 12, 13, 14]), ([1, 2, 3, 4], [20, 21]),
                         ([8, 9], [30])], 0, 64), "pairs": 2}
    packing = _pack(batch)
    assert packing.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 20, 21], [8, 9, 10, 11, 12, 13, 14, 30, 0]]
    assert packing.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5], [0, 1, 2, 3, 4, 5, 6, 2, 0]]
    mask = packing.attention_mask[:, 0].int().tolist()
    assert mask[0][7] == [1, 1, 1, 1, 0, 0, 0, 1, 0]  # rejected's first token: the prompt and itself, no chosen token
    assert mask[0][8] == [1, 1, 1, 1, 0, 0, 0, 1, 1]
    assert mask[0][6] == [1, 1, 1, 1, 1, 1, 1, 0, 0]  # chosen's last token: causal over prompt + chosen
    assert mask[1][7] == [1, 1, 0, 0, 0, 0, 0, 1, 0]
    assert mask[1][8] == [0, 0, 0, 0, 0, 0, 0, 0, 1]  # padding attends to itself only (no all-masked row: no NaN)
    # (pair, packed position) -> token -> (row, column) of the unpacked [4, 6] log-probs
    assert packing.source[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert packing.source[1].tolist() == [3, 4, 5, 3, 7, 1, 2, 3, 4, 5, 1]  # rejected's first from the prompt's last
    assert packing.targets.tolist() == [5, 6, 7, 20, 21, 10, 11, 12, 13, 14, 30]
    assert packing.dest[0].tolist() == [0, 0, 0, 2, 2, 1, 1, 1, 1, 1, 3]
    assert packing.dest[1].tolist() == [3, 4, 5, 3, 4, 1, 2, 3, 4, 5, 1]
    assert packing.shape == (4, 6)
    eager = _pack(batch, kernel="eager", align=16)
    assert eager.attention_mask.dtype == torch.float32 and eager.input_ids.shape == (2, 16)  # additive, aligned
    assert eager.attention_mask[0, 0, 7, 4] == torch.finfo(torch.float32).min and eager.attention_mask[0, 0, 7, 3] == 0


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_same_logps_and_gradients_as_two_rows_fp32(kernel):
    batch = _pairs()
    two_model, shared_model = _model(kernel), _model(kernel)
    two_model.train(), shared_model.train()
    two = pair_token_logps(two_model, batch, shared_prompt=False)
    shared = pair_token_logps(shared_model, batch, shared_prompt=True)
    assert shared.shape == two.shape == (8, 39)
    assert torch.equal(shared != 0, batch["completion_mask"][:, 1:].bool())  # every completion position, only those
    torch.testing.assert_close(shared, two, atol=1e-5, rtol=0)
    (two * torch.linspace(0.5, 1.5, 39)).sum().backward()
    (shared * torch.linspace(0.5, 1.5, 39)).sum().backward()
    grads = dict(shared_model.named_parameters())
    for name, p in two_model.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    widths = _forward_widths(shared_model, lambda: pair_token_logps(shared_model, batch, shared_prompt=True))
    spans = batch["attention_mask"][:4].sum(-1) + batch["completion_mask"][4:].sum(-1)  # prompt + chosen + rejected
    assert widths == [(4, int(spans.max()))]  # one row per pair
    assert 4 * int(spans.max()) < 8 * 40  # fewer cells than the two-row batch


def test_micro_batch_one_has_no_padding():
    batch = _pairs(n=1)
    model = _model()
    two, shared = _both(model, batch)
    torch.testing.assert_close(shared, two, atol=1e-5, rtol=0)
    widths = _forward_widths(model, lambda: pair_token_logps(model, batch, shared_prompt=True))
    assert widths == [(1, int(batch["attention_mask"].sum() - (batch["attention_mask"] - batch["completion_mask"])[1]
                               .sum()))]


def test_bf16_model_and_autocast_within_bf16_rounding():
    batch = _pairs()
    model = _model(hidden=64)
    exact = pair_token_logps(model, batch, shared_prompt=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        two, shared = _both(model, batch)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    pure_two, pure_shared = _both(bf16, batch)
    for got, rows in ((shared, two), (pure_shared, pure_two)):
        assert got.dtype == torch.float32
        # as close to the float32 values as the two-row forward is (bf16 matmuls on other row blocks)
        assert (got - exact).abs().max() <= 2 * (rows - exact).abs().max() + 1e-2
        torch.testing.assert_close(got, rows, atol=5e-2, rtol=0)


def test_peft_lora_adapters_on_and_disabled():
    peft = pytest.importorskip("peft")
    batch = _pairs()
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    assert shared_prompt.attention_kernel(model) == "sdpa"
    two, shared = _both(model, batch)
    torch.testing.assert_close(shared, two, atol=1e-5, rtol=0)
    with model.disable_adapter():  # the LoRA reference
        base_two, base_shared = _both(model, batch)
    torch.testing.assert_close(base_shared, base_two, atol=1e-5, rtol=0)
    assert (base_shared - shared).abs().max() > 1e-4


def test_plain_full_logits_path_packs_too(monkeypatch):
    monkeypatch.setattr(logps, "COMPLETION_ONLY", False)  # as a ZeRO-3 partitioned head takes it
    batch = _pairs()
    model = _model()
    two, shared = _both(model, batch)
    torch.testing.assert_close(shared, two, atol=1e-5, rtol=0)
    assert _forward_widths(model, lambda: pair_token_logps(model, batch, shared_prompt=True))[0][0] == 4


def test_a_pair_whose_prompts_differ_runs_as_two_rows_the_others_packed():
    batch = _pairs()
    batch["input_ids"][5, 1] = (batch["input_ids"][1, 1] + 1) % 97  # pair 1's rejected prompt differs by a token
    model = _model()
    widths = _forward_widths(model, lambda: pair_token_logps(model, batch, shared_prompt=True))
    assert widths[0][0] == 5  # pairs 0, 2, 3 packed; pair 1's rows alone
    two, shared = _both(model, batch)
    torch.testing.assert_close(shared, two, atol=1e-5, rtol=0)


def test_no_shared_prompt_or_not_right_padded_is_not_packed():
    rows = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10]), ([11], [12])]
    batch = pad_rows(rows, 0, 64)
    assert _pack(batch) is None  # nothing to save: the plain forward
    model = _model()
    assert _forward_widths(model, lambda: pair_token_logps(model, batch, shared_prompt=True)) == [(3, 5)]
    pairs = _pairs()
    left = {k: v.flip(-1) for k, v in pairs.items() if torch.is_tensor(v)}  # left-padded: not our layout
    assert _pack(left) is None


def test_an_online_group_of_samples_is_one_row_and_long_groups_are_cut():
    rng = random.Random(3)
    draw = lambda n: [rng.randrange(1, 97) for _ in range(n)]  # noqa: E731
    prompts = [draw(12), draw(7)]
    samples = [(prompts[0], draw(2 + i)) for i in range(4)] + [(prompts[1], draw(5 - i)) for i in range(3)]
    batch = pad_rows(samples, 0, 64)  # as the rollout builds it: a prompt's samples next to each other
    packing = _pack(batch)
    assert packing.input_ids.shape == (2, 12 + 2 + 3 + 4 + 5)  # one row per prompt: prompt + its 4 samples
    assert packing.position_ids[0, 12 + 2 + 3:12 + 2 + 3 + 4].tolist() == [12, 13, 14, 15]  # sample 3 at its place
    assert _pack(batch, max_span=12 + 2 + 3 + 4).input_ids.shape[0] == 3  # the 4th sample: a second row
    model = _model(hidden=48)
    two, shared = (shared_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                      0.7, shared_prompt=s) for s in (False, True))
    torch.testing.assert_close(shared, two, atol=1e-5, rtol=0)
    # 8 samples of 10 tokens behind a 12-token prompt: 92 tokens in one row would pass twice the width (2 x 22 =
    # 44), so the group runs as rows of at most 3 samples (12 + 30 = 42 tokens): 3, 3 and 2
    long = pad_rows([(prompts[0], draw(10)) for _ in range(8)], 0, 64)
    widths = _forward_widths(model, lambda: shared_token_logps(model, long["input_ids"], long["attention_mask"],
                                                               long["completion_mask"], shared_prompt=True))
    assert widths == [(3, 42)]
    torch.testing.assert_close(
        shared_token_logps(model, long["input_ids"], long["attention_mask"], long["completion_mask"],
                           shared_prompt=True),
        shared_token_logps(model, long["input_ids"], long["attention_mask"], long["completion_mask"],
                           shared_prompt=False), atol=1e-5, rtol=0)


def test_pairs_of_one_prompt_share_one_row():
    # self-play: pairs 0 and 1 come from one prompt; chosen rows first, then rejected rows
    batch = {**pad_rows([([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([9, 9], [7, 7]),
                         ([1, 2, 3], [8, 8, 8]), ([1, 2, 3], [5, 5]), ([9, 9], [6])], 0, 64), "pairs": 3}
    packing = _pack(batch)
    assert packing.input_ids.tolist()[0] == [1, 2, 3, 4, 5, 6, 8, 8, 8, 5, 5]  # four completions of one prompt
    model = _model()
    two, shared = _both(model, batch)
    torch.testing.assert_close(shared, two, atol=1e-5, rtol=0)


class _Kernel(torch.nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.config = Qwen2Config(attn_implementation="sdpa")
        self.config._attn_implementation = kernel


def test_setting_follows_the_attention_kernel():
    assert shared_prompt.decide("auto", _model("sdpa")) and shared_prompt.decide("auto", _model("eager"))
    assert shared_prompt.decide(True, _model()) and not shared_prompt.decide("false", _model())
    flash = _Kernel("flash_attention_2")
    assert not shared_prompt.decide("auto", flash)  # FlashAttention takes no custom mask: pairs stay two rows
    with pytest.raises(ValueError) as err:
        shared_prompt.decide("true", flash)
    assert "flash_attention_2" in str(err.value) and "trainer.shared_prompt=auto" in str(err.value)
    assert "expected one of auto, true, false" in shared_prompt.refusal("sometimes", flash)


def test_training_loop_losses_equal_and_recorded(tmp_path):
    from posttrain.algorithms import get
    from posttrain.data.tokenizer import build_char_tokenizer
    from posttrain.models.loading import Reference
    from posttrain.train import train

    tok = build_char_tokenizer(tmp_path / "tok")
    pairs = [{"prompt": f"Question: {i}+{i} {'words ' * (i % 4)}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}",
              "rejected": f" {2 * i + 1} {'x' * (i % 3)}\n#### {2 * i + 1}"} for i in range(12)]
    trainer = dict(lr=1e-3, epochs=1, micro_batch_size=3, grad_accum=2, max_steps=None, warmup_ratio=0.0,
                   schedule="constant", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                   checkpoint_every=0, log_every=1)
    runs = {}
    for setting in ("false", "auto"):
        model = _model(vocab=len(tok))
        model.train()
        state = train(model, Reference(model), tok, get("dpo"), {}, pairs, OmegaConf.create(
            {**trainer, "shared_prompt": setting}), max_length=64, seed=0, progress=False)
        runs[setting] = (state, dict(model.named_parameters()))
    (two, two_w), (shared, shared_w) = runs["false"], runs["auto"]
    assert (two.shared_prompt, shared.shared_prompt) == (False, True)
    assert shared.step == two.step == 2
    for (_, a), (_, b) in zip(two.loss_curve, shared.loss_curve):
        assert b == pytest.approx(a, abs=1e-5)
    for name, p in two_w.items():
        torch.testing.assert_close(shared_w[name], p, atol=1e-5, rtol=1e-4, msg=name)
