"""launch.py's CLI sugar (inclusive ranges) and the config groups composing for every combination."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT, launch

sys.path.insert(0, str(ROOT))
from launch import UsageError, rewrite_ranges  # noqa: E402

from posttrain.algorithms import ALGORITHMS  # noqa: E402
from posttrain.sweep.cells import cell_path, config_hash, variant  # noqa: E402

SCALES = sorted(p.stem for p in (ROOT / "conf/scale").glob("*.yaml"))


def test_range_is_inclusive_and_only_exact_integer_ranges_are_rewritten():
    assert rewrite_ranges(["-m", "seed=0-4", "scale=tiny-s", "algo=dpo,kto"]) == \
        ["-m", "seed=range(0,5)", "scale=tiny-s", "algo=dpo,kto"]
    assert rewrite_ranges(["seed=3-3"]) == ["seed=range(3,4)"]
    assert rewrite_ranges(["scale.model=/models/qwen-0-5", "data.path=a-b"]) == \
        ["scale.model=/models/qwen-0-5", "data.path=a-b"]
    assert rewrite_ranges(["trainer.max_steps=2-3"]) == ["trainer.max_steps=range(2,4)"]


@pytest.mark.parametrize("arg,fragment", [("seed=4-0", "reversed range"), ("seed=a-b", "seed must be an integer")])
def test_bad_ranges_stop_with_one_clear_line(arg, fragment, tmp_path):
    with pytest.raises(UsageError, match=fragment):
        rewrite_ranges([arg])
    proc = launch(["-m", arg], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr and arg in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "outputs").exists()


def test_unknown_group_option_lists_the_valid_ones(tmp_path):
    proc = launch(["algo=nope"], tmp_path)
    assert proc.returncode != 0
    assert "Could not find 'algo/nope'" in proc.stderr and "dpo" in proc.stderr and "Traceback" not in proc.stderr


def _compose(overrides, hydra: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def test_every_algo_scale_lora_combination_composes_and_resolves():
    algos = sorted(p.stem for p in (ROOT / "conf/algo").glob("*.yaml"))
    assert set(algos) == set(ALGORITHMS), "every registry entry has a conf/algo yaml and vice versa"
    hashes = set()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for algo, scale, lora in itertools.product(algos, SCALES, ["on", "off"]):
            cfg = compose("config", overrides=[f"algo={algo}", f"scale={scale}", f"lora={lora}"])
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert resolved["algo"]["name"] == algo and resolved["scale"]["name"] == scale
            assert resolved["lora"]["enabled"] is (lora == "on")
            assert resolved["trainer"]["lr"] == resolved["scale"]["lr"]
            assert resolved["eval"]["tasks"], "the eval profile gives a task list"
            hashes.add(config_hash(cfg))
        for algo in algos:  # the cell directory Hydra will use, for every algorithm
            cfg = compose("config", overrides=[f"algo={algo}", "lora=on"], return_hydra_config=True)
            assert cfg.hydra.sweep.subdir == f"{algo}/tiny-s/lora-on/seed-0"
    assert len(hashes) == len(algos) * len(SCALES) * 2, "distinct configs have distinct hashes"


def test_scales_and_study_defaults():
    real = {s: OmegaConf.load(ROOT / f"conf/scale/{s}.yaml") for s in ("0.5b", "1.5b", "3b", "7b")}
    assert {s: c.model for s, c in real.items()} == {
        "0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
        "3b": "Qwen/Qwen2.5-3B-Instruct", "7b": "Qwen/Qwen2.5-7B-Instruct"}
    cfg = _compose(["scale=7b", "lora=on"])
    assert cfg.trainer.lr == 1e-6 and cfg.trainer.micro_batch_size * cfg.trainer.grad_accum == 8
    assert list(cfg.trainer.betas) == [0.9, 0.95] and cfg.trainer.weight_decay == 0.01
    assert cfg.trainer.warmup_ratio == 0.1 and cfg.trainer.schedule == "cosine" and cfg.trainer.epochs == 3
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.target_modules == "all-linear"
    assert cfg.eval.num_fewshot["gsm8k"] == 8 and cfg.eval.num_fewshot["minerva_math"] == 4
    assert _compose(["algo=simpo"]).algo.gamma == 0.5 and _compose([]).algo.beta == 0.1
    assert _compose([]).trust_remote_code is False


def test_cell_directory_contract():
    cfg = _compose(["algo=dpo", "seed=3", "trainer.max_steps=4", "algo.beta=0.2", "logger=none"], hydra=True)
    assert cfg.hydra.sweep.subdir == "dpo@algo.beta=0.2,trainer.max_steps=4/tiny-s/lora-off/seed-3"
    assert cfg.hydra.sweep.dir == "outputs/grid" and cfg.hydra.run.dir == "outputs/run"
    assert variant("dpo", ["logger=none", "dry_run=true", "hydra/launcher=slurm_local"]) == "dpo"
    assert variant("dpo", ["scale.model=/a/b c"]) == "dpo@scale.model=_a_b_c"
    long = variant("dpo", [f"algo.x{i}=1" for i in range(30)])
    assert len(long) <= 80 and long != variant("dpo", [f"algo.x{i}=2" for i in range(30)])
    assert cell_path("dpo", "tiny-s", True, 0) == "dpo/tiny-s/lora-on/seed-0"


def test_config_hash_ignores_what_cannot_change_the_result():
    a, b = _compose(["logger=none"]), _compose(["logger=wandb", "trainer.checkpoint_every=5", "dry_run=true"])
    c = _compose(["algo.beta=0.2"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_the_scale_picks_deepspeed_and_an_override_wins():
    """Up to 1.5B (one GPU) plain PyTorch; 3B (2 GPUs) and 7B (8 GPUs) ZeRO-3: one task per GPU trains one model."""
    for scale, stage in (("tiny-s", None), ("0.5b", None), ("1.5b", None), ("3b", 3), ("7b", 3)):
        ds = OmegaConf.to_container(_compose([f"scale={scale}"]).deepspeed)
        assert (ds.get("stage") if ds["enabled"] else None) == stage, scale
    assert _compose(["scale=7b", "deepspeed=zero2"]).deepspeed.stage == 2
    assert _compose(["scale=7b", "deepspeed=none"]).deepspeed.enabled is False
    # the tiny cells' config (and hash) is what deepspeed=none gave before the scale chose
    assert config_hash(_compose([])) == config_hash(_compose(["deepspeed=none"]))


def test_several_tasks_without_deepspeed_are_refused_before_anything_runs(tmp_path):
    proc = launch(["-m", "hydra/launcher=slurm_local", "scale=7b", "deepspeed=none", "hydra.launcher.gpus=2",
                   "logger=none"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cell ")
    assert "2 GPUs (one task each) but deepspeed is off" in proc.stderr and "deepspeed=zero3" in proc.stderr
    proc = launch(["logger=none"], tmp_path, env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": "29999"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "2 processes (torchrun) but deepspeed is off" in proc.stderr
