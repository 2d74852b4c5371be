"""W&B in offline mode through our own code path, and secrets never written anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, launch, read_json
from posttrain.tracker import make_tracker, scrub

SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789", "HF_TOKEN": "hf_secret_abcdefghij"}


def test_scrub_redacts_every_key_named_like_a_secret():
    cfg = {"a": 1, "hub_token": "x", "nested": {"api_key": "y", "ok": [{"password": "z"}]}, "tokenizer": "path"}
    out = scrub(cfg)
    assert out["hub_token"] == out["nested"]["api_key"] == out["nested"]["ok"][0]["password"] == "<redacted>"
    assert out["a"] == 1 and out["tokenizer"] == "path", "tokenizer is not a token"


def test_wandb_offline_run_has_a_stable_id_per_cell_and_no_secrets(tmp_path, monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = OmegaConf.create({"name": "wandb", "project": "posttrain-test", "mode": "offline"})
    ids = []
    for _ in range(2):
        tracker = make_tracker(cfg, sweep="grid", cell="dpo/tiny-s/lora-off/seed-0", run_dir=tmp_path,
                               config=scrub({"algo": {"beta": 0.1}, "api_key": SECRETS["WANDB_API_KEY"]}),
                               tags=["algo:dpo"], job_type="dpo")
        tracker.log({"train/loss": 0.5}, 1)
        tracker.finish()
        ids.append(tracker.run_id)
    assert ids[0] == ids[1], "a re-run continues the same W&B run"
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{ids[0]}"))
    assert runs and (runs[0] / f"run-{ids[0]}.wandb").stat().st_size > 0
    other = make_tracker(cfg, sweep="grid", cell="dpo/tiny-s/lora-off/seed-1", run_dir=tmp_path, config={},
                         tags=[], job_type="dpo")
    other.finish()
    assert other.run_id != ids[0]
    _assert_no_secret(tmp_path)


def _assert_no_secret(root: Path):
    for path in root.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for value in SECRETS.values():
                assert value.encode() not in blob, f"secret written to {path}"


@pytest.mark.slow
def test_a_real_run_writes_no_secret_from_the_environment_or_the_config(tmp_path, tiny_base):
    env = {**SECRETS, "WANDB_MODE": "offline"}
    args = [a for a in FAST if a != "logger=none"] + ["logger=wandb", "+logger.api_key=${oc.env:WANDB_API_KEY}"]
    launch(args, tmp_path, env=env, check=True)
    [result_path] = list((tmp_path / "outputs").rglob("result.json"))
    result = read_json(result_path)
    assert result["status"] == "completed" and result["config"]["logger"]["api_key"] == "<redacted>"
    assert list(result_path.parent.glob("wandb/offline-run-*"))
    _assert_no_secret(tmp_path / "outputs")
    assert os.environ.get("HF_TOKEN") != SECRETS["HF_TOKEN"]
