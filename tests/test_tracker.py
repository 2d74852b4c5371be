"""W&B in offline mode through our own code path, and secrets never written anywhere."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, launch, read_json
from posttrain.tracker import (IDENTITY_KEYS, make_tracker, report_run_id, result_summary, run_id, scrub,
                               sweep_dir_of, sweep_group)

SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789", "HF_TOKEN": "hf_secret_abcdefghij"}


def test_scrub_redacts_every_key_named_like_a_secret():
    cfg = {"a": 1, "hub_token": "x", "nested": {"api_key": "y", "ok": [{"password": "z"}]}, "tokenizer": "path"}
    out = scrub(cfg)
    assert out["hub_token"] == out["nested"]["api_key"] == out["nested"]["ok"][0]["password"] == "<redacted>"
    assert out["a"] == 1 and out["tokenizer"] == "path", "tokenizer is not a token"


CELL = "dpo/tiny-s/lora-off/seed-0"


def _result(seed=0, *, metrics=None, base=None, status="completed"):
    """The part of a result.json (docs/design.md "result.json") the tracker reads."""
    return {"status": status, "algo": "dpo", "variant": "dpo@algo.beta=0.2", "scale": "tiny-s", "seed": seed,
            "lora": False, "config": scrub({"algo": {"name": "dpo", "beta": 0.2}, "seed": seed,
                                            "api_key": SECRETS["WANDB_API_KEY"]}),
            "metrics": metrics or {}, "eval": {"base_metrics": base or {}}, "train": {"steps": 4}}


def _track(cfg, sweep_dir: Path, cell: str, result: dict):
    cell_dir = sweep_dir / cell
    cell_dir.mkdir(parents=True, exist_ok=True)
    return make_tracker(cfg, sweep=sweep_dir.name, cell=cell, run_dir=cell_dir, result=result)


def test_wandb_offline_run_has_a_stable_id_per_cell_and_no_secrets(tmp_path, monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = OmegaConf.create({"name": "wandb", "project": "posttrain-test", "mode": "offline"})
    sweep = tmp_path / "outputs" / "grid"
    ids = []
    for _ in range(2):
        tracker = _track(cfg, sweep, CELL, _result())
        tracker.log({"train/loss": 0.5}, 1)
        tracker.finish()
        ids.append(tracker.run_id)
    assert ids[0] == ids[1], "a re-run continues the same W&B run"
    runs = sorted((sweep / CELL / "wandb").glob(f"offline-run-*-{ids[0]}"))
    assert runs and (runs[0] / f"run-{ids[0]}.wandb").stat().st_size > 0
    other = _track(cfg, sweep, "dpo/tiny-s/lora-off/seed-1", _result(1))
    other.finish()
    assert other.run_id != ids[0]
    _assert_no_secret(tmp_path)


def test_two_output_roots_with_one_sweep_name_give_two_ids_and_two_groups(tmp_path, monkeypatch):
    """The id hashes the sweep directory's resolved path, not the sweep's name (issue 13 item 2)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"name": "wandb", "project": "posttrain-test"})
    a = _track(cfg, tmp_path / "root_a" / "grid", CELL, _result())
    a.finish()
    b = _track(cfg, tmp_path / "root_b" / "grid", CELL, _result())
    b.finish()
    assert a.run_id != b.run_id and a.group != b.group
    assert a.group.startswith("grid-") and b.group.startswith("grid-")
    assert a.run_id == run_id(tmp_path / "root_a" / "grid", CELL)
    assert sweep_dir_of(tmp_path / "root_a" / "grid" / CELL, CELL) == (tmp_path / "root_a" / "grid").resolve()
    # relative and absolute spellings of one directory are one experiment
    monkeypatch.chdir(tmp_path)
    assert run_id(Path("root_a/grid"), CELL) == a.run_id and sweep_group("root_a/grid") == a.group


def test_wandb_run_group_job_type_config_and_summary_with_base_deltas(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"name": "wandb", "project": "posttrain-test"})
    gsm = "exact_match,strict-match"
    result = _result(metrics={"synth_gsm8k": {gsm: 0.50, "exact_match_stderr,strict-match": 0.03}},
                     base={"synth_gsm8k": {gsm: 0.4375, "exact_match_stderr,strict-match": 0.03}})
    tracker = _track(cfg, tmp_path / "grid", CELL, result)
    run = tracker.run
    tracker.summary(result_summary(result))
    assert run.group == sweep_group(tmp_path / "grid") and run.job_type == "train" and run.id == tracker.run_id
    assert run.project == "posttrain-test"
    config = dict(run.config)
    assert {k: config[k] for k in IDENTITY_KEYS} == {"variant": "dpo@algo.beta=0.2", "algo": "dpo",
                                                     "scale": "tiny-s", "seed": 0, "lora": "off"}
    assert config["cfg"]["algo"]["beta"] == 0.2 and config["cfg"]["api_key"] == "<redacted>"
    summary = dict(run.summary)
    assert summary[f"synth_gsm8k/{gsm}"] == 0.50 and summary[f"base/synth_gsm8k/{gsm}"] == 0.4375
    assert summary[f"delta/synth_gsm8k/{gsm}"] == pytest.approx(0.0625)
    assert "delta/synth_gsm8k/exact_match_stderr,strict-match" not in summary, "no delta of a standard error"
    assert summary["status"] == "completed" and summary["train/steps_done"] == 4
    tracker.finish()
    [written] = (tmp_path / "grid" / CELL / "wandb").glob(f"offline-run-*-{tracker.run_id}/run-*.wandb")
    blob = written_records(written, b"delta/synth_gsm8k")
    assert tracker.group.encode() in blob and b"delta/synth_gsm8k" in blob and b"dpo@algo.beta=0.2" in blob


def written_records(path: Path, last: bytes, timeout: float = 30.0) -> bytes:
    """The offline run file once wandb's service has written ``last`` into it (finish() may return first)."""
    deadline = time.monotonic() + timeout
    while True:
        blob = path.read_bytes()
        if last in blob or time.monotonic() > deadline:
            return blob
        time.sleep(0.2)


def test_report_run_id_is_stable_per_sweep_and_differs_from_every_cell(tmp_path):
    assert report_run_id(tmp_path / "grid") == report_run_id(tmp_path / "grid" / ".." / "grid")
    assert report_run_id(tmp_path / "grid") != report_run_id(tmp_path / "other" / "grid")
    assert report_run_id(tmp_path / "grid") != run_id(tmp_path / "grid", "report")


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
    cell_dir = result_path.parent
    sweep_dir = cell_dir.parents[3]  # <sweep>/<variant>/<scale>/lora-<x>/seed-<n>
    rid = run_id(sweep_dir, cell_dir.relative_to(sweep_dir).as_posix())
    [offline] = cell_dir.glob(f"wandb/offline-run-*-{rid}/run-{rid}.wandb")
    blob = written_records(offline, b"delta/synth_gsm8k")
    assert sweep_group(sweep_dir).encode() in blob, "group = the sweep (its name + 6 hex of its path)"
    assert b"delta/synth_gsm8k/exact_match,strict-match" in blob and b"base/synth_gsm8k" in blob
    _assert_no_secret(tmp_path / "outputs")
    assert os.environ.get("HF_TOKEN") != SECRETS["HF_TOKEN"]
