"""State carried across optimizer steps: beta-DPO's margin EMA and BCO's running delta (issue 4), kept by the loop's
memory, advanced once per optimizer step, and checkpointed so that a resumed run equals the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from posttrain import losses
from posttrain.algorithms import get
from posttrain.algorithms.memory import LoopMemory, RunningMean
from posttrain.algorithms.families import FAMILIES
from posttrain.algorithms.objectives import (StepContext, offline_batches, prime_memory,
                                             sequence_logps)
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.models.loading import Reference
from posttrain.train import CHECKPOINT_FILE, train

from conftest import Preempted, cut_at, random_qwen2

PAIRS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}",
          "rejected": f" {2 * i + 1}\n#### {2 * i + 1}"} for i in range(12)]
UNPAIRED = [{"prompt": p["prompt"], "completion": p["chosen"] if i % 2 else p["rejected"], "desirable": bool(i % 2)}
            for i, p in enumerate(PAIRS)]


def _sum(values):  # a one-process all_reduce_sum
    return [float(v) for v in values]


def test_running_mean_is_an_ema_or_a_cumulative_mean_of_the_step_means():
    ema = RunningMean(momentum=0.9)
    assert ema.value is None
    ema.observe(torch.tensor([1.0, 3.0]))
    ema.observe(torch.tensor([5.0]))  # a second micro-batch of the same step
    ema.commit(_sum)
    assert ema.value == pytest.approx(3.0), "the first step's mean starts the EMA"
    ema.observe(torch.tensor([13.0]))
    ema.commit(_sum)
    assert ema.value == pytest.approx(0.9 * 3.0 + 0.1 * 13.0)
    ema.commit(_sum)  # a step that observed nothing leaves it alone
    assert ema.value == pytest.approx(4.0) and ema.count == 2

    cum = RunningMean()
    for step_values in ([2.0, 4.0], [9.0], [0.0, 0.0, 3.0]):
        cum.observe(torch.tensor(step_values))
        cum.commit(_sum)
    assert cum.value == pytest.approx((3.0 + 9.0 + 1.0) / 3), "mean of the per-step means, as TRL's RunningMoments"


def test_memory_restores_each_object_when_it_is_first_asked_for():
    memory = LoopMemory()
    stat = memory.get("running/x", lambda: RunningMean(0.5))
    stat.observe(torch.tensor([2.0]))
    memory.commit(_sum)
    saved = memory.state_dict()
    restored = LoopMemory(saved)
    assert restored.state_dict() == saved, "objects nobody asked for yet are kept as saved"
    again = restored.get("running/x", lambda: RunningMean(0.5))
    assert (again.value, again.count) == (2.0, 1) and restored.state_dict()["running/x"]["value"] == 2.0


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _batch(tok, name, examples):
    [[batch]], _ = offline_batches(None, None, tok, get(name), {}, [examples], max_length=64, seed=0, step=0)
    return batch


def test_betadpo_uses_the_loops_ema_of_the_margins_after_the_first_step(tok):
    policy, ref_model = random_qwen2(len(tok), 0), random_qwen2(len(tok), 1)
    reference = Reference(ref_model)
    algo, memory = get("betadpo"), LoopMemory()
    batches = [_batch(tok, "betadpo", PAIRS[:4]), _batch(tok, "betadpo", PAIRS[4:8])]
    expected_mu = None
    for step, batch in enumerate(batches):
        ctx = StepContext(examples=4, tokens=1, memory=memory)
        loss, stats = FAMILIES["pairwise"].objective(policy, reference, batch, algo, {"beta": 0.1, "a": 0.5}, ctx)
        # by hand: the margins of this batch, and the loss with mu = the batch mean (step 0) or the EMA (later)
        seq, _ = sequence_logps(policy, batch)
        with torch.no_grad():
            ref, _ = sequence_logps(ref_model, batch)
        margins = ((seq[:4] - ref[:4]) - (seq[4:] - ref[4:])).detach()
        by_hand = losses.pairwise("betadpo", seq[:4], seq[4:], ref[:4], ref[4:], beta=0.1, a=0.5,
                                  margin_mean=expected_mu).sum() / 4
        assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
        memory.commit(_sum)
        expected_mu = float(margins.mean()) if expected_mu is None else 0.9 * expected_mu + 0.1 * float(margins.mean())
        assert memory.state_dict()["running/margin_mean"]["value"] == pytest.approx(expected_mu, abs=1e-6)
    assert expected_mu != pytest.approx(float(margins.mean()), abs=1e-6), "the EMA is not the last batch's mean"


def test_a_number_set_for_a_running_hyperparameter_fixes_it(tok):
    policy = random_qwen2(len(tok), 0)
    memory = LoopMemory()
    batch = _batch(tok, "betadpo", PAIRS[:4])
    FAMILIES["pairwise"].objective(policy, Reference(random_qwen2(len(tok), 1)), batch, get("betadpo"),
                           {"margin_mean": 0.5}, StepContext(examples=4, tokens=1, memory=memory))
    assert memory.state_dict() == {}, "no running statistic is kept when the run fixes the value"


def test_running_statistics_exist_before_the_first_step_on_every_rank():
    """Primed by the loop, so a rank without a batch of its own still joins the end-of-step all-reduce."""
    for name, hp, keys in (("betadpo", {}, {"running/margin_mean"}), ("betadpo", {"margin_mean": 0.0}, set()),
                           ("bco_unpaired", {"beta": 0.2}, {"running/delta"}), ("dpo", {}, set()),
                           ("sgrpo", {}, set())):
        memory = LoopMemory()
        prime_memory(get(name), hp, memory)
        assert set(memory.state_dict()) == keys, name


def test_unpaired_bco_shifts_by_the_running_mean_of_the_implicit_rewards(tok):
    policy, ref_model = random_qwen2(len(tok), 0), random_qwen2(len(tok), 1)
    reference = Reference(ref_model)
    algo, memory, beta = get("bco_unpaired"), LoopMemory(), 0.2
    step_means = []
    for chunk in (UNPAIRED[:4], UNPAIRED[4:8], UNPAIRED[8:]):
        batch = _batch(tok, "bco_unpaired", chunk)
        delta = None if not step_means else sum(step_means) / len(step_means)
        loss, _ = FAMILIES["unpaired"].objective(policy, reference, batch, algo, {"beta": beta},
                                         StepContext(examples=4, tokens=1, memory=memory))
        seq, _ = sequence_logps(policy, batch)
        with torch.no_grad():
            ref, _ = sequence_logps(ref_model, batch)
        r = (seq[:4] - ref[:4]).detach()
        z = beta * r - (beta * r.mean() if delta is None else delta)
        by_hand = torch.where(batch["desirable"], -torch.nn.functional.logsigmoid(z),
                              -torch.nn.functional.logsigmoid(-z)).mean()
        assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
        memory.commit(_sum)
        step_means.append(float((beta * r).mean()))
    assert memory.state_dict()["running/delta"]["value"] == pytest.approx(sum(step_means) / 3, abs=1e-6)


def _trainer(**kw):
    base = dict(lr=1e-3, epochs=3, micro_batch_size=4, grad_accum=1, max_steps=None, warmup_ratio=0.1,
                schedule="cosine", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01, max_grad_norm=1.0,
                checkpoint_every=2, log_every=1)
    return OmegaConf.create({**base, **kw})


@pytest.mark.parametrize("name,examples", [("betadpo", PAIRS), ("bco_unpaired", UNPAIRED)])
def test_resumed_run_continues_the_running_statistic(tok, tmp_path, name, examples):
    def run(**kw):
        model = random_qwen2(len(tok), 0)
        state = train(model, Reference(model), tok, get(name), {}, examples, _trainer(), max_length=64, seed=0,
                      progress=False, **kw)
        return model, state

    logged = []
    full_model, full = run(log=lambda m, s: logged.append(m))
    key = "train/running/" + ("margin_mean" if name == "betadpo" else "delta")
    assert len({round(m[key], 9) for m in logged if key in m}) > 2, "the statistic moves from step to step"

    with pytest.raises(Preempted):
        run(checkpoint_dir=tmp_path, log=cut_at(5))
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert saved["state"]["step"] == 4 and saved["memory"][key.removeprefix("train/")]["count"] == 4
    resumed_model, resumed = run(checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 4 and resumed.step == full.step == 9
    for (_, a), (_, b) in zip(full.loss_curve, resumed.loss_curve):
        assert a == pytest.approx(b, abs=1e-6)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
