"""One cell identity (posttrain.cell): the config hash, the cell directory and the done rule, pinned.

The hashes and directories below were computed by the code before the identity moved into one module; they must
never change, or every completed sweep would run again (docs/design.md, "Contracts")."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from conftest import ROOT
from posttrain import cell as identity
from posttrain.results import COMPLETED, FAILED

PINNED = [
    ([], "dpo/tiny-s/lora-off/seed-0", "d4ce6c6d3e88"),
    (["algo=dpo"], "dpo/tiny-s/lora-off/seed-0", "d4ce6c6d3e88"),
    (["algo=dpo", "algo.beta=0.2"], "dpo@algo.beta=0.2/tiny-s/lora-off/seed-0", "83554ff80ce4"),
    (["algo=grpo", "scale=0.5b", "lora=on"], "grpo/0.5b/lora-on/seed-0", "6f7db9bb510e"),
    (["algo=simpo", "seed=3", "trainer.max_steps=4"], "simpo@trainer.max_steps=4/tiny-s/lora-off/seed-3",
     "3f70521fc480"),
]


def _composed(overrides):
    from posttrain.sweep.cells import composed_is_default

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    subdir = str(cfg.hydra.sweep.subdir)
    is_default = composed_is_default(cfg.hydra)
    with open_dict(cfg):
        cfg.pop("hydra")  # as the task sees it
    return cfg, subdir, is_default


#: Overrides equal to the config's default name no variant and leave the hash alone (issue 13).
AT_DEFAULT = [
    (["algo.beta=0.1"], "dpo/tiny-s/lora-off/seed-0", "d4ce6c6d3e88"),
    (["algo=simpo", "algo.gamma=0.5", "trainer.max_steps=null", "trainer.schedule=cosine"],
     "simpo/tiny-s/lora-off/seed-0", None),
    (["algo.beta=0.10", "trainer.epochs=3"], "dpo/tiny-s/lora-off/seed-0", "d4ce6c6d3e88"),
    (["trainer.epochs=3.0"], "dpo@trainer.epochs=3.0/tiny-s/lora-off/seed-0", None),  # 3.0 is not 3: new hash
]


@pytest.mark.parametrize("overrides,cell_dir,chash", PINNED + AT_DEFAULT)
def test_hash_and_directory_are_pinned_and_every_path_agrees(overrides, cell_dir, chash):
    from posttrain.sweep import files

    cfg, subdir, is_default = _composed(overrides)
    if chash is not None:
        assert identity.config_hash(cfg) == chash
    assert subdir == cell_dir  # Hydra's ${posttrain_cell:}
    assert files.cell_dir(overrides, ROOT / "conf") == cell_dir  # the fast path, from the strings alone
    assert identity.cell_of(cfg, overrides, is_default) == (cell_dir.split("/")[0], cell_dir)  # run.py's


def test_an_override_at_the_default_keeps_the_hash_one_off_it_changes_it():
    base = identity.config_hash(_composed(["algo=simpo"])[0])
    assert identity.config_hash(_composed(["algo=simpo", "algo.gamma=0.5"])[0]) == base
    assert identity.config_hash(_composed(["algo=simpo", "algo.gamma=0.6"])[0]) != base
    assert identity.config_hash(_composed(["trainer.epochs=3.0"])[0]) != identity.config_hash(_composed([])[0])


def test_done_means_completed_with_the_same_hash(tmp_path):
    assert not identity.is_done(tmp_path, "abc")  # no result.json
    (tmp_path / "result.json").write_text("{truncated")
    assert not identity.is_done(tmp_path, "abc")
    for status, chash, done in ((COMPLETED, "abc", True), (COMPLETED, "abd", False), (FAILED, "abc", False),
                                ("cancelled", "abc", False)):
        (tmp_path / "result.json").write_text(json.dumps({"status": status, "config_hash": chash}))
        assert identity.is_done(tmp_path, "abc") is done, (status, chash)


def test_several_ranks_without_deepspeed_is_one_rule():
    assert identity.ranks_refusal(1, {"enabled": False}, "x") is None
    assert identity.ranks_refusal(2, {"enabled": True, "stage": 3}, "x") is None
    assert identity.ranks_refusal(4, None, "x") is not None
    line = identity.ranks_refusal(2, {"enabled": False}, "2 processes (torchrun)")
    assert line.startswith("2 processes (torchrun) but deepspeed is off") and "deepspeed=zero3" in line


def test_the_identity_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, posttrain.cell, posttrain.sweep.files; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
