"""The same loop on DeepSpeed (ZeRO 0, 2, 3) on CPU with gloo: one and two ranks give the plain torch run.

The DeepSpeed runs happen in worker processes (this file run as a script: ``python tests/test_deepspeed.py OUT``),
so no process group or DeepSpeed state leaks into the pytest process: one process for world size 1, two for world
size 2 (MASTER_ADDR/PORT, RANK, WORLD_SIZE set as torchrun would). Each worker runs every scenario once and writes
its results; the tests compare them with the plain TorchEngine run computed here. The first DeepSpeed start on a
fresh machine compiles an op (~40-70 s, cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import spawn_ranks

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "deepspeed"
STAGES = (0, 2, 3)
WORKER_TIMEOUT = 600

PAIRS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}",
          "rejected": f" {2 * i + 1}\n#### {2 * i + 1}"} for i in range(12)]
# uneven completion lengths (so ranks see different token counts) and 10 examples (a short last step of 2)
SFT = [{"prompt": p["prompt"], "completion": p["chosen"] + "x" * (3 * (i % 5))} for i, p in enumerate(PAIRS[:10])]
PROMPT = "Question: 4+4?\nAnswer:"
PROMPTS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "answer": str(2 * i)} for i in range(8)]
#: Online runs: a reward a random model earns about half the time, so each rank keeps a different number of samples
ONLINE_HP = {"rewards": {"parity": 1.0}, "accuracy_reward": "parity", "max_new_tokens": 6, "num_samples": 2}
ONLINE = ("sgrpo", "rft", "dapo")


def parity_reward(completions, answers):
    return torch.tensor([float(bool(c) and ord(c[0]) % 2 == 0) for c in completions])


def trainer(**kw):
    base = dict(lr=3e-3, epochs=1, micro_batch_size=2, grad_accum=2, max_steps=None, warmup_ratio=0.1,
                schedule="cosine", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01, max_grad_norm=0.5,
                checkpoint_every=0, log_every=1, precision="fp32")
    return OmegaConf.create({**base, **kw})


#: name -> (algo, examples, trainer overrides, lora)
RUNS = {
    "dpo": ("dpo", PAIRS, {}, False),
    "sft": ("sft", SFT, {"epochs": 2}, False),
    "dpo_lora": ("dpo", PAIRS, {"lr": 1e-2}, True),  # reference = the same network with its adapters disabled
}
RESUME = dict(epochs=3, checkpoint_every=2)  # 9 steps; cut during step 5, after the checkpoint at step 4
RESUMES = {"zero2": (2, False), "zero3": (3, False), "zero3_lora": (3, True)}


def ds_config(stage: int) -> dict:
    """The shipped conf/deepspeed/zero<stage>.yaml; ZeRO-3 partitions even tiny tensors (so the test partitions)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"zero{stage}.yaml"))
    if stage == 3:
        cfg["zero"].update(stage3_param_persistence_threshold=0, model_persistence_threshold=0)
    return cfg


def tiny_model(vocab: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                                        tie_word_embeddings=True))


def run_train(tok, algo_name, examples, tr, *, lora=False, deepspeed=None, checkpoint_dir=None, log=None,
              hparams=None):
    """(model, state, grad norms) of one run through posttrain.train.train."""
    from posttrain.algorithms import get
    from posttrain.models.loading import Reference, add_lora
    from posttrain.train import train

    model = tiny_model(len(tok))
    if lora:
        model = add_lora(model, OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}))
    algo = get(algo_name)
    reference = Reference(model if algo.needs_reference(hparams or {}) else None, lora=lora)
    norms = []

    def record(metrics, step):
        norms.append(metrics["train/grad_norm"])
        if log is not None:
            log(metrics, step)

    state = train(model, reference, tok, algo, hparams or {}, examples, tr, max_length=64, seed=0, progress=False,
                  checkpoint_dir=checkpoint_dir, log=record, deepspeed=deepspeed)
    return model, state, norms


def full_weights(model) -> dict:
    from posttrain.models.engine import gathered

    with gathered(model) as bare:
        return {n: p.detach().clone() for n, p in bare.named_parameters() if p.requires_grad}


