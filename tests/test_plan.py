"""``python -m posttrain.sweep plan`` (posttrain.sweep.plan): the arithmetic on a hand-computed two-cell grid, the
parameter count of the embedded bases, and one-line errors."""

from __future__ import annotations

import pytest

from posttrain.sweep import files, plan

# tiny-s (conf/scale/tiny-s.yaml): 512 prompts, max_new_tokens 96, raw prompts; 3 epochs; 16 samples per prompt;
# the embedded eval profile (plan.EVAL_WORK: 200 x 130 + 200 x 130 + 200 x 160 forward, 200 x 50 twice generated)
ASSUME = plan.Assumptions(tflops=1.0, mfu=0.5, gen_mfu=0.25, prompt_tokens={"raw": 100, "fewshot": 1000},
                          completion_tokens=50, pair_yield=0.5, params={"tiny-s": 1e6})


def _plans():
    cells = files.grid(["algo=dpo,sft", "scale=tiny-s"])
    assert [dict(o.split("=") for o in c.overrides)["algo"] for c in cells] == ["dpo", "sft"]
    return [plan.cell_plan(c, files.default_conf_dir(), ASSUME) for c in cells]


def test_tokens_of_each_cell_by_hand():
    dpo, sft = _plans()
    # sequence 100 + 50 = 150 tokens; 0.5 x 512 = 256 pairs; 3 epochs
    assert dpo.cost.trained == 3 * 256 * (100 + 2 * 50) == 153_600  # one row per pair: prompt + chosen + rejected
    assert dpo.ref_per_run == 153_600  # an in-loop reference packs its pairs too
    assert dpo.ref_once == 2 * 256 * 150 == 76_800  # the cache's pre-pass scores rows one by one
    assert sft.cost.trained == 3 * 256 * 150 == 115_200 and sft.ref_per_run == 0 and sft.ref_key is None
    assert dpo.selfplay == sft.selfplay == 512 * (100 + 16 * 50) == 460_800
    assert dpo.cost.eval_forward == 84_000 and dpo.cost.eval_generated == 20_000 and dpo.base_eval == (84_000, 20_000)


def test_totals_without_and_with_the_shared_caches_by_hand():
    plans = _plans()
    naive, shared = plan.totals(plans, ASSUME, shared=False), plan.totals(plans, ASSUME, shared=True)
    n = 1e6
    # without: each run its own self-play data, reference forward per epoch and base scores
    train = 6 * n * (153_600 + 115_200) + 2 * n * (153_600 + 2 * (84_000 + 84_000))
    gen = 2 * n * 2 * (460_800 + 20_000 + 20_000)
    assert (train, gen) == (2.592e12, 2.0032e12)
    assert naive["total"]["gpu_hours"] == pytest.approx((train / 0.5e12 + gen / 0.25e12) / 3600)
    assert naive["tiny-s"]["runs"] == 2 and naive["tiny-s"]["selfplay"] == 921_600
    assert naive["total"]["ref_forward"] == 153_600 and naive["total"]["eval"] == 416_000
    # with: the reference once over the 2 x 256 self-play sequences, self-play data and base scores once
    train = 6 * n * (153_600 + 115_200) + 2 * n * (76_800 + 84_000 + 84_000 + 84_000)
    gen = 2 * n * (460_800 + 20_000 + 20_000 + 20_000)
    assert (train, gen) == (2.2704e12, 1.0416e12)
    assert shared["total"]["gpu_hours"] == pytest.approx((train / 0.5e12 + gen / 0.25e12) / 3600)
    assert shared["total"]["ref_forward"] == 76_800 and shared["total"]["selfplay"] == 460_800
    assert shared["total"]["eval"] == 312_000 and shared["total"]["trained"] == naive["total"]["trained"]


def test_a_reference_the_cache_cannot_serve_is_paid_by_every_run():
    kto, ld = (plan.cell_plan(c, files.default_conf_dir(), ASSUME)
               for c in files.grid(["algo=kto,dpo", "scale=tiny-s", "+algo.ld_alpha=0.5"]))
    # kto: 3 epochs x 512 unpaired rows x 150 tokens, reference per step + z0's mismatched rows (policy + reference)
    assert kto.ref_key is None and kto.ref_per_run == 0
    assert kto.cost.forward == 3 * 512 * 150 + 3 * 512 * 150 * 2
    assert ld.ref_key is None and ld.cost.forward == ld.cost.trained == 153_600  # LD-DPO: per-token values


