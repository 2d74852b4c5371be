"""Mistakes caught before anything loads (issue 13): every bad input is ONE line on stderr naming the key and what is
valid, a non-zero exit, no traceback, and nothing loaded (no model cache, no cell directory), in a dry run too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, launch
from posttrain.config_schema import ConfigError, check_config, check_value
from posttrain.sweep import checks

CONF = ROOT / "conf"

BAD = [
    # (command line, what the one line must say)
    (["trainer.max_step=3"], ["trainer.max_step=3", "no key max_step", "max_steps", "+trainer.max_step=3"]),
    (["-m", "trainer.max_step=3", "dry_run=true"], ["no key max_step", "max_steps"]),
    (["-m", "algo=dpoo", "dry_run=true"], ["algo=dpoo", "Could not find 'algo/dpoo'", "dpo, dpo_norm"]),
    (["-m", "scale=13b", "dry_run=true"], ["scale=13b", "0.5b, 1.5b, 3b, 7b"]),
    (["-m", "hydra/launcher=slurm_h10", "dry_run=true"], ["slurm_h10", "no such launcher", "slurm_h100"]),
    (["-m", "algo.beta=-1", "dry_run=true"], ["algo.beta must be > 0", "-1"]),
    (["algo.beta=-1"], ["algo.beta must be > 0"]),
    (["trainer.lr=abc"], ["trainer.lr=abc", "must be a number > 0"]),
    (["trainer.max_steps=0"], ["trainer.max_steps=0", "integer >= 1 or null"]),
    (["seed=-1"], ["seed=-1", "integer >= 0"]),
    (["-m", "algo.bta=0.2", "dry_run=true"], ["'bta'", "valid: beta"]),
    (["-m", "sweep=smoke", "trainer.max_steps=0", "dry_run=true"], ["trainer.max_steps=0", "(cell: "]),
    (["-m", "algo=dpo,simpo", "algo.beta=0.2,-0.5", "dry_run=true"], ["algo.beta must be > 0", "(cell: "]),
]


@pytest.mark.parametrize("args,fragments", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_each_bad_input_is_one_line_and_a_non_zero_exit_before_anything_loads(args, fragments, tmp_path):
    cache = tmp_path / "cache"
    proc = launch([*args, "logger=none"], tmp_path, env={"POSTTRAIN_CACHE": str(cache)}, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not cache.exists() and not (tmp_path / "outputs").exists()  # nothing loaded, no cell directory


def test_a_clean_dry_run_of_the_paper_stays_torch_free_and_validates_every_cell(tmp_path):
    code = ("import sys, runpy; sys.argv = ['launch.py', '-m', 'sweep=paper', 'dry_run=true', "
            f"'output_root={tmp_path}/o']\ntry:\n    runpy.run_path({str(ROOT / 'launch.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.stdout.strip().endswith("220 cells") and proc.stderr.strip() == "False"


def test_the_schema_accepts_every_shipped_default_and_names_the_key():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for scale in sorted(p.stem for p in (CONF / "scale").glob("*.yaml")):
            for lora in ("on", "off"):
                check_config(OmegaConf.to_container(compose("config", overrides=[f"scale={scale}", f"lora={lora}"]),
                                                    resolve=True))
    for key, value, fragment in (("trainer.warmup_ratio", 1.0, "< 1"), ("data.top_p", 0, "> 0"),
                                 ("eval.limit", 0, "integer >= 1"), ("trainer.schedule", "linear", "cosine, constant"),
                                 ("lora.r", 2.5, "an integer >= 1"), ("dry_run", "yes", "true or false"),
                                 ("trainer.betas", [0.9], "two numbers")):
        with pytest.raises(ConfigError, match=fragment) as info:
            check_value(key, value)
        assert str(info.value).startswith(f"{key}=")
    for key, value in (("eval.limit", 0.5), ("eval.limit", None), ("trainer.max_steps", None),
                       ("eval.num_fewshot", {"gsm8k": 8}), ("trainer.lr", 1)):
        check_value(key, value)


def test_new_keys_need_a_plus_and_group_options_are_checked_without_composing():
    with pytest.raises(ConfigError, match=r"\+trainer.foo=1"):
        checks.check_cell(["trainer.foo=1"], CONF)
    assert checks.check_cell(["+trainer.foo=1", "scale.model=/a/b", "eval.num_fewshot.gsm8k=4"], CONF) is None
    with pytest.raises(ConfigError, match="add it with \\+algo.wpo"):  # dpo accepts wpo, but its yaml has no such key
        checks.check_cells([["algo.wpo=true"]], CONF)
    checks.check_cells([["+algo.wpo=true"]], CONF)
    with pytest.raises(ConfigError, match="Could not find 'lora/maybe'"):
        checks.check_cell(["lora=maybe"], CONF)
    # a key whose yaml value is an interpolation (sgrpo's max_new_tokens: ${scale.max_new_tokens}) exists: no +
    assert checks.check_cells([["algo=sgrpo", "algo.max_new_tokens=6"]], CONF) == 1


def test_interpolations_plus_on_existing_keys_nested_algo_keys_and_float_limits():
    """A review's findings: an interpolated value is composed, not type-checked here; + on a key that is there is
    Hydra's 'Could not append' (refused here, before any job is submitted); a new nested algo key needs +; lm-eval
    takes eval.limit=1.0 as one document."""
    assert checks.check_cells([["algo=grpo", "algo.max_new_tokens=${scale.max_new_tokens}"],
                               ["trainer.lr=${scale.lr}"]], CONF) == 2
    with pytest.raises(ConfigError, match=r"trainer.lr is already in the config; .* \+\+trainer.lr=1e-5"):
        checks.check_cells([["+trainer.lr=1e-5"]], CONF)
    with pytest.raises(ConfigError, match="algo.beta is already in the config"):
        checks.check_cells([["+algo.beta=0.2"]], CONF)
    with pytest.raises(ConfigError, match=r"no key rewards.format in algo .*use \+algo.rewards.format=0.1"):
        checks.check_cells([["algo=grpo", "algo.rewards.format=0.1"]], CONF)
    assert checks.check_cells([["algo=grpo", "+algo.rewards.format=0.1"], ["++trainer.lr=1e-5"],
                               ["eval.limit=1.0"], ["eval.limit=0.5"]], CONF) == 4
    with pytest.raises(ConfigError, match="eval.limit=1.5"):
        checks.check_cells([["eval.limit=1.5"]], CONF)


def test_no_sweep_file_test_or_readme_adds_a_key_without_plus():
    """Struct mode: every override key a sweep file sets exists in the config (or is added with +)."""
    from posttrain.sweep import files

    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        checks.check_cells([c.overrides for c in files.expand(path, [], CONF)], CONF)