def greedy(model, tok, max_new_tokens: int) -> list[int]:
    enc = tok([PROMPT], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return out[0].tolist()


def uneven_update(tok, rank: int, world_size: int, share: str, deepspeed=None):
    """One optimizer step on the three micro-batches of SFT[:6] split unevenly over the ranks (``share``:
    ``2+1`` or ``3+0``): the rank with fewer runs zero-loss padding passes; the step must equal the one-process step
    on all three. ``(loss, grad norm, trainable weights)``."""
    from posttrain.algorithms import get
    from posttrain.algorithms.memory import LoopMemory
    from posttrain.algorithms.families import FAMILIES
    from posttrain.data.collate import collate
    from posttrain.models.engine import make_engine
    from posttrain.models.loading import Reference
    from posttrain.train import optimizer_update

    model = tiny_model(len(tok))
    engine = make_engine(model, trainer(), 1, deepspeed)
    batches = [{**collate("selfplay_chosen", tok, SFT[i:i + 2], 64), "examples": 2} for i in (0, 2, 4)]
    if share == "none":  # no micro-batch on any rank: the weights must not move
        batches = []
    elif world_size > 1:
        first = {"2+1": 2, "3+0": 3}[share]
        batches = batches[:first] if rank == 0 else batches[first:]
    objective = FAMILIES["supervised"].objective
    loss, _, norm, _ = optimizer_update(engine, engine.model, Reference(None), objective, get("sft"),
                                        {}, batches, LoopMemory())
    weights = full_weights(model)
    if hasattr(engine, "close"):
        engine.close()
    return loss, norm, weights


def value_head_fit(rank: int, world_size: int) -> dict:
    """PPO's value head fitted on this rank's half of a rollout (all of it alone), after each rank's random stream
    went its own way: every rank must end with the head one process fits on the whole rollout."""
    from posttrain.algorithms.critic import ValueHead, fit_value_head
    from posttrain.algorithms.hparams import ROLLOUT_DEFAULTS

    g = torch.Generator().manual_seed(0)
    hidden, width = 8, 5
    h, returns = torch.randn(4, width, hidden, generator=g), torch.randn(4, width, generator=g)
    mask = torch.rand(4, width, generator=g) > 0.3
    rows = [0, 1, 2, 3] if world_size == 1 else ([0, 1] if rank == 0 else [2, 3])
    torch.manual_seed(100 + rank)  # as after sampling different amounts per rank
    critic = ValueHead(hidden, 1e-2, "cpu", seed=7)
    fit_value_head(critic.head, critic.optimizer, [(slice(0, len(rows)), width + 1, h[rows])],
                   torch.zeros(len(rows), width), returns[rows], mask[rows], dict(ROLLOUT_DEFAULTS))
    return {n: p.detach().clone() for n, p in critic.head.named_parameters()}


# ------------------------------------------------------------------------------------------------- the worker

def worker(out: Path) -> None:
    """Every scenario on this rank's DeepSpeed engines; results to out/rank<r>.json (+ .pt weights)."""
    torch.set_num_threads(1)
    from posttrain.data.tokenizer import build_char_tokenizer
    from posttrain.models.distributed import all_reduce_sum, is_main_process, setup_distributed
    from posttrain.models.engine import gathered

    info = setup_distributed()
    tok = build_char_tokenizer(out / f"tok{info.rank}")
    results, weights = {"rank": info.rank, "world_size": info.world_size, "source": info.source}, {}
    weights["value_head"] = value_head_fit(info.rank, info.world_size)
    for stage in STAGES:
        for name, (algo, examples, overrides, lora) in RUNS.items():
            model, state, norms = run_train(tok, algo, examples, trainer(**overrides), lora=lora,
                                            deepspeed=ds_config(stage))
            key = f"{name}/zero{stage}"
            results[key] = {"loss_curve": state.loss_curve, "grad_norms": norms, "examples": state.examples,
                            "tokens": state.tokens}
            weights[key] = full_weights(model)
            if stage == 3 and name == "dpo":
                # every rank gathers; then each generates on its own, a different length per rank, and rank 0
                # alone once more (a forward no other rank joins): must not hang
                with gathered(model) as bare:
                    results["generate"] = greedy(bare, tok, 6 + 5 * info.rank)
                    if is_main_process():
                        results["generate_rank0_only"] = greedy(bare, tok, 9)
                # and training goes on afterwards: the partitions are intact
                results["after_gather"] = all_reduce_sum([1.0])[0]
        if stage == 3:  # generation under ZeRO-3 gathers first; ranks sample, keep and filter different amounts
            from posttrain.rewards import REWARD_FUNCTIONS

            REWARD_FUNCTIONS["parity"] = parity_reward
            for algo in ONLINE:
                model, state, _ = run_train(tok, algo, PROMPTS, trainer(max_steps=2), deepspeed=ds_config(stage),
                                            hparams=ONLINE_HP)
                results[f"online/{algo}"] = {"loss_curve": state.loss_curve, "reward_curve": state.reward_curve}
                weights[f"online/{algo}"] = full_weights(model)
        if stage:
            for share in ("2+1", "3+0", "none"):
                loss, norm, w = uneven_update(tok, info.rank, info.world_size, share, ds_config(stage))
                results[f"uneven/{share}/zero{stage}"] = {"loss": loss, "norm": norm}
                weights[f"uneven/{share}/zero{stage}"] = w
    for key, (stage, lora) in RESUMES.items():
        ckpt = out / f"ckpt_{key}"

        class Preempted(Exception):
            pass

        def cut(metrics, step):
            if step == 5:
                raise Preempted

        full_model, full, _ = run_train(tok, "dpo", PAIRS, trainer(**RESUME), lora=lora, deepspeed=ds_config(stage))
        try:
            run_train(tok, "dpo", PAIRS, trainer(**RESUME), lora=lora, deepspeed=ds_config(stage), checkpoint_dir=ckpt,
                      log=cut)
        except Preempted:
            pass
        saved = torch.load(ckpt / "checkpoint.pt", weights_only=False)
        resumed_model, resumed, _ = run_train(tok, "dpo", PAIRS, trainer(**RESUME), lora=lora,
                                              deepspeed=ds_config(stage), checkpoint_dir=ckpt)
        results[f"resume/{key}"] = {
            "full": full.loss_curve, "resumed": resumed.loss_curve, "resumed_from": resumed.resumed_from,
            "saved_step": saved["state"]["step"],
            "tags": sorted(p.name for p in (ckpt / "deepspeed").iterdir() if p.is_dir())}
        weights[f"resume/{key}/full"] = full_weights(full_model)
        weights[f"resume/{key}/resumed"] = full_weights(resumed_model)
    torch.save(weights, out / f"rank{info.rank}.pt")
    (out / f"rank{info.rank}.json").write_text(json.dumps(results))


# ------------------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from posttrain.data.tokenizer import build_char_tokenizer

    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def plain(tok):
    """The plain TorchEngine runs (this process: no DeepSpeed, no process group)."""
    out = {}
    for name, (algo, examples, overrides, lora) in RUNS.items():
        model, state, norms = run_train(tok, algo, examples, trainer(**overrides), lora=lora)
        out[name] = {"loss_curve": state.loss_curve, "grad_norms": norms, "examples": state.examples,
                     "tokens": state.tokens, "weights": full_weights(model), "model": model}
    loss, norm, weights = uneven_update(tok, 0, 1, "all")
    out["uneven"] = {"loss": loss, "norm": norm, "weights": weights}
    out["value_head"] = value_head_fit(0, 1)
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["world1", "world2"])
def ranks(request, tmp_path_factory):
    return spawn_ranks(__file__, tmp_path_factory.mktemp(f"ds_world{request.param}"), request.param, WORKER_TIMEOUT)


