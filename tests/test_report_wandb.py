"""report --wandb in W&B's offline mode (real wandb, no mocks): one report run per sweep, in the sweep's group and
the project the sweep's own config names, and the sweep's dashboard view built as an object (wandb-workspaces)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from posttrain import report
from posttrain.report.dashboard import build_workspace
from posttrain.report.wandb_report import sync_command
from posttrain.tracker import report_run_id, sweep_group
from test_report import GSM, gsm_metrics, make_result, put
from test_tracker import written_records

LOGGER = {"name": "wandb", "project": "sweep-own-project", "entity": None, "mode": "offline"}


def _sweep(root: Path) -> Path:
    for algo, v in (("dpo", 0.3), ("sft", 0.4)):
        for s in range(2):
            put(root, make_result(algo, "tiny-s", s, metrics=gsm_metrics(v + s / 50),
                                  base=gsm_metrics(0.25), config_extra={"logger": LOGGER}))
    return root


def test_report_wandb_updates_one_report_run_per_sweep_in_its_group_and_project(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    sweep = _sweep(tmp_path / "outputs" / "my_sweep")
    for _ in range(2):
        assert report.main([str(sweep), "--wandb", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    rid = report_run_id(sweep)
    runs = sorted((sweep / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith(f"-{rid}") for r in runs), "every call resumes the one report run"
    blob = b"".join(written_records(p, b"delta") for r in runs for p in r.glob("run-*.wandb"))
    for needle in (sweep_group(sweep), "sweep-own-project", "report", f"{GSM}/dpo/tiny-s/lora-off/delta"):
        assert needle.encode() in blob, needle
    line = next(x for x in out.splitlines() if x.startswith("W&B dashboard view"))
    assert "not saved (offline mode)" in line and "wandb sync" in line and str(sweep) in line
    assert sync_command(sweep) in line
    other = _sweep(tmp_path / "elsewhere" / "my_sweep")
    assert report_run_id(other) != rid and sweep_group(other) != sweep_group(sweep)


def test_dashboard_view_has_the_study_panels_and_is_filtered_to_the_group():
    pytest.importorskip("wandb_workspaces")
    metrics = [GSM, "synth_mc/acc_norm,none"]
    view = build_workspace(entity="team", project="proj", group="grid-abc123", metrics=metrics)
    sections = {s.name: s for s in view.sections}
    assert list(sections) == ["Study metrics", "Change over the base", "Training curves", "Hyperparameters"]
    study = sections["Study metrics"].panels
    assert [p.metrics[0].name for p in study] == metrics and all(p.groupby_rangefunc == "stderr" for p in study)
    assert [p.metrics[0].name for p in sections["Change over the base"].panels] == [f"delta/{m}" for m in metrics]
    [curves] = sections["Training curves"].panels
    assert curves.y == ["train/loss"] and curves.groupby.name == "variant"
    [parallel] = sections["Hyperparameters"].panels
    assert [c.metric.name for c in parallel.columns] == ["algo", "scale", "lora", "seed", *metrics]
    filters = str(view.runset_settings.filters)
    assert "Metric(\"Group\") == 'grid-abc123'" in filters and "Metric(\"JobType\") == 'train'" in filters
    assert [k.name for k in view.runset_settings.groupby] == ["variant", "scale"]
    model = view._to_model()  # what save() would upload: the panels serialise without the network
    assert model.project == "proj" and "grid-abc123" in model.display_name


def test_report_imports_no_training_code(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "posttrain.report", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--effect" in proc.stdout
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