def test_pairs_count_their_prompt_twice_without_the_shared_prompt():
    dpo, wpo, tdpo = (plan.cell_plan(c, files.default_conf_dir(), ASSUME) for c in
                      files.grid(["algo=dpo", "scale=tiny-s", "trainer.shared_prompt=false"])
                      + files.grid(["algo=dpo", "scale=tiny-s", "+algo.wpo=true"])
                      + files.grid(["algo=tdpo", "scale=tiny-s"]))
    assert dpo.cost.trained == wpo.cost.trained == 3 * 256 * 2 * 150 == 230_400  # two rows of prompt + completion
    assert tdpo.cost.trained == 230_400  # TDPO's full-vocabulary logits: two rows


def test_max_steps_caps_the_passes():
    cell = files.grid(["algo=dpo", "scale=tiny-s", "trainer.max_steps=4"])[0]
    p = plan.cell_plan(cell, files.default_conf_dir(), ASSUME)
    assert p.cost.trained == 4 * 8 * (100 + 2 * 50)  # 4 steps of 8 pairs (micro 8 x accumulation 1)


def test_tiny_params_equal_the_built_model():
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    build = dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=256)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=plan.TINY_VOCAB, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                                         tie_word_embeddings=True))
    assert plan.tiny_params(build) == sum(p.numel() for p in model.parameters())
    assert torch is not None


def test_cli_prints_both_tables_and_the_assumptions(capsys):
    assert plan.main(["algo=dpo,sft", "scale=tiny-s", "--tflops", "1", "--mfu", "0.5", "--gen-mfu", "0.25",
                      "--prompt-tokens", "raw=100,fewshot=1000", "--completion-tokens", "50",
                      "--params", "tiny-s=1e6"]) == 0
    out = capsys.readouterr().out
    assert "without shared caches" in out and "with the shared per-scale caches" in out and "MFU 0.5" in out
    naive, shared = (2.592e12 / 0.5e12 + 2.0032e12 / 0.25e12) / 3600, (2.2704e12 / 0.5e12 + 1.0416e12 / 0.25e12) / 3600
    # self-play data and base scores shared, the reference forward in every run (153,600 tokens, not 76,800)
    middle = ((2.2704e12 + 2e6 * (153_600 - 76_800)) / 0.5e12 + 1.0416e12 / 0.25e12) / 3600
    assert out.strip().splitlines()[-1] == (f"2 runs: {naive:,.1f} GPU-h without the caches, {shared:,.1f} with them "
                                            f"({naive / shared:.2f}x); {middle:,.1f} with self-play data and base "
                                            "scores shared but reference log-probs computed in every run")


def test_sweep_cli_dispatches_plan_with_its_options_first(capsys):
    from posttrain.sweep.__main__ import main

    assert main(["plan", "--mfu", "0.5", "algo=dpo", "scale=tiny-s", "--params", "tiny-s=1e6"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("1 run: ")


@pytest.mark.parametrize("argv,message", [
    (["nonsense"], "plan takes key=value"),
    (["algo=dpo", "--mfu", "2"], "--mfu and --gen-mfu are fractions"),
    (["algo=dpo", "--params", "tiny-s"], "--params 'tiny-s': give key=value"),
    (["sweep=no_such_sweep"], "no_such_sweep"),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(SystemExit) as exc:
        plan.main(argv)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_an_online_groups_samples_share_their_prompt_copy():
    on, off = (plan.cell_plan(c, files.default_conf_dir(), ASSUME) for c in
               files.grid(["algo=grpo", "scale=tiny-s"]) + files.grid(["algo=grpo", "scale=tiny-s",
                                                                         "trainer.shared_prompt=false"]))
    # 512 prompts x 3 epochs x 4 samples; a packed row holds up to (2 x 150 - 100) // 50 = 4 samples: one prompt copy
    assert on.cost.trained == 3 * 512 * (100 + 4 * 50) == 460_800
    assert off.cost.trained == 3 * 512 * 4 * 150 == 921_600
    assert on.cost.generated_online == off.cost.generated_online  # generation is untouched
