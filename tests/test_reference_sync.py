"""A reference that moves: SPIN's per-iteration reference and TR-DPO's soft update (algorithms/reference_sync),
including a resumed run that continues with the moved reference."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from posttrain.algorithms import get
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.models.loading import Reference
from posttrain.rewards import REWARD_FUNCTIONS
from posttrain.train import CHECKPOINT_FILE, train

from conftest import Preempted, cut_at, random_qwen2

PAIRS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}",
          "rejected": f" {2 * i + 1}\n#### {2 * i + 1}"} for i in range(12)]
GOLD = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS[:8]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _trainer(**kw):
    base = dict(lr=1e-3, epochs=2, micro_batch_size=4, grad_accum=1, max_steps=None, warmup_ratio=0.0,
                schedule="constant", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                checkpoint_every=0, log_every=1)
    return OmegaConf.create({**base, **kw})


def _snapshots(model, steps):
    """A log callback that keeps the policy's weights after the given optimizer steps."""
    kept = {}

    def log(metrics, step):
        if step in steps:
            kept[step] = copy.deepcopy(model.state_dict())
    return kept, log


def test_spin_reference_becomes_the_policy_at_each_epoch_end(tok, monkeypatch):
    monkeypatch.setitem(REWARD_FUNCTIONS, "none", lambda completions, answers: torch.zeros(len(completions)))
    model = random_qwen2(len(tok), 0)
    initial = copy.deepcopy(model.state_dict())
    reference = Reference(model)
    kept, log = _snapshots(model, {2})
    state = train(model, reference, tok, get("spin"), {"max_new_tokens": 6, "rewards": {"none": 1.0}}, GOLD,
                  _trainer(epochs=2), max_length=64, seed=0, progress=False, log=log)
    assert state.step == 4 and state.batches == 4, "2 epochs x 2 batches of 4 prompts"
    ref = reference.module.state_dict()
    for name, value in ref.items():  # iteration 2 ran against the policy as iteration 1 left it
        torch.testing.assert_close(value, kept[2][name])
    assert any(not torch.equal(ref[n], initial[n]) for n in ref), "the reference moved"
    assert any(not torch.equal(model.state_dict()[n], ref[n]) for n in ref), "no sync after the last step"


def test_tr_dpo_soft_update_mixes_policy_and_reference(tok):
    model = random_qwen2(len(tok), 0)
    initial = copy.deepcopy(model.state_dict())
    reference = Reference(model)
    kept, log = _snapshots(model, {2})
    train(model, reference, tok, get("dpo"), {"ref_sync_steps": 2, "ref_sync_alpha": 0.25}, PAIRS,
          _trainer(epochs=1, micro_batch_size=2, max_steps=3), max_length=64, seed=0, progress=False, log=log)
    for name, value in reference.module.state_dict().items():  # one sync, after step 2 (none after the last step)
        torch.testing.assert_close(value, 0.25 * kept[2][name] + 0.75 * initial[name])


def test_resumed_run_continues_with_the_moved_reference(tok, tmp_path):
    hp = {"ref_sync_steps": 2, "ref_sync_alpha": 0.5}
    trainer = _trainer(epochs=2, micro_batch_size=2, checkpoint_every=2)

    def run(**kw):
        model = random_qwen2(len(tok), 0)
        reference = Reference(model)
        state = train(model, reference, tok, get("dpo"), hp, PAIRS, trainer, max_length=64, seed=0, progress=False,
                      **kw)
        return model, reference, state

    full_model, full_ref, full = run()

    with pytest.raises(Preempted):
        run(checkpoint_dir=tmp_path, log=cut_at(7))
    assert "reference" in torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["memory"]
    resumed_model, resumed_ref, resumed = run(checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 6 and resumed.step == full.step == 12
    for (_, a), (_, b) in zip(full.loss_curve, resumed.loss_curve):
        assert a == pytest.approx(b, abs=1e-6)
    for p, q in zip(full_ref.module.parameters(), resumed_ref.module.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,hp,reference,message", [
    ("spin", {}, "lora", "cannot move a LoRA reference"),
    ("simpo", {"ref_sync_steps": 4}, None, "reference-free"),
    ("dpo", {"ref_sync_steps": "often"}, "copy", "must be a number of optimizer steps, 'epoch' or null"),
    ("dpo", {"ref_sync_steps": 4, "ref_sync_alpha": 1.5}, "copy", r"ref_sync_alpha must be in \(0, 1\]"),
])
def test_a_reference_that_cannot_move_is_refused_with_what_to_change(tok, name, hp, reference, message):
    model = random_qwen2(len(tok), 0)
    ref = {"lora": Reference(model, lora=True), "copy": Reference(model), None: Reference(None)}[reference]
    with pytest.raises(ValueError, match=message):
        train(model, ref, tok, get(name), hp, GOLD if name == "spin" else PAIRS, _trainer(max_steps=1),
              max_length=64, seed=0, progress=False)
