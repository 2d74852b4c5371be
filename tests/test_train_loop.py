"""The one training loop: accumulation does not change the result, resume equals uninterrupted, references."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from posttrain.algorithms import get
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.losses import token_nll
from posttrain.models.loading import Reference
from posttrain.train import CHECKPOINT_FILE, plan, train

from conftest import Preempted, cut_at, random_qwen2

PAIRS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}",
          "rejected": f" {2 * i + 1}\n#### {2 * i + 1}"} for i in range(12)]
SFT = [{"prompt": p["prompt"], "completion": p["chosen"] + "x" * (i % 5)} for i, p in enumerate(PAIRS)]


def _trainer(**kw):
    base = dict(lr=1e-3, epochs=2, micro_batch_size=4, grad_accum=1, max_steps=None, warmup_ratio=0.1,
                schedule="cosine", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01, max_grad_norm=1.0,
                checkpoint_every=0, log_every=1)
    return OmegaConf.create({**base, **kw})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(tok, seed=0):
    return random_qwen2(len(tok), seed)


def _run(tok, algo, examples, trainer, model=None, **kw):
    model = model or _model(tok)
    spec = get(algo)
    ref = Reference(model if spec.needs_reference({}) else None)
    state = train(model, ref, tok, spec, {}, examples, trainer, max_length=64, seed=0, progress=False, **kw)
    return model, state, ref


def test_token_nll_is_a_mean_over_all_tokens_of_the_accumulated_batch():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert token_nll(lp, mask).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert token_nll(lp, mask, num_items=8).item() == pytest.approx(10 / 8)


@pytest.mark.parametrize("algo,examples", [("sft", SFT), ("dpo", PAIRS)])
def test_gradient_accumulation_gives_the_same_run_as_one_big_micro_batch(tok, algo, examples):
    big, s1, _ = _run(tok, algo, examples, _trainer(micro_batch_size=4, grad_accum=1))
    small, s2, _ = _run(tok, algo, examples, _trainer(micro_batch_size=2, grad_accum=2))
    assert s1.step == s2.step == 6
    for (_, a), (_, b) in zip(s1.loss_curve, s2.loss_curve):
        assert a == pytest.approx(b, abs=1e-5)
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tok, tmp_path):
    full_model, full, _ = _run(tok, "dpo", PAIRS, _trainer(epochs=3))
    # interrupted: killed during step 5 (after a checkpoint at step 4), then resumed from a fresh model
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()

    with pytest.raises(Preempted):
        _run(tok, "dpo", PAIRS, _trainer(epochs=3, checkpoint_every=2), checkpoint_dir=ckpt, log=cut_at(5))
    assert (ckpt / CHECKPOINT_FILE).exists()
    saved = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
    assert saved["state"]["step"] == 4, "the last checkpoint before the cut"
    resumed_model, resumed, _ = _run(tok, "dpo", PAIRS, _trainer(epochs=3, checkpoint_every=2),
                                     checkpoint_dir=ckpt)
    assert resumed.step == full.step == 9
    assert [s for s, _ in resumed.loss_curve] == list(range(1, 10))
    for (_, a), (_, b) in zip(full.loss_curve, resumed.loss_curve):
        assert a == pytest.approx(b, abs=1e-6)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_reference_free_algorithms_never_run_a_reference_forward(tok):
    _, _, ref = _run(tok, "simpo", PAIRS, _trainer(max_steps=2))
    assert ref.calls == 0 and not ref.enabled
    _, _, ref = _run(tok, "dpo", PAIRS, _trainer(max_steps=2))
    assert ref.calls == 2


def test_reference_copy_stays_frozen_while_the_policy_moves(tok):
    model = _model(tok)
    initial = copy.deepcopy(model.state_dict())
    spec = get("dpo")
    ref = Reference(model)
    train(model, ref, tok, spec, {}, PAIRS, _trainer(max_steps=3), max_length=64, seed=0, progress=False)
    with ref.active() as frozen:
        for name, value in frozen.state_dict().items():
            torch.testing.assert_close(value, initial[name])
    assert any(not torch.equal(p, initial[n]) for n, p in model.state_dict().items())


def test_plan_counts_steps_and_refuses_empty_data():
    assert plan(12, _trainer()) == (3, 6)
    assert plan(12, _trainer(max_steps=4)) == (3, 4)
    with pytest.raises(ValueError, match="no training examples"):
        plan(0, _trainer())


def _pair_batch(tok):
    from posttrain.data.collate import collate

    return collate("pairs", tok, PAIRS[:4], 64)


def test_wpo_and_ld_dpo_options_combine_with_a_pairwise_loss(tok):
    from posttrain.algorithms.objectives import StepContext, pairwise
    from posttrain.models.logps import token_logps
    from posttrain.losses import options
    from posttrain.losses import pairwise as pairwise_loss

    model = _model(tok)
    ref = Reference(_model(tok, seed=1))
    batch, ctx, algo = _pair_batch(tok), StepContext(examples=4, tokens=1), get("dpo")
    plain, _ = pairwise(model, ref, batch, algo, {"beta": 0.1}, ctx)
    same, _ = pairwise(model, ref, batch, algo, {"beta": 0.1, "ld_alpha": 1.0}, ctx)
    assert same.item() == pytest.approx(plain.item(), abs=1e-6), "ld_alpha = 1 is plain DPO"
    # independent computation of both options
    mask = batch["completion_mask"][:, 1:].float()
    with torch.no_grad():
        lp = token_logps(model, batch["input_ids"], batch["attention_mask"])
        with ref.active() as r:
            rlp = token_logps(r, batch["input_ids"], batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    pc, pr = options.ld_dpo_logps(lp[:4], mask[:4], lp[4:], mask[4:], alpha=0.5)
    rc, rr = options.ld_dpo_logps(rlp[:4], mask[:4], rlp[4:], mask[4:], alpha=0.5)
    expected_ld = pairwise_loss("dpo", pc, pr, rc, rr, beta=0.1).mean()
    got_ld, _ = pairwise(model, ref, batch, algo, {"beta": 0.1, "ld_alpha": 0.5}, ctx)
    assert got_ld.item() == pytest.approx(expected_ld.item(), abs=1e-5)
    sq = torch.logsumexp(2 * torch.log_softmax(logits, -1), -1)
    w = lambda a, b: torch.exp(((lp[a:b] - sq[a:b]) * mask[a:b]).sum(-1) / mask[a:b].sum(-1))  # noqa: E731
    seq, rseq = (lp * mask).sum(-1), (rlp * mask).sum(-1)
    expected_wpo = (pairwise_loss("dpo", seq[:4], seq[4:], rseq[:4], rseq[4:], beta=0.1) * w(0, 4) * w(4, 8)).mean()
    got_wpo, stats = pairwise(model, ref, batch, algo, {"beta": 0.1, "wpo": True}, ctx)
    assert got_wpo.item() == pytest.approx(expected_wpo.item(), abs=1e-5) and stats["wpo/weight"] > 0


def test_tdpo_runs_in_the_loop_with_full_vocabulary_kl(tok):
    from posttrain.algorithms.objectives import StepContext, token_pairwise
    from posttrain.losses import options

    model, ref = _model(tok), Reference(_model(tok, seed=1))
    batch, algo = _pair_batch(tok), get("tdpo")
    loss, stats = token_pairwise(model, ref, batch, algo, {"beta": 0.1, "alpha": 0.5, "variant": 2},
                                 StepContext(examples=4, tokens=1))
    mask = batch["completion_mask"][:, 1:].float()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        with ref.active() as r:
            rlogits = r(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    ids = batch["input_ids"][:, 1:].unsqueeze(-1)
    lp = (torch.log_softmax(logits, -1).gather(-1, ids).squeeze(-1) * mask).sum(-1)
    rlp = (torch.log_softmax(rlogits, -1).gather(-1, ids).squeeze(-1) * mask).sum(-1)
    p, q = torch.log_softmax(logits, -1), torch.log_softmax(rlogits, -1)
    kl = ((q.exp() * (q - p)).sum(-1) * mask).sum(-1)  # forward KL(ref || policy) per position, summed
    margin = (lp[:4] - rlp[:4]) - (lp[4:] - rlp[4:])
    expected = -torch.nn.functional.logsigmoid(0.1 * (margin - 0.5 * (kl[4:] - kl[:4]))).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5) and stats["kl/chosen"] >= 0
    _, state, ref_used = _run(tok, "tdpo", PAIRS, _trainer(max_steps=2))
    assert state.step == 2 and ref_used.calls == 2
    with pytest.raises(ValueError, match="accepted"):
        token_pairwise(model, ref, batch, algo, {"gamma": 1.0}, StepContext(examples=4, tokens=1))
    assert options.tdpo is algo.loss_spec.fn


def test_a_checkpoint_of_another_config_is_not_resumed_from(tok, tmp_path, capsys):
    trainer = _trainer(epochs=3, checkpoint_every=2)
    full_model, full, _ = _run(tok, "dpo", PAIRS, trainer)
    with pytest.raises(Preempted):
        _run(tok, "dpo", PAIRS, trainer, checkpoint_dir=tmp_path, log=cut_at(5), fingerprint="aaaaaaaaaaaa")
    model, fresh, _ = _run(tok, "dpo", PAIRS, trainer, checkpoint_dir=tmp_path, fingerprint="bbbbbbbbbbbb")
    assert fresh.resumed_from is None and "starting over" in capsys.readouterr().out
    assert fresh.loss_curve == full.loss_curve, "a fresh run, not a continuation of the other config's"
    again = tmp_path / "again"  # (train leaves its last checkpoint; run.py removes it once the cell completes)
    with pytest.raises(Preempted):
        _run(tok, "dpo", PAIRS, trainer, checkpoint_dir=again, log=cut_at(5), fingerprint="bbbbbbbbbbbb")
    _, resumed, _ = _run(tok, "dpo", PAIRS, trainer, checkpoint_dir=again, fingerprint="bbbbbbbbbbbb")
    assert resumed.resumed_from == 4 and [s for s, _ in resumed.loss_curve] == list(range(1, 10))
    for (_, a), (_, b) in zip(full.loss_curve, resumed.loss_curve):
        assert a == pytest.approx(b, abs=1e-6)


def test_length_grouped_micro_batches_hold_the_same_step_with_less_padding():
    from posttrain.train import example_length, step_batches

    examples = [{"prompt": "q" * (i % 7), "chosen": "a" * (3 * i % 11), "rejected": "b"} for i in range(16)]
    plain = list(step_batches(examples, _trainer(micro_batch_size=2, grad_accum=4), 0, 0, 4))
    grouped = list(step_batches(examples, _trainer(micro_batch_size=2, grad_accum=4), 0, 0, 4, group_by_length=True))

    def width(step):  # padded characters per step: each micro-batch pads to its longest example
        return sum(len(mb) * max(example_length(e) for e in mb) for mb in step)

    for a, b in zip(plain, grouped):
        assert sorted(map(str, (e for mb in a for e in mb))) == sorted(map(str, (e for mb in b for e in mb)))
        lengths = [example_length(e) for mb in b for e in mb]
        assert lengths == sorted(lengths) and width(b) <= width(a)
    assert sum(map(width, grouped)) < sum(map(width, plain))


def test_length_grouping_gives_the_same_training_run(tok):
    examples = [dict(p, chosen=p["chosen"] + " " * (5 * i % 13)) for i, p in enumerate(PAIRS)]
    a, s1, _ = _run(tok, "dpo", examples, _trainer(micro_batch_size=2, grad_accum=3))
    b, s2, _ = _run(tok, "dpo", examples, _trainer(micro_batch_size=2, grad_accum=3, group_by_length=True))
    assert len(s1.loss_curve) == len(s2.loss_curve) == 4
    for (_, x), (_, y) in zip(s1.loss_curve, s2.loss_curve):
        assert x == pytest.approx(y, abs=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_length_grouping_on_several_ranks_repeats_the_same_examples_of_a_short_step():
    from posttrain.train import example_length, shard_step

    step = [{"prompt": "q" * n, "chosen": "", "rejected": ""} for n in (9, 2, 7, 1, 5, 3, 8)]  # a short last step
    for micro in (1, 2):
        plain = [e for r in range(4) for mb in shard_step(step, micro, r, 4) for e in mb]
        grouped = [mb for r in range(4) for mb in shard_step(step, micro, r, 4, example_length)]
        assert sorted(map(str, plain)) == sorted(map(str, (e for mb in grouped for e in mb))), "same repeats"


def test_online_families_are_never_length_grouped():
    from posttrain.algorithms import families

    assert {f.name for f in families.FAMILIES.values() if f.groups_by_length} == {
        "supervised", "pairwise", "token_pairwise", "unpaired"}
