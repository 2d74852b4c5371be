"""KTO's reference point z0 over the whole optimizer step (issue 11): mismatched partners drawn across the step's
examples (never the row itself, never its own prompt's other completion), the anchor reduced over micro-batches and
ranks, so z0 and the step are the same for micro-batch 1 x 8 accumulation, 8 x 1 and 2 ranks x (1 x 4).

The two-rank runs happen in worker processes (this file run as a script: ``python tests/test_kto_anchor.py OUT``,
as tests/test_deepspeed.py does), DeepSpeed on CPU with gloo.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest's helpers, also in the worker processes

from conftest import Preempted, cut_at, random_qwen2, spawn_ranks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT = 600

#: The unpaired form of self-play pairs (data/selfplay.py): each prompt twice, desirable chosen + undesirable rejected.
PAIRS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}",
          "rejected": f" {2 * i + 1}\n#### {2 * i + 1}" + "y" * (i % 3)} for i in range(8)]
UNPAIRED = [{"prompt": p["prompt"], "completion": c, "desirable": d}
            for p in PAIRS for c, d in ((p["chosen"], True), (p["rejected"], False))]
STEP = UNPAIRED[:8]  # one optimizer step of 8 examples: 4 prompts, each with both of its completions
SPLITS = {"1x8": (1, 8), "8x1": (8, 1), "2x4": (2, 4)}


def trainer(**kw):
    base = dict(lr=1e-3, epochs=1, micro_batch_size=8, grad_accum=1, max_steps=None, warmup_ratio=0.1,
                schedule="cosine", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01, max_grad_norm=1.0,
                checkpoint_every=0, log_every=1)
    return OmegaConf.create({**base, **kw})


def run(tok, name, examples, tr, *, lora=False, deepspeed=None, hparams=None, **kw):
    """(model, state, logged metrics, reference) of one run of the loop; the reference is a second random model
    (a LoRA run's: the adapter-disabled base)."""
    from posttrain.algorithms import get
    from posttrain.models.loading import Reference, add_lora
    from posttrain.train import train

    model = random_qwen2(len(tok), 0)
    if lora:
        model = add_lora(model, OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}))
        reference = Reference(model, lora=True)
    else:
        reference = Reference(random_qwen2(len(tok), 1))
    logged = []
    user_log = kw.pop("log", None)

    def log(metrics, step):
        logged.append(metrics)
        if user_log is not None:
            user_log(metrics, step)

    state = train(model, reference, tok, get(name), hparams or {}, examples, tr, max_length=64, seed=0,
                  progress=False, log=log, deepspeed=deepspeed, **kw)
    return model, state, logged, reference


def weights(model) -> dict:
    from posttrain.models.engine import gathered

    with gathered(model) as bare:
        return {n: p.detach().clone() for n, p in bare.named_parameters() if p.requires_grad}


def annotated_step(examples, tr, step=0, seed=0, rank=0, world_size=1):
    """The loop's own micro-batches of batch ``step``, annotated by the unpaired family's step hook."""
    from posttrain.algorithms import get
    from posttrain.algorithms import families
    from posttrain.train import step_batches

    annotate = families.of(get("kto")).step_hook(get("kto"), {}, pool=examples, seed=seed)
    return list(step_batches(examples, tr, seed, step, step + 1, rank, world_size, annotate))[0]


# ------------------------------------------------------------------------------------------------- the worker