def _close_curves(got, want, tol=1e-5):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=tol)


def _close_weights(got: dict, want: dict, atol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", list(RUNS))
def test_deepspeed_runs_the_same_training_as_the_plain_engine(ranks, plain, name, stage):
    ref = plain[name]
    for result in ranks:
        got = result[f"{name}/zero{stage}"]
        _close_curves(got["loss_curve"], ref["loss_curve"])
        assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
        assert (got["examples"], got["tokens"]) == (ref["examples"], ref["tokens"]), "counts over all ranks"
        _close_weights(result["weights"][f"{name}/zero{stage}"], ref["weights"])


@pytest.mark.slow
def test_zero3_generates_inside_gathered_on_every_rank_without_hanging(ranks, plain, tok):
    model = plain["dpo"]["model"]
    for result in ranks:
        r = result["rank"]
        assert result["generate"] == greedy(model, tok, 6 + 5 * r), "the gathered weights are the trained ones"
        assert result["after_gather"] == len(ranks), "every rank reached the collective after the context"
    assert ranks[0]["generate_rank0_only"] == greedy(model, tok, 9)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RESUMES))
def test_resume_from_a_deepspeed_checkpoint_equals_the_uninterrupted_run(ranks, key):
    for result in ranks:
        got = result[f"resume/{key}"]
        assert got["saved_step"] == 4 and got["resumed_from"] == 4
        assert len(got["full"]) == 9 and [s for s, _ in got["resumed"]] == list(range(1, 10))
        _close_curves(got["resumed"], got["full"], tol=1e-6)
        _close_weights(result["weights"][f"resume/{key}/resumed"], result["weights"][f"resume/{key}/full"], atol=1e-6)
        assert got["tags"] == ["step6", "step8"], "only the newest two DeepSpeed tags are kept"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("share", ["2+1", "3+0"])
