"""sweep.json (posttrain.sweep.manifest), `python -m posttrain.sweep status|wait` and the Slurm launcher's
configuration, all without a Slurm cluster (tests/test_slurm.py runs them through a real one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.results import write_result
from posttrain.sweep.manifest import make_entry, read_manifest, write_manifest
from posttrain.sweep.status import (
    JobInfo, cell_state, collect_status, format_table, match_array_tasks, parse_duration, parse_sacct, parse_squeue,
    summary_line,
)

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "tests" / "slurm_app"


def _result(status: str = "completed", score: float | None = 0.5, task: str = "synth_gsm8k") -> dict:
    return {
        "status": status, "algo": "dpo", "variant": "dpo", "scale": "tiny-s", "seed": 0, "lora": False,
        "config_hash": "abc", "config": {}, "algo_meta": {}, "eval": {}, "train": {"seconds": 12.0},
        "metrics": {} if score is None else {task: {"exact_match,strict-match": score,
                                                    "exact_match_stderr,strict-match": 0.01}},
        "provenance": {"started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:05+00:00"},
        "error": None if status == "completed" else {"type": "RuntimeError", "message": "x", "traceback": None},
    }


# ---------------------------------------------------------------- manifest
def test_write_manifest_creates_and_derives_fields(tmp_path):
    sweep = tmp_path / "grid"
    path = write_manifest(sweep, [
        {"run_dir": str(sweep / "dpo/tiny-s/lora-off/seed-0"), "overrides": ["algo=dpo", "seed=0"]},
        {"cell": "dpo/tiny-s/lora-off/seed-1", "overrides": ["algo=dpo", "seed=1"], "job_id": 17},
    ])
    assert path == sweep / "sweep.json"
    data = json.loads(path.read_text())
    assert data["sweep"] == "grid" and data["launcher"] == "basic"
    first, second = data["cells"]
    assert first["cell"] == "dpo/tiny-s/lora-off/seed-0"
    assert first["run_dir"] == str(sweep.absolute() / "dpo/tiny-s/lora-off/seed-0")
    assert first["job_id"] is None and first["submitted"]
    assert second["run_dir"] == str(sweep.absolute() / "dpo/tiny-s/lora-off/seed-1")
    assert second["job_id"] == "17"  # ids are strings
    assert set(first) == {"cell", "run_dir", "overrides", "job_id", "submitted"}
    assert read_manifest(sweep) == data


def test_write_manifest_merges_relaunch(tmp_path):
    sweep = tmp_path / "paper"
    write_manifest(sweep, [make_entry(sweep, cell=f"c{i}", job_id=f"10_{i}", submitted="t0") for i in range(3)],
                   sweep="paper", launcher="slurm_local")
    # A relaunch of c1 only (new job), plus a new cell c3; c0 and c2 are kept untouched, order kept.
    write_manifest(sweep, [make_entry(sweep, cell="c1", job_id="11", submitted="t1"),
                           make_entry(sweep, cell="c3", job_id=None, submitted="t1")])
    data = read_manifest(sweep)
    assert [c["cell"] for c in data["cells"]] == ["c0", "c1", "c2", "c3"]
    by_cell = {c["cell"]: c for c in data["cells"]}
    assert by_cell["c0"]["job_id"] == "10_0" and by_cell["c0"]["submitted"] == "t0"
    assert by_cell["c1"]["job_id"] == "11" and by_cell["c1"]["submitted"] == "t1"
    assert by_cell["c3"]["job_id"] is None
    assert data["sweep"] == "paper" and data["launcher"] == "slurm_local"  # kept when not given
    write_manifest(sweep, [], launcher="basic")
    assert read_manifest(sweep)["launcher"] == "basic"


def test_manifest_rejects_cell_outside_sweep(tmp_path):
    with pytest.raises(ValueError, match="not inside"):
        write_manifest(tmp_path / "s", [{"run_dir": str(tmp_path / "elsewhere")}])
    assert read_manifest(tmp_path / "nothing") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sweep.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_manifest(tmp_path / "bad")


# ---------------------------------------------------------------- status: scheduler output and state rules
def test_parse_scheduler_output():
    assert parse_duration("1-02:03:04") == 93784
    assert parse_duration("03:04") == 184 and parse_duration("0:07") == 7 and parse_duration("INVALID") is None
    sq = parse_squeue("12_3|RUNNING|1:05\n12_4|PENDING|0:00\n13|COMPLETING|10:00\n")
    assert sq["12_3"].state == "RUNNING" and sq["12_3"].elapsed_s == 65 and sq["12_4"].state == "PENDING"
    sa = parse_sacct("12_1|CANCELLED by 0|7\n12_2|TIMEOUT|1200\n14|REQUEUED|30\n14|COMPLETED|40\n14.batch|COMPLETED|40\n")
    assert sa["12_1"].state == "CANCELLED" and sa["12_2"].state == "TIMEOUT"
    assert sa["14"].state == "COMPLETED" and sa["14"].elapsed_s == 40  # the latest record of a requeued job


def test_array_tasks_missing_from_accounting():
    records = parse_sacct("30_0|COMPLETED|5\n30_[2-3,5]|PENDING|0\n31|CANCELLED by 0|0\n")
    got = match_array_tasks(["30_0", "30_1", "30_3", "30_5", "31_4", "32_0", "33"], records)
    assert got["30_0"].state == "COMPLETED"
    assert got["30_1"].state == "CANCELLED"  # a task cancelled while pending leaves no record; its siblings do
    assert got["30_3"].state == "PENDING" and got["30_5"].state == "PENDING"  # still inside 30_[...]
    assert got["31_4"].state == "CANCELLED"  # the whole array cancelled before it was split into tasks
    assert "32_0" not in got and "33" not in got  # unknown to the scheduler


@pytest.mark.parametrize("job,result,expected", [
    (None, None, "missing"),
    (JobInfo("PENDING", 0, "squeue"), None, "pending"),
    (JobInfo("REQUEUED", 0, "squeue"), None, "pending"),          # requeued after preemption / time-out
    (JobInfo("RUNNING", 5, "squeue"), None, "running"),
    (JobInfo("COMPLETING", 5, "squeue"), None, "running"),
    (JobInfo("TIMEOUT", 60, "sacct"), None, "failed"),            # ended in TIMEOUT: not (or no longer) requeued
    (JobInfo("FAILED", 6, "sacct"), None, "failed"),
    (JobInfo("OUT_OF_MEMORY", 6, "sacct"), None, "failed"),
    (JobInfo("CANCELLED", 6, "sacct"), None, "cancelled"),
    (JobInfo("COMPLETED", 6, "sacct"), None, "failed"),           # finished without writing result.json
    (JobInfo("COMPLETED", 6, "sacct"), "completed", "completed"),
    (JobInfo("CANCELLED", 6, "sacct"), "completed", "completed"),  # result.json settles a cell
    (None, "failed", "failed"),
    (JobInfo("PENDING", 0, "squeue"), "failed", "pending"),       # relaunched: the old failure is history
    (JobInfo("RUNNING", 3, "squeue"), "failed", "running"),
])
def test_cell_state_rules(job, result, expected):
    entry = {"cell": "c", "run_dir": "/x/c", "job_id": None if job is None and result is None else "7"}
    status = cell_state(entry, None if result is None else _result(result), job)
    assert status.state == expected


def _fake_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "grid"
    cells = {
        "dpo/tiny-s/lora-off/seed-0": _result("completed", 0.3125),
        "dpo/tiny-s/lora-off/seed-1": _result("completed", 0.5, task="gsm8k"),
        "simpo/tiny-s/lora-off/seed-0": _result("failed", None),
        "simpo/tiny-s/lora-off/seed-1": None,  # never ran
    }
    for cell, result in cells.items():
        if result is not None:
            write_result(sweep / cell, result)
    write_manifest(sweep, [{"cell": c, "overrides": [f"x={i}"]} for i, c in enumerate(cells)])
    return sweep


def test_status_on_fake_tree_without_job_ids(tmp_path):
    sweep = _fake_sweep(tmp_path)

    def no_scheduler(*_args):  # cells without job ids never reach the scheduler
        raise AssertionError("scheduler queried")

    cells = collect_status(sweep, scheduler=no_scheduler)
    assert [c.state for c in cells] == ["completed", "completed", "failed", "missing"]
    assert cells[0].metric == 0.3125 and cells[1].metric == 0.5 and cells[2].metric is None
    assert cells[0].elapsed_s == 65
    table = format_table(cells)
    assert table.splitlines()[-1] == "completed=2 failed=1 cancelled=0 running=0 pending=0 missing=1"
    assert summary_line(cells) == table.splitlines()[-1]
    assert "0.3125" in table and "0:01:05" in table


def test_status_batches_scheduler_queries(tmp_path):
    sweep = tmp_path / "s"
    write_result(sweep / "done", _result("completed"))
    write_manifest(sweep, [make_entry(sweep, cell=c, job_id=j) for c, j in
                           [("done", "5_0"), ("run", "5_1"), ("gone", "5_2"), ("tout", "6")]])
    calls = []

    def scheduler(ids, final_ids):
        calls.append((sorted(ids), sorted(final_ids)))
        return {"5_1": JobInfo("RUNNING", 3, "squeue"), "6": JobInfo("TIMEOUT", 600, "sacct")}

    cells = {c.cell: c.state for c in collect_status(sweep, scheduler=scheduler)}
    assert cells == {"done": "completed", "run": "running", "gone": "missing", "tout": "failed"}
    # one call for all ids; accounting is only needed for the cells without a result.json
    assert calls == [(["5_0", "5_1", "5_2", "6"], ["5_1", "5_2", "6"])]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.sweep", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_status_wait_and_missing_manifest(tmp_path):
    sweep = _fake_sweep(tmp_path)
    proc = _cli("status", str(sweep))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "completed=2 failed=1 cancelled=0 running=0 pending=0 missing=1"
    assert len(lines) == 1 + 4 + 1  # header, one row per cell, summary
    # nothing pending or running: wait returns at once, 1 because not every cell completed
    proc = _cli("wait", str(sweep), "--interval", "0.1", "--timeout", "30")
    assert proc.returncode == 1 and proc.stdout.strip().splitlines()[-1].startswith("completed=2 failed=1")

    done = tmp_path / "done"
    write_result(done / "a", _result())
    write_manifest(done, [{"cell": "a"}])
    assert _cli("wait", str(done), "--interval", "0.1").returncode == 0

    for command in ("status", "wait"):
        proc = _cli(command, str(tmp_path / "empty"))
        assert proc.returncode == 2
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and "sweep.json" in proc.stderr


# ---------------------------------------------------------------- the launcher plugin, without submitting
def test_launcher_plugin_is_discovered():
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    names = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Launcher)}
    assert "hydra_plugins.posttrain_launcher.PosttrainSlurmLauncher" in names
    assert "posttrain_slurm.yaml" in ConfigStore.instance().list("hydra/launcher")
    for name in ("slurm_local", "slurm_h100"):
        assert (REPO / "conf" / "hydra" / "launcher" / f"{name}.yaml").exists()


def _launcher_params(*overrides: str) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(APP_DIR), version_base=None):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{REPO / 'conf'}]", *overrides],
                      return_hydra_config=True)
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(cfg)
        try:
            return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        finally:
            HydraConfig.instance().cfg = saved


def test_h100_resources_follow_scale_gpus():
    from posttrain.sweep.launcher import executor_parameters

    params = _launcher_params("hydra/launcher=slurm_h100", "+scale.gpus=8", "hydra.launcher.partition=gpu",
                              "hydra.launcher.account=acct", "hydra.launcher.qos=high", "hydra.launcher.cpus_per_gpu=12")
    assert params["_target_"] == "hydra_plugins.posttrain_launcher.PosttrainSlurmLauncher"
    ex = executor_parameters(params)
    assert ex["gpus_per_node"] == 8 and ex["tasks_per_node"] == 8  # one task per GPU
    assert ex["cpus_per_task"] == 12 and "slurm_cpus_per_gpu" not in ex
    assert ex["slurm_mem_per_gpu"] == "120G" and "mem_gb" not in ex
    assert ex["slurm_partition"] == "gpu" and ex["slurm_account"] == "acct" and ex["slurm_qos"] == "high"
    assert ex["slurm_additional_parameters"]["requeue"] is True
    assert ex["slurm_setup"][0] == "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"
    assert params["max_num_timeout"] == 3

    cpu = executor_parameters(_launcher_params("hydra/launcher=slurm_h100", "+scale.gpus=0"))
    assert "gpus_per_node" not in cpu and cpu["tasks_per_node"] == 1 and "slurm_mem_per_gpu" not in cpu
    fixed = executor_parameters(_launcher_params("hydra/launcher=slurm_h100", "hydra.launcher.gpus=2"))
    assert fixed["gpus_per_node"] == 2 and fixed["tasks_per_node"] == 2


def test_local_launcher_config():
    from posttrain.sweep.launcher import executor_parameters

    params = _launcher_params("hydra/launcher=slurm_local", "hydra.launcher.partition=debug")
    ex = executor_parameters(params)
    assert ex["cpus_per_task"] == 1 and ex["mem_gb"] == 2 and ex["slurm_partition"] == "debug"
    assert params["max_num_timeout"] == 3 and params["timeout_min"] > 10


def test_job_threads_follow_slurm_cpus(monkeypatch):
    from posttrain.sweep.launcher import job_threads

    import os

    torch = sys.modules.get("torch")  # job_threads also sets torch's count when torch is imported: restore it
    saved = torch.get_num_threads() if torch is not None else None
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        assert job_threads() == 3
        assert os.environ["OMP_NUM_THREADS"] == "3" and os.environ["MKL_NUM_THREADS"] == "3"
        if torch is not None:
            assert torch.get_num_threads() == 3
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        assert job_threads() == 1
    finally:
        if torch is not None:
            torch.set_num_threads(saved)


def test_default_skip_rule_matches_config_hash(tmp_path):
    """skip_if_done's default skips a cell only when result.json is completed with the cell's own config hash."""
    import copy

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from posttrain.sweep.cells import config_hash
    from posttrain.sweep.launcher import completed_with_same_config

    with initialize_config_dir(config_dir=str(APP_DIR), version_base=None):
        cfg = compose("config", overrides=["seed=3"], return_hydra_config=True)
    task_cfg = copy.deepcopy(cfg)
    with open_dict(task_cfg):
        del task_cfg["hydra"]  # what the job's task function receives
    cell = tmp_path / "cell"
    assert not completed_with_same_config(cfg, cell)  # no result.json
    write_result(cell, {**_result("completed"), "config_hash": config_hash(task_cfg)})
    assert completed_with_same_config(cfg, cell)
    write_result(cell, {**_result("completed"), "config_hash": "0123456789ab"})  # code defaults changed
    assert not completed_with_same_config(cfg, cell)
    write_result(cell, {**_result("failed"), "config_hash": config_hash(task_cfg)})
    assert not completed_with_same_config(cfg, cell)