def uneven_anchor(tok, rank: int, world_size: int, deepspeed) -> dict:
    """The anchor pass alone on ZeRO-3 with the step's 4 micro-batches split 3 + 1 over two ranks (a rank with fewer
    runs one-token forwards): z0 and the own rows' reference log-probs."""
    from posttrain.algorithms import get
    from posttrain.algorithms.memory import LoopMemory
    from posttrain.algorithms import families
    from posttrain.models.engine import make_engine
    from posttrain.models.loading import Reference

    micro_batches = annotated_step(STEP, trainer(micro_batch_size=2, grad_accum=4))
    if world_size > 1:
        micro_batches = micro_batches[:3] if rank == 0 else micro_batches[3:]
    model = random_qwen2(len(tok), 0)
    engine = make_engine(model, trainer(), 1, deepspeed)
    reference = Reference(random_qwen2(len(tok), 1))
    prepare = families.of(get("kto")).prepare
    [batches], _ = prepare(engine.model, reference, tok, get("kto"), {}, micro_batches, max_length=64,
                           seed=0, step=0, memory=LoopMemory(), pool=STEP)
    out = {"z0": float(batches[0]["kl_anchor"]), "ref_logps": [float(v) for b in batches for v in b["ref_logps"]],
           "reference_calls": reference.calls}
    if hasattr(engine, "close"):
        engine.close()
    return out


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    from posttrain.data.tokenizer import build_char_tokenizer
    from posttrain.models.distributed import setup_distributed

    info = setup_distributed()
    tok = build_char_tokenizer(out / f"tok{info.rank}")
    results, saved = {"rank": info.rank, "world_size": info.world_size}, {}
    for key, (name, stage, lora, micro, accum, examples) in WORKER_RUNS.items():
        model, state, logged, reference = run(tok, name, examples, trainer(micro_batch_size=micro, grad_accum=accum),
                                              lora=lora, deepspeed=ds_config(stage))
        results[key] = {"kl_anchor": [m.get("train/kl_anchor") for m in logged], "loss": state.loss_curve,
                        "grad_norm": [m["train/grad_norm"] for m in logged], "reference_calls": reference.calls}
        saved[key] = weights(model)
    results["uneven"] = uneven_anchor(tok, info.rank, info.world_size, ds_config(3))
    torch.save(saved, out / f"rank{info.rank}.pt")
    (out / f"rank{info.rank}.json").write_text(json.dumps(results))