def test_ranks_with_fewer_micro_batches_pad_the_step_and_it_equals_the_one_process_step(ranks, plain, share, stage):
    """Online rollouts give ranks different micro-batch counts (DAPO's filter, RFT's verifier): ZeRO-2/3 must not
    hang, and the update (normalised over all ranks' tokens) must be the single-process update."""
    ref = plain["uneven"]
    for result in ranks:
        got = result[f"uneven/{share}/zero{stage}"]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-4)
        _close_weights(result["weights"][f"uneven/{share}/zero{stage}"], ref["weights"])


@pytest.mark.slow
def test_ppo_value_head_is_fitted_on_all_ranks_rollouts_and_is_the_same_on_every_rank(ranks, plain):
    for result in ranks:
        _close_weights(result["weights"]["value_head"], plain["value_head"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_an_update_with_no_micro_batch_on_any_rank_leaves_the_weights(ranks, tok, stage):
    initial = {n: p.detach().clone() for n, p in tiny_model(len(tok)).named_parameters()}
    for result in ranks:
        assert result[f"uneven/none/zero{stage}"] == {"loss": 0.0, "norm": 0.0}
        _close_weights(result["weights"][f"uneven/none/zero{stage}"], initial, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ONLINE)
def test_online_methods_run_under_zero3_with_every_rank_sampling_its_own_prompts(ranks, algo):
    """No hang and finite losses when each rank generates, keeps and filters its own amount (the update's maths
    under uneven splits is checked exactly by the uneven_update tests above)."""
    curves = [r[f"online/{algo}"] for r in ranks]
    for got in curves:
        assert [s for s, _ in got["loss_curve"]] == [1, 2] and len(got["reward_curve"]) == 2
        assert all(math.isfinite(loss) for _, loss in got["loss_curve"])
    assert all(c == curves[0] for c in curves), "the logged step loss and rollout mean are global"
    for result in ranks[1:]:
        _close_weights(result["weights"][f"online/{algo}"], ranks[0]["weights"][f"online/{algo}"], atol=0)


@pytest.mark.slow
def test_ranks_agree_and_come_from_the_environment(ranks):
    world = len(ranks)
    assert [r["rank"] for r in ranks] == list(range(world))
    assert all(r["world_size"] == world for r in ranks)
    assert {r["source"] for r in ranks} == {"single" if world == 1 else "torchrun"}
    if world > 1:
        _close_weights(ranks[1]["weights"]["dpo/zero3"], ranks[0]["weights"]["dpo/zero3"], atol=0)


# ------------------------------------------------------------------------------------------------- fast unit tests

def test_make_engine_is_the_torch_engine_unless_deepspeed_is_enabled(tok):
    from posttrain.models.engine import TorchEngine, make_engine

    model = tiny_model(len(tok))
    assert isinstance(make_engine(model, trainer(), 3, None), TorchEngine)
    assert isinstance(make_engine(model, trainer(), 3, OmegaConf.load(CONF / "none.yaml")), TorchEngine)


@pytest.mark.parametrize("name", ["zero0", "zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_deepspeed_config_comes_from_the_trainer_config(name):
    from posttrain.models.engine import deepspeed_config, deepspeed_enabled

    ds = OmegaConf.load(CONF / f"{name}.yaml")
    assert deepspeed_enabled(ds)
    tr = trainer(micro_batch_size=3, grad_accum=4, precision="bf16-mixed")
    cpu = deepspeed_config(tr, ds, world_size=2, cuda=False)
    assert cpu["train_micro_batch_size_per_gpu"] == 3 and cpu["train_batch_size"] == 6
    assert cpu["gradient_accumulation_steps"] == 1 and cpu["managed_gradient_accumulation"] is False
    assert cpu["gradient_clipping"] == 0.5
    assert cpu["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                             "weight_decay": 0.01, "torch_adam": True}}
    assert cpu["bf16"] == {"enabled": True}, "bf16-mixed is DeepSpeed's bf16 mode, on CPU as on GPU"
    assert cpu["zero_optimization"]["stage"] == ds.stage
    assert cpu.get("data_types") == ({"grad_accum_dtype": "fp32"} if ds.stage == 3 else None), \
        "ZeRO-3 + bf16 sums the step's micro-batch gradients in float32, as the plain engine"
    offload = "offload" in name
    assert cpu.get("zero_force_ds_cpu_optimizer", True) is not offload
    gpu = deepspeed_config(tr, ds, world_size=8, cuda=True)
    assert gpu["bf16"] == {"enabled": True} and gpu["train_batch_size"] == 24
    assert gpu["optimizer"]["params"]["torch_adam"] is not offload, "DeepSpeed's CPU Adam for GPU + offload"
    assert deepspeed_config(trainer(precision="fp32"), ds, world_size=1, cuda=True)["bf16"] == {"enabled": False}


def test_deepspeed_config_rejects_unknown_keys_and_merges_extra_config():
    from posttrain.models.engine import deepspeed_config

    with pytest.raises(ValueError, match="unknown deepspeed option"):
        deepspeed_config(trainer(), {"enabled": True, "stage": 2, "stgae3_prefetch": 1}, world_size=1, cuda=False)
    with pytest.raises(ValueError, match="stage must be"):
        deepspeed_config(trainer(), {"enabled": True, "stage": 4}, world_size=1, cuda=False)
    cfg = deepspeed_config(trainer(), {"enabled": True, "stage": 2, "config": {"steps_per_print": 5,
                                       "zero_optimization": {"round_robin_gradients": True}}}, world_size=1, cuda=False)
    assert cfg["steps_per_print"] == 5 and cfg["zero_optimization"] == {"stage": 2, "round_robin_gradients": True}


@pytest.mark.parametrize("n,micro,accum,world", [(12, 2, 2, 2), (10, 2, 2, 2), (9, 1, 4, 4), (13, 3, 2, 2),
                                                 (5, 1, 8, 8), (7, 4, 2, 2)])
def test_step_batches_shard_every_step_over_the_ranks(n, micro, accum, world):
    from posttrain.train import plan, step_batches

    examples = list(range(n))
    tr = trainer(micro_batch_size=micro, grad_accum=accum, epochs=2)
    total = plan(n, tr)[1]
    single = list(step_batches(examples, tr, 0, 0, total))
    shards = [list(step_batches(examples, tr, 0, 0, total, rank, world)) for rank in range(world)]
    for step, whole in enumerate(single):
        mine = [s[step] for s in shards]
        counts = {len(m) for m in mine}
        assert len(counts) == 1 and 0 not in counts, "every rank runs the same number of micro-batches"
        assert all(0 < len(mb) <= micro for m in mine for mb in m)
        flat = sorted(x for m in mine for mb in m for x in mb)
        want = sorted(x for mb in whole for x in mb)
        if len(want) >= world * len(mine[0]):
            assert flat == want, "the ranks together see exactly the step's examples"
        else:
            assert set(flat) == set(want), "a step shorter than its slots repeats its own examples"
        if len(want) == micro * accum:
            assert sorted(mb for m in mine for mb in m) == sorted(whole), "full steps: the same micro-batches"


def test_step_batches_refuse_accumulation_that_does_not_split_over_the_ranks():
    from posttrain.train import step_batches

    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        next(step_batches(list(range(8)), trainer(grad_accum=3), 0, 0, 2, 0, 2))


def test_distributed_setup_reads_torchrun_slurm_or_nothing(monkeypatch):
    from posttrain.models import distributed

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SUBMITIT_EXECUTOR", "SLURM_JOB_ID")}
    monkeypatch.setattr(os, "environ", dict(env))
    info = distributed.discover()
    assert (info.rank, info.world_size, info.source) == (0, 1, "single")
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_PORT"].isdigit()

    monkeypatch.setattr(os, "environ", dict(env, RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="n1",
                                            MASTER_PORT="29500"))
    info = distributed.discover()
    assert (info.rank, info.local_rank, info.world_size, info.source) == (3, 1, 4, "torchrun")

    slurm = dict(env, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_PROCID="5", SLURM_LOCALID="1",
                 SLURM_NTASKS="8", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1")
    monkeypatch.setattr(os, "environ", dict(slurm))
    info = distributed.discover()
    assert (info.rank, info.local_rank, info.world_size, info.source) == (5, 1, 8, "slurm")
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(distributed.PORT_BASE + 4242 % distributed.PORT_SPAN)
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("5", "1", "8")

    monkeypatch.setattr(os, "environ", dict(slurm, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1"))
    info = distributed.discover()  # one task (the local Slurm's tiny runs): a free local port, not a derived one
    assert (info.rank, info.world_size, info.source) == (0, 1, "slurm") and os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_gathered_is_a_no_op_without_zero3(tok):
    from posttrain.models.engine import gathered

    model = tiny_model(len(tok))
    before = copy.deepcopy(model.state_dict())
    with gathered(model) as bare:
        assert bare is model
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
