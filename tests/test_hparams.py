"""The one hyperparameter schema (posttrain.algorithms.hparams): every algorithm validates its own conf/algo yaml, the
registry entries' options are values of that schema, and each kind of bad input is one exact line."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from posttrain.algorithms import ALGORITHMS
from posttrain.algorithms.hparams import LOOP_OPTIONS, PAIRWISE_OPTIONS, ROLLOUT_DEFAULTS, schema, validate

from conftest import ROOT


def _yaml_hparams(name: str) -> dict:
    """conf/algo/<name>.yaml with its interpolations resolved against conf/scale/tiny-s.yaml (as Hydra composes it)."""
    cfg = OmegaConf.create({"scale": OmegaConf.load(ROOT / "conf/scale/tiny-s.yaml"),
                            "algo": OmegaConf.load(ROOT / f"conf/algo/{name}.yaml")})
    hp = OmegaConf.to_container(cfg.algo, resolve=True)
    assert hp.pop("name") == name
    return hp


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_validates_its_own_yaml_and_registry_options(name):
    hp = _yaml_hparams(name)
    clean = validate(name, hp)
    assert set(clean) == set(hp)
    for key, value in hp.items():
        assert clean[key] == value, key  # the yaml's values are already of the right type
    assert validate(name, dict(ALGORITHMS[name].options)) == dict(ALGORITHMS[name].options)


def test_the_composed_config_validates_too():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in ("dpo", "dr_grpo", "ppo", "spin", "tdpo", "kto"):
            cfg = compose("config", overrides=[f"algo={name}", "scale=tiny-s"])
            hp = OmegaConf.to_container(cfg.algo, resolve=True)
            hp.pop("name")
            assert validate(name, hp) == hp


def test_schema_groups_by_family():
    assert set(schema("sft")) == set(LOOP_OPTIONS)
    assert set(schema("dpo")) == {"beta", "f_divergence", "f_alpha", *PAIRWISE_OPTIONS, *LOOP_OPTIONS}
    assert set(schema("tdpo")) == {"beta", "alpha", "variant", *LOOP_OPTIONS}
    assert set(schema("rft")) == {*ROLLOUT_DEFAULTS, *LOOP_OPTIONS}
    assert {"loss_type", "num_samples", "ref_sync_steps"} <= set(schema("grpo"))
    assert "wpo" not in schema("online_dpo")


def test_types_come_from_the_defaults():
    clean = validate("grpo", {"eps_high": 1, "num_samples": 4.0, "adv_eps": "1e-4", "eps_low": None})
    assert clean == {"eps_high": 1.0, "num_samples": 4, "adv_eps": 1e-4, "eps_low": None}
    assert type(clean["eps_high"]) is float and type(clean["num_samples"]) is int
    assert validate("spin", {"ref_sync_steps": "epoch"}) == {"ref_sync_steps": "epoch"}
    assert validate("dpo", {"ref_sync_steps": 64, "ref_sync_alpha": 0.6}) == {"ref_sync_steps": 64,
                                                                               "ref_sync_alpha": 0.6}


def _line(name, hp) -> str:
    with pytest.raises(ValueError) as info:
        validate(name, hp)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_is_one_line_listing_the_valid_ones():
    assert _line("dpo", {"bta": 0.1}) == ("dpo: unknown hyperparameter 'bta'; valid: beta, f_alpha, f_divergence, "
                                          "ld_alpha, ref_sync_alpha, ref_sync_steps, wpo")
    assert _line("sft", {"beta": 0.1, "x": 1}) == ("sft: unknown hyperparameters 'beta', 'x'; valid: ref_sync_alpha, "
                                                   "ref_sync_steps")


def test_out_of_range_is_one_line_with_the_range():
    assert _line("dpo", {"beta": -1.0}) == "dpo: algo.beta must be > 0, got -1.0"
    assert _line("cdpo", {"eps": 0.5}) == "cdpo: algo.eps must be in [0, 0.5), got 0.5"
    assert _line("exo", {"eps": 0.0}) == "exo: algo.eps must be in (0, 1), got 0.0"
    assert _line("grpo", {"top_p": 0}) == "grpo: algo.top_p must be in (0, 1], got 0.0"
    assert _line("grpo", {"num_samples": 0}) == "grpo: algo.num_samples must be >= 1, got 0"
    assert _line("spin", {"ref_sync_alpha": 0}) == "spin: algo.ref_sync_alpha must be in (0, 1], got 0.0"


def test_enumerated_keys_list_their_values():
    assert _line("grpo", {"loss_type": "x"}) == "grpo: algo.loss_type must be one of grpo, bnpo, dr_grpo, dapo, got 'x'"
    assert _line("sgrpo", {"advantage": "vtrace"}) == (
        "sgrpo: algo.advantage must be one of group_zscore, leave_one_out, reinforce_pp, reinforce_pp_baseline, "
        "remax, gae, got 'vtrace'")
    assert _line("online_dpo", {"chosen": "worst"}) == (
        "online_dpo: algo.chosen must be one of best_sample, gold, got 'worst'")
    assert _line("tdpo", {"variant": 3}) == "tdpo: algo.variant must be one of 1, 2, got 3"


def test_wrong_types_are_one_line():
    assert _line("dpo", {"beta": "abc"}) == "dpo: algo.beta: 'abc' is not a number"
    assert _line("grpo", {"num_samples": 2.5}) == "grpo: algo.num_samples: 2.5 is not an integer"
    assert _line("dapo", {"dynamic_sampling": "yes"}) == "dapo: algo.dynamic_sampling: 'yes' is not true or false"
    assert _line("dpo", {"beta": None}) == "dpo: algo.beta must be set (null is not valid; default 0.1)"
    assert _line("grpo", {"rewards": 1}) == "grpo: algo.rewards: 1 is not a mapping"


def test_rewards_and_cross_key_rules():
    assert _line("grpo", {"rewards": {"strictly": 1.0}}) == (
        "grpo: algo.rewards names unknown reward function(s) 'strictly'; valid: flexible, format, strict")
    assert _line("ppo", {"dynamic_sampling": True}) == (
        "ppo: algo.dynamic_sampling cannot be combined with advantage='gae' (the value head is fitted on every "
        "rollout of every rank)")
    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        validate("nope", {})