def ds_config(stage: int) -> dict:
    """The shipped conf/deepspeed/zero<stage>.yaml; ZeRO-3 partitions even tiny tensors (so the test partitions)."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "deepspeed" / f"zero{stage}.yaml"))
    if stage == 3:
        cfg["zero"].update(stage3_param_persistence_threshold=0, model_persistence_threshold=0)
    return cfg


#: name -> (algo, ZeRO stage, lora, micro-batch size, grad_accum over all ranks, examples); 2 ranks each
WORKER_RUNS = {
    "kto/zero2": ("kto", 2, False, 1, 8, UNPAIRED),  # 2 ranks x (1 x 4): two steps of 8
    "kto_lora/zero3": ("kto", 3, True, 1, 8, UNPAIRED),  # reference = adapter-disabled ZeRO-3 network (collective)
    "bco/zero2": ("bco_unpaired", 2, False, 1, 8, UNPAIRED),  # BCO's first step: the whole step's mean reward
}


# ------------------------------------------------------------------------------------------------- partners

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from posttrain.data.tokenizer import build_char_tokenizer

    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _owner(completion: str) -> dict:
    return next(e for e in UNPAIRED if e["completion"] == completion)


def test_partners_are_the_steps_own_completions_of_other_prompts():
    from posttrain.data.collate import mismatched_partners

    step = [STEP[i] for i in (5, 0, 3, 6, 1, 7, 2, 4)]
    annotated = mismatched_partners(step, pool=[], seed=0, step=0)  # an empty pool: nothing may come from it
    assert [{k: e[k] for k in ("prompt", "completion", "desirable")} for e in annotated] == step
    for example in annotated:
        partner = _owner(example["kl_completion"])
        assert partner["prompt"] != example["prompt"], "never the row itself nor its own prompt's other completion"
    assert Counter(e["kl_completion"] for e in annotated) == Counter(e["completion"] for e in step), \
        "a permutation of the step's own completions, as TRL's rotation"
    assert mismatched_partners(step, pool=[], seed=5, step=9) == annotated, "no draw: seed and step play no part"

    # one prompt holds more than half the step: its rows take the other prompt's completion, that row one of theirs
    a, b = "Question: 1+1?\nAnswer:", "Question: 2+2?\nAnswer:"
    skewed = [{"prompt": a, "completion": f" a{i}", "desirable": True} for i in range(3)] + \
        [{"prompt": b, "completion": " b", "desirable": False}]
    got = mismatched_partners(skewed, pool=[], seed=0, step=0)
    assert [e["kl_completion"] for e in got[:3]] == [" b"] * 3 and got[3]["kl_completion"] in {" a0", " a1", " a2"}


def test_a_step_without_another_prompt_draws_its_partner_from_the_training_set():
    from posttrain.data.collate import mismatched_partners

    drawn = []
    for step in range(20):
        [one] = mismatched_partners([UNPAIRED[0]], pool=UNPAIRED, seed=0, step=step)
        assert _owner(one["kl_completion"])["prompt"] != UNPAIRED[0]["prompt"]
        assert mismatched_partners([UNPAIRED[0]], pool=UNPAIRED, seed=0, step=step) == [one], "seeded by (seed, step)"
        drawn.append(one["kl_completion"])
    assert len(set(drawn)) > 5, "a fresh draw per step"
    other_seed = [mismatched_partners([UNPAIRED[0]], pool=UNPAIRED, seed=1, step=s)[0]["kl_completion"]
                  for s in range(20)]
    assert other_seed != drawn
    # a step of one prompt (its two completions): both partners from the pool, neither from that prompt
    for example in mismatched_partners(UNPAIRED[:2], pool=UNPAIRED, seed=0, step=3):
        assert _owner(example["kl_completion"])["prompt"] != UNPAIRED[0]["prompt"]
    with pytest.raises(ValueError, match="at least two prompts"):
        mismatched_partners(UNPAIRED[:2], pool=UNPAIRED[:2], seed=0, step=0)


@pytest.mark.parametrize("split,world", [("1x8", 1), ("8x1", 1), ("2x4", 1), ("1x8", 2), ("2x4", 2)])
def test_partners_are_decided_on_the_whole_step_whatever_the_split(split, world):
    micro, accum = SPLITS[split]
    whole = sorted((e["prompt"], e["completion"], e["kl_completion"])
                   for mb in annotated_step(UNPAIRED, trainer(micro_batch_size=8, grad_accum=1), step=1) for e in mb)
    shards = [annotated_step(UNPAIRED, trainer(micro_batch_size=micro, grad_accum=accum), step=1, rank=r,
                             world_size=world) for r in range(world)]
    assert sorted((e["prompt"], e["completion"], e["kl_completion"]) for s in shards for mb in s for e in mb) == whole


# ------------------------------------------------------------------------------------------------- the anchor

def _hand_z0(tok, examples: list[dict]) -> float:
    """z0 by hand: each mismatched pair (x_i, y'_i) alone through both models, full-vocabulary log-softmax summed
    over the completion tokens (and its EOS), then max(0, mean of the differences)."""
    policy, ref = random_qwen2(len(tok), 0), random_qwen2(len(tok), 1)
    diffs = []
    for e in examples:
        prompt = tok(e["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(e["kl_completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + completion])
        scores = []
        for model in (policy, ref):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(len(prompt), ids.shape[1])))
        diffs.append(scores[0] - scores[1])
    return max(0.0, sum(diffs) / len(diffs))


@pytest.fixture(scope="module")
def plain(tok):
    """The plain-engine runs of the step splits (two steps of 8 examples) and the LoRA / BCO twins at 8 x 1."""
    out = {}
    for key, (micro, accum) in SPLITS.items():
        model, state, logged, reference = run(tok, "kto", UNPAIRED, trainer(micro_batch_size=micro, grad_accum=accum))
        out[key] = {"kl_anchor": [m["train/kl_anchor"] for m in logged], "loss": state.loss_curve,
                    "grad_norm": [m["train/grad_norm"] for m in logged], "weights": weights(model),
                    "reference_calls": reference.calls}
    for key, name, lora in (("kto_lora", "kto", True), ("bco", "bco_unpaired", False)):
        model, state, logged, _ = run(tok, name, UNPAIRED, trainer(), lora=lora)
        out[key] = {"kl_anchor": [m.get("train/kl_anchor") for m in logged], "loss": state.loss_curve,
                    "grad_norm": [m["train/grad_norm"] for m in logged], "weights": weights(model)}
    return out


def test_z0_is_the_same_for_every_split_and_equals_the_hand_computation(tok, plain):
    step = [e for mb in annotated_step(UNPAIRED, trainer()) for e in mb]
    by_hand = _hand_z0(tok, step)
    assert by_hand > 0.05, "the test's models give a z0 away from the clamp"
    # the loop sums float32 log-probs (sequences of ~50 nats: ~3e-6 rounding); the hand computation is float64
    assert plain["8x1"]["kl_anchor"][0] == pytest.approx(by_hand, abs=1e-5)
    for key in SPLITS:
        assert plain[key]["kl_anchor"][0] == pytest.approx(plain["8x1"]["kl_anchor"][0], abs=1e-6), key
        assert plain[key]["kl_anchor"][1] == pytest.approx(plain["8x1"]["kl_anchor"][1], abs=1e-6), key


def test_a_kto_step_is_the_same_for_1x8_and_8x1_accumulation(plain):
    for key in ("1x8", "2x4"):
        got, want = plain[key], plain["8x1"]
        assert [s for s, _ in got["loss"]] == [1, 2]
        for (_, a), (_, b) in zip(got["loss"], want["loss"]):
            assert a == pytest.approx(b, abs=2e-6)  # curves keep 6 decimals
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        for name, value in want["weights"].items():
            torch.testing.assert_close(got["weights"][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_one_reference_forward_per_micro_batch_and_no_mismatched_rows_in_the_gradient_forward(tok, plain):
    assert [plain[k]["reference_calls"] for k in SPLITS] == [16, 2, 8], "2 steps x micro-batches per step"
    from posttrain.algorithms import get
    from posttrain.models.loading import Reference
    from posttrain.train import train

    for name in ("kto", "apo_zero_unpaired", "bco_unpaired"):
        model = random_qwen2(len(tok), 0)
        seen = []  # (grad enabled, rows) of every policy forward
        model.register_forward_pre_hook(lambda m, args, kw: seen.append((torch.is_grad_enabled(),
                                                                         kw["input_ids"].shape[0])), with_kwargs=True)
        reference = Reference(random_qwen2(len(tok), 1))
        train(model, reference, tok, get(name), {}, UNPAIRED, trainer(micro_batch_size=4, grad_accum=2, max_steps=2),
              max_length=64, seed=0, progress=False)
        assert reference.calls == 4, name
        assert [rows for grad, rows in seen if grad] == [4] * 4, f"{name}: the gradient forward holds own rows only"
        no_grad = [rows for grad, rows in seen if not grad]
        # KTO: the mismatched rows of each micro-batch; BCO: its own rows once, at the first step (the step mean)
        assert no_grad == {"kto": [4] * 4, "apo_zero_unpaired": [], "bco_unpaired": [4, 4]}[name], name


def test_bco_first_step_shifts_by_the_whole_steps_mean(plain, tok):
    """Before BCO's running mean exists the whole step's mean stands in, not each micro-batch's (which at
    micro-batch 1 is the row's own reward: every first-step loss would be log 2)."""
    model, state, _, _ = run(tok, "bco_unpaired", UNPAIRED, trainer(micro_batch_size=1, grad_accum=8, max_steps=1))
    assert state.loss_curve[0][1] == pytest.approx(plain["bco"]["loss"][0][1], abs=2e-6)  # curves keep 6 decimals
    assert abs(state.loss_curve[0][1] - 0.693147) > 1e-3


def test_kto_objective_refuses_a_batch_without_the_steps_anchor(tok):
    from posttrain.algorithms import get
    from posttrain.algorithms import families
    from posttrain.algorithms.objectives import StepContext
    from posttrain.data.collate import collate
    from posttrain.models.loading import Reference

    batch = collate("unpaired", tok, STEP[:2], 64)
    with pytest.raises(ValueError, match="kl_anchor"):
        families.FAMILIES["unpaired"].objective(random_qwen2(len(tok)), Reference(random_qwen2(len(tok), 1)), batch,
                                                get("kto"), {}, StepContext(examples=2, tokens=1))


def test_resume_equals_uninterrupted_with_partners_drawn_from_the_pool(tok, tmp_path):
    """Steps of one example (micro-batch 1, no accumulation): every partner is drawn from the training set, seeded
    by (seed, step), so the resumed run draws what the uninterrupted one drew."""
    tr = trainer(micro_batch_size=1, grad_accum=1, max_steps=9, checkpoint_every=2)
    full_model, full, logged, _ = run(tok, "kto", UNPAIRED, tr)
    assert len({round(m["train/kl_anchor"], 9) for m in logged}) > 3
    with pytest.raises(Preempted):
        run(tok, "kto", UNPAIRED, tr, checkpoint_dir=tmp_path, log=cut_at(5))
    resumed_model, resumed, resumed_logged, _ = run(tok, "kto", UNPAIRED, tr, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 4 and [s for s, _ in resumed.loss_curve] == list(range(1, 10))
    for (_, a), (_, b) in zip(full.loss_curve, resumed.loss_curve):
        assert a == pytest.approx(b, abs=1e-6)
    assert [m["train/kl_anchor"] for m in resumed_logged] == pytest.approx(
        [m["train/kl_anchor"] for m in logged[4:]], abs=1e-6)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- two ranks

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(__file__, tmp_path_factory.mktemp("kto_world2"), 2, WORKER_TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("key,plain_key", [("kto/zero2", "8x1"), ("kto_lora/zero3", "kto_lora"),
                                           ("bco/zero2", "bco")])
def test_two_ranks_give_the_one_process_step(ranks, plain, key, plain_key):
    """2 ranks x (1 x 4) on DeepSpeed: the same z0 (all-reduced before the first backward), loss, gradient norm and
    weights as one process at 8 x 1 (and, through the test above, as 1 x 8 and the hand computation)."""
    want = plain[plain_key]
    for result in ranks:
        got = result[key]
        if want["kl_anchor"][0] is not None:
            assert got["kl_anchor"] == pytest.approx(want["kl_anchor"], abs=1e-6)
        for (_, a), (_, b) in zip(got["loss"], want["loss"]):
            assert a == pytest.approx(b, abs=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        for name, value in want["weights"].items():
            torch.testing.assert_close(result["weights"][key][name], value, atol=1e-5, rtol=1e-4, msg=name)
        assert got["reference_calls"] == 8, "each rank: 2 steps x 4 micro-batches, one reference forward each"


@pytest.mark.slow
def test_a_rank_with_fewer_micro_batches_joins_the_anchor_pass_under_zero3(ranks, tok):
    """3 + 1 micro-batches over two ZeRO-3 ranks: no hang, and z0 and the reference log-probs are the one-process
    ones (the shorter rank ran one-token forwards to match the busier one's gathers)."""
    alone = uneven_anchor(tok, 0, 1, None)
    assert [r["uneven"]["z0"] for r in ranks] == pytest.approx([alone["z0"]] * 2, abs=1e-6)
    assert ranks[0]["uneven"]["ref_logps"] + ranks[1]["uneven"]["ref_logps"] == pytest.approx(alone["ref_logps"],
                                                                                              abs=1e-5)
    assert [r["uneven"]["reference_calls"] for r in ranks] == [3, 3], "padded to the busiest rank"


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
