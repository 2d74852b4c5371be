"""CONTRIBUTING.md, "Add an algorithm", followed step by step: a throwaway pairwise loss and a throwaway online
policy-gradient method are registered at runtime the way the document says, their yaml validates against the schema,
the loop's objective on a hand-made batch equals a hand computation, the loop trains them for 2 steps, and they are
unregistered again."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from posttrain.algorithms import families, registry
from posttrain.algorithms.hparams import validate
from posttrain.algorithms.objectives import StepContext
from posttrain.algorithms.registry import Algorithm
from posttrain.data.collate import collate
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.losses._common import LossSpec
from posttrain.losses.pair import Pair
from posttrain.losses.pairwise import PAIRWISE_LOSSES
from posttrain.losses.pg_terms import Terms
from posttrain.losses.policy_gradient import POLICY_GRADIENT_LOSSES, make_spec
from posttrain.models.loading import Reference
from posttrain.models.logps import token_logps
from posttrain.rewards import REWARD_FUNCTIONS
from posttrain.train import train

from conftest import ROOT, random_qwen2

PAIRS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}",
          "rejected": f" {2 * i + 1}\n#### {2 * i + 1}"} for i in range(8)]
PROMPTS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "answer": str(2 * i)} for i in range(8)]


def test_the_document_names_the_steps():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for heading in ("## Add an algorithm", "(a) A pairwise", "(b) An online policy-gradient", "(c) A new advantage"):
        assert heading in text


def tmp_sq(x: Pair, *, beta: float = 0.1, margin: float = 1.0) -> torch.Tensor:
    """A throwaway pairwise loss: ``(beta * D - margin)^2``."""
    return (beta * x.margin - margin) ** 2


def tmp_pg_terms(logps, old, adv, mask, hp):
    """A throwaway REINFORCE surrogate: ``-scale * w * A``, micro-batch token mean."""
    ratio = torch.exp(logps - old)
    return Terms(-float(hp["scale"]) * ratio * adv, ratio, None, None, "token_mean")


@pytest.fixture
def throwaways(monkeypatch):
    # (a) step 1: the loss and its PAIRWISE_LOSSES row (+ the registry entry a PAIRWISE_LOSSES key gets at import)
    monkeypatch.setitem(PAIRWISE_LOSSES, "tmp_sq", LossSpec(tmp_sq))
    registry.register(Algorithm("tmp_sq", "pairwise", "tmp_sq", "pairs"))
    # (b): a new surrogate (its make_spec row) and the registry row naming an existing estimator
    monkeypatch.setitem(POLICY_GRADIENT_LOSSES, "tmp_pg",
                        make_spec("tmp_pg", "token", "token_mean", "a test", tmp_pg_terms, scale=1.0))
    registry.register(Algorithm("tmp_pg", "online_policy_gradient", "tmp_pg", "prompts", "online",
                                options={"advantage": "group_zscore", "num_samples": 2}))
    monkeypatch.setitem(REWARD_FUNCTIONS, "parity", lambda completions, answers: torch.tensor(
        [float(bool(c) and ord(c[0]) % 2 == 0) for c in completions]))
    yield
    registry.unregister("tmp_sq")
    registry.unregister("tmp_pg")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _trainer(**kw):
    return OmegaConf.create({**dict(lr=1e-3, epochs=1, micro_batch_size=4, grad_accum=1, max_steps=2,
                                    warmup_ratio=0.0, schedule="constant", betas=[0.9, 0.95], eps=1e-8,
                                    weight_decay=0.0, max_grad_norm=1.0, checkpoint_every=0, log_every=1), **kw})


def _yaml(tmp_path, text: str) -> dict:
    (tmp_path / "algo.yaml").write_text(text)
    cfg = OmegaConf.create({"scale": {"max_new_tokens": 6}, "algo": OmegaConf.load(tmp_path / "algo.yaml")})
    hp = OmegaConf.to_container(cfg.algo, resolve=True)
    hp.pop("name")
    return hp


def test_a_throwaway_pairwise_loss(throwaways, tok, tmp_path):
    algo = registry.get("tmp_sq")
    assert families.of(algo).name == "pairwise" and algo.meta()["family"] == "pairwise"
    # (a) step 2: its yaml validates against the schema the loss signature gives
    hp = _yaml(tmp_path, "name: tmp_sq\nbeta: 0.2\nmargin: 0.5\n")
    assert validate("tmp_sq", hp) == {"beta": 0.2, "margin": 0.5}
    with pytest.raises(ValueError, match=r"^tmp_sq: algo.beta must be > 0, got -1.0$"):
        validate("tmp_sq", {"beta": -1.0})
    # (a) step 3: the loop's objective on a hand-made batch equals the hand computation
    model, ref_model = random_qwen2(len(tok), 0), random_qwen2(len(tok), 1)
    batch = collate("pairs", tok, PAIRS[:4], 64)
    loss, _ = families.of(algo).objective(model, Reference(ref_model), batch, algo, hp,
                                          StepContext(examples=8, tokens=1))
    with torch.no_grad():
        mask = batch["completion_mask"][:, 1:].float()
        seq = (token_logps(model, batch["input_ids"], batch["attention_mask"]) * mask).sum(-1)
        ref = (token_logps(ref_model, batch["input_ids"], batch["attention_mask"]) * mask).sum(-1)
    margin = (seq[:4] - ref[:4]) - (seq[4:] - ref[4:])
    assert loss.item() == pytest.approx(float(((0.2 * margin - 0.5) ** 2).sum() / 8), rel=1e-5)
    state = train(random_qwen2(len(tok), 0), Reference(random_qwen2(len(tok), 0)), tok, algo, hp, PAIRS,
                  _trainer(), max_length=64, seed=0, progress=False)
    assert state.step == 2 and all(loss == loss for _, loss in state.loss_curve)


def test_a_throwaway_policy_gradient_method(throwaways, tok, tmp_path):
    algo = registry.get("tmp_pg")
    assert families.of(algo).name == "online_policy_gradient" and algo.meta()["reference_free"] is True
    hp = _yaml(tmp_path, "name: tmp_pg\nnum_samples: 2\nmax_new_tokens: ${scale.max_new_tokens}\n"
                         "rewards: {parity: 1.0}\naccuracy_reward: parity\nadvantage: group_zscore\nscale: 2.0\n")
    assert validate("tmp_pg", hp)["scale"] == 2.0
    # the objective on a hand-made batch: on-policy ratio 1, so the loss is -scale * token mean of A, weighted by
    # the micro-batch's share of the update's completions
    model = random_qwen2(len(tok), 0)
    ids = torch.randint(3, len(tok), (2, 7), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros_like(ids)
    completion[0, 3:], completion[1, 4:6] = 1, 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion,
             "advantages": torch.tensor([1.0, -0.5]), "examples": 2}
    loss, stats = families.of(algo).objective(model, Reference(None), batch, algo, hp,
                                              StepContext(examples=4, tokens=6))
    mask = completion[:, 1:].float()
    by_hand = -2.0 * float((torch.tensor([[1.0], [-0.5]]) * mask).sum() / mask.sum()) * 2 / 4
    assert loss.item() == pytest.approx(by_hand, rel=1e-6) and stats["pg/ratio_mean"] == 1.0
    state = train(model, Reference(None), tok, algo, hp, PROMPTS, _trainer(), max_length=64, seed=0,
                  progress=False)
    assert state.step == 2 and len(state.reward_curve) == 2
