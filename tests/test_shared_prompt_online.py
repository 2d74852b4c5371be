"""The shared prompt for online groups (posttrain.models.shared_prompt, posttrain.algorithms.online): the rollout's
no-grad passes and the updates on one layout (PPO's first-epoch ratio exactly 1; DAPO's overlong filter), empty
completions, the grouping key, the plain full-logits path with a temperature, forward counts (ZeRO-3's gathers), and
the study plan's samples per packed row."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.algorithms import families, get
from posttrain.algorithms.objectives import StepContext
from posttrain.algorithms.online import policy_gradient_objective
from posttrain.data.collate import pad_rows
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.models import logps, shared_prompt
from posttrain.models.loading import Reference
from posttrain.models.logps import shared_token_logps
from posttrain.rewards import REWARD_FUNCTIONS
from posttrain.sweep import files, plan

from conftest import random_qwen2

PROMPTS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "answer": str(2 * i)} for i in range(8)]
HP = {"rewards": {"parity": 1.0}, "accuracy_reward": "parity", "max_new_tokens": 6, "num_samples": 4}


def parity_reward(completions, answers):
    return torch.tensor([float(bool(c) and ord(c[0]) % 2 == 0) for c in completions])


@pytest.fixture(autouse=True)
def _rewards(monkeypatch):
    monkeypatch.setitem(REWARD_FUNCTIONS, "parity", parity_reward)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(kernel: str = "sdpa", hidden: int = 64, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation=kernel)
    return Qwen2ForCausalLM(cfg).eval()


def _draw(rng, n):
    return [rng.randrange(1, 97) for _ in range(n)]


def _lp(model, batch, completion_mask=None, temperature=1.0, *, shared):
    return shared_token_logps(model, batch["input_ids"], batch["attention_mask"],
                              batch["completion_mask"] if completion_mask is None else completion_mask,
                              temperature, shared_prompt=shared)


def _first_update_stats(tok, name, hp, shared):
    """(rollout stats, [objective stats of the first update's micro-batches]) for one rollout of ``name``."""
    model = random_qwen2(len(tok), 0)
    algo = get(name)
    h = {**HP, **hp}
    ref = Reference(model if algo.needs_reference(h) else None)
    updates, stats = families.of(algo).prepare(model, ref, tok, algo, h, [PROMPTS[:4], PROMPTS[4:]], max_length=64,
                                               seed=0, step=0, shared_prompt=shared)
    first = updates[0]
    tokens = int(sum(b["completion_mask"][:, 1:].sum() for b in first))
    ctx = StepContext(examples=len(PROMPTS), tokens=tokens, shared_prompt=shared)
    return stats, [policy_gradient_objective(model, ref, b, algo, h, ctx)[1] for b in first]


# ----------------------------------------------------------------------------------- packed meets unpacked


def test_ppo_first_epoch_ratio_is_exactly_one_without_the_shared_prompt(tok):
    stats, micro = _first_update_stats(tok, "ppo", {}, shared=False)
    assert all(s["pg/ratio_max"] == 1.0 and s["pg/clip_frac"] == 0.0 for s in micro)
    assert stats["kl_ref_rollout"] == 0.0  # old (full logits) and reference: the same one-row layout


def test_ppo_first_epoch_ratio_is_exactly_one_with_the_shared_prompt(tok):
    stats, micro = _first_update_stats(tok, "ppo", {}, shared=True)
    assert all(s["pg/ratio_max"] == 1.0 for s in micro), [s["pg/ratio_max"] for s in micro]
    assert stats["kl_ref_rollout"] == 0.0, stats["kl_ref_rollout"]


def _truncation_batch():
    """One prompt's 4 samples as the rollout builds them; sample 1 is the one DAPO's overlong filter drops. Its
    completion counts toward the span cut in the rollout's no-grad pass (rows 0, 1, 2 | 3) but not in the update
    (rows 0, 2, 3 | 1 alone)."""
    rng = random.Random(0)
    prompt = _draw(rng, 12)
    batch = pad_rows([(prompt, _draw(rng, n)) for n in (20, 20, 8, 8)], 0, 200)
    filtered = batch["completion_mask"].clone()
    filtered[1] = 0  # online.py: batch["completion_mask"][rollout.truncated] = 0, after the old/ref passes
    return batch, filtered


def _groups(batch, completion_mask):
    lengths = shared_prompt._lengths(batch["attention_mask"], completion_mask)
    return shared_prompt.prompt_groups(batch["input_ids"], *lengths, 2 * batch["input_ids"].shape[1])


def test_overlong_filter_regroups_the_other_samples():
    batch, filtered = _truncation_batch()
    assert _groups(batch, batch["completion_mask"]) == [[0, 1, 2], [3]]
    assert _groups(batch, filtered) == [[0, 2, 3]]  # the dropped row has nothing to compute: left out
    model = _model()
    with torch.no_grad():  # the values stay right: the other rows equal the unpacked ones, the dropped row is 0
        packed, plain = _lp(model, batch, filtered, shared=True), _lp(model, batch, filtered, shared=False)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)
    assert packed[1].abs().sum() == 0


def test_overlong_filter_leaves_other_rows_bitwise_unpacked():
    batch, filtered = _truncation_batch()
    model = _model()
    with torch.no_grad():
        before, after = _lp(model, batch, shared=False), _lp(model, batch, filtered, shared=False)
    keep = filtered[:, 1:].bool()
    assert torch.equal(after[keep], before[keep])


def test_overlong_filter_leaves_the_updates_layout_as_the_rollouts(tok):
    """DAPO's filter zeroes truncated rows' completion masks after the old / reference passes; the update packs by
    the rollout's mask (``rollout_completion_mask``), so with several updates per rollout the first ratio is exactly
    1 in bf16 (packing by the filtered mask regroups the other rows: their log-probs move by rounding)."""
    batch, filtered = _truncation_batch()
    model = _model()
    with torch.no_grad():
        before, after = _lp(model, batch, shared=True), _lp(model, batch, filtered, shared=True)
    keep = filtered[:, 1:].bool()
    assert not torch.equal(after[keep], before[keep])  # why the update must not pack by the filtered mask
    bf16 = _model().to(torch.bfloat16)
    with torch.no_grad():
        old = _lp(bf16, batch, shared=True)  # the rollout's pass, before the filter
    mb = {**batch, "completion_mask": filtered, "rollout_completion_mask": batch["completion_mask"],
          "advantages": torch.ones(4), "old_logps": old, "examples": 4}
    ctx = StepContext(examples=4, tokens=int(filtered[:, 1:].sum()), shared_prompt=True)
    stats = policy_gradient_objective(bf16, Reference(None), mb, get("dapo"), {**HP, "num_iterations": 2}, ctx)[1]
    assert stats["pg/ratio_max"] == 1.0 and stats["pg/clip_frac"] == 0.0
    model = random_qwen2(len(tok), 0).to(torch.bfloat16)
    algo, h = get("dapo"), {**HP, "num_iterations": 2, "dynamic_sampling": False}
    updates, _ = families.of(algo).prepare(model, Reference(None), tok, algo, h, [PROMPTS[:4], PROMPTS[4:]],
                                           max_length=64, seed=0, step=0, shared_prompt=True)
    first = updates[0]
    assert any(not torch.equal(b["completion_mask"], b["rollout_completion_mask"]) for b in first), \
        "some samples were truncated (max_new_tokens 6) and filtered"
    tokens = int(sum(b["completion_mask"][:, 1:].sum() for b in first))
    ctx = StepContext(examples=len(PROMPTS), tokens=tokens, shared_prompt=True)
    micro = [policy_gradient_objective(model, Reference(None), b, algo, h, ctx)[1] for b in first]
    ratios = [s["pg/ratio_max"] for s in micro if "pg/ratio_max" in s]  # a fully filtered micro-batch has none
    assert ratios and all(r == 1.0 for r in ratios), ratios


def test_filtered_rows_add_no_packed_rows():
    rng = random.Random(6)
    prompt = _draw(rng, 40)
    batch = pad_rows([(prompt, _draw(rng, n)) for n in (24, 24, 9, 7, 8, 10, 6, 9)], 0, 200)
    filtered = batch["completion_mask"].clone()
    filtered[:2] = 0  # the two longest samples hit max_new_tokens: DAPO's overlong filter
    packing = shared_prompt.pack(batch["input_ids"], batch["attention_mask"], filtered)
    kept = {k: v[2:] for k, v in batch.items()}
    alone = shared_prompt.pack(kept["input_ids"], kept["attention_mask"], kept["completion_mask"],
                               max_span=2 * batch["input_ids"].shape[1])
    assert packing.input_ids.shape[0] == alone.input_ids.shape[0], (packing.input_ids.shape, alone.input_ids.shape)


# ----------------------------------------------------------------------------------- edge cases found fine


def test_empty_completions_pack_and_backpropagate():
    rng = random.Random(1)
    prompt = _draw(rng, 9)
    batch = pad_rows([(prompt, _draw(rng, 5)), (prompt, []), (prompt, _draw(rng, 3)), (prompt, [])], 0, 64)
    model = _model()
    packing = shared_prompt.pack(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert packing.input_ids.shape == (1, 9 + 5 + 3)  # the empty samples join the group with nothing to add
    torch.testing.assert_close(_lp(model, batch, shared=True), _lp(model, batch, shared=False), atol=1e-5, rtol=0)
    # every completion empty (a micro-batch DAPO's filter emptied): zeros, and backward still runs
    empty = torch.zeros_like(batch["completion_mask"])
    lp = _lp(model, batch, empty, shared=True)
    assert lp.shape == (4, batch["input_ids"].shape[1] - 1) and lp.abs().sum() == 0
    lp.sum().backward()


def test_a_prompt_that_is_a_prefix_of_another_is_not_grouped_with_it():
    rng = random.Random(2)
    short = _draw(rng, 6)
    long = short + _draw(rng, 4)
    batch = pad_rows([(short, _draw(rng, 3)), (long, _draw(rng, 3)), (short, _draw(rng, 2)),
                      (long[:6] + [long[6] % 96 + 1] + long[7:], _draw(rng, 3))], 0, 64)
    assert _groups(batch, batch["completion_mask"]) == [[0, 2], [1], [3]]
    model = _model()
    torch.testing.assert_close(_lp(model, batch, shared=True), _lp(model, batch, shared=False), atol=1e-5, rtol=0)


def test_plain_full_logits_path_with_a_temperature(monkeypatch):
    """ZeRO-3's partitioned head takes the plain path: packed rows, full logits, logits / temperature."""
    monkeypatch.setattr(logps, "COMPLETION_ONLY", False)
    rng = random.Random(3)
    prompts = [_draw(rng, 10), _draw(rng, 7)]
    batch = pad_rows([(prompts[i // 3], _draw(rng, 2 + i)) for i in range(6)], 0, 64)
    model = _model()
    torch.testing.assert_close(_lp(model, batch, temperature=0.7, shared=True),
                               _lp(model, batch, temperature=0.7, shared=False), atol=1e-5, rtol=0)


@pytest.mark.parametrize("completion_only", [True, False])
def test_one_model_forward_per_call_packed_or_not(monkeypatch, completion_only):
    """ZeRO-3 gathers per module call: packing must not change how often a rank calls the model (the uneven-step
    padding forwards of train.py's _pad_backward match plain calls one for one)."""
    monkeypatch.setattr(logps, "COMPLETION_ONLY", completion_only)
    rng = random.Random(4)
    prompt = _draw(rng, 10)
    batch = pad_rows([(prompt, _draw(rng, 3 + i)) for i in range(4)], 0, 64)
    model = _model()
    counts = {}
    for shared in (False, True):
        calls = []
        handles = [model.register_forward_hook(lambda *a, c=calls: c.append("model")),
                   model.get_output_embeddings().register_forward_hook(lambda *a, c=calls: c.append("head"))]
        _lp(model, batch, shared=shared)
        for h in handles:
            h.remove()
        counts[shared] = (calls.count("model"), calls.count("head"))
    assert counts[True] == counts[False] and counts[True][0] == 1


# ----------------------------------------------------------------------------------- the plan's packed rows


def test_plan_samples_per_row_match_pack_for_uniform_completions():
    """sweep/plan.py: per_row = (2 x seq - prompt) // completion; pack's max_span is twice the micro-batch's width,
    which for uniform completions is seq: the same number of samples per packed row."""
    assume = plan.Assumptions(prompt_tokens={"raw": 30, "fewshot": 30}, completion_tokens=7)
    cell = files.grid(["algo=grpo", "scale=tiny-s", "algo.num_samples=16"])[0]
    p = plan.cell_plan(cell, files.default_conf_dir(), assume)
    per_row = (2 * 37 - 30) // 7  # 6
    rng = random.Random(5)
    prompt = _draw(rng, 30)
    batch = pad_rows([(prompt, _draw(rng, 7)) for _ in range(16)], 0, 128)
    packing = shared_prompt.pack(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert packing.input_ids.shape[0] == math.ceil(16 / per_row) == 3
    examples = p.cost.trained / (30 * 3 + 16 * 7)
    assert examples == pytest.approx(round(examples))  # the plan counts 3 prompt copies per group, as pack runs it
