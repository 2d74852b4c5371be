"""The real pipeline (launch.py -> run.py -> train -> lm-eval) through the real local Slurm scheduler.

tests/test_slurm.py checks the launcher's scheduling behaviour with a light app; this file sends the actual tiny
runs through sbatch: a 6-cell grid completes to result.json files, and a real run preempted mid-training (USR2) is
requeued by submitit and resumes from its checkpoint.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, ROOT, read_json
from posttrain.sweep.manifest import read_manifest
from posttrain.sweep.status import collect_status

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def local_slurm(tiny_base):
    proc = subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "status"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"local Slurm is down ({proc.stdout.strip()}); start it with scripts/local_slurm.sh up")


def _launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "-m", *args, "hydra/launcher=slurm_local",
                           f"output_root={tmp_path}/outputs"], cwd=tmp_path, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _wait(sweep: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.sweep", "wait", str(sweep), "--interval", "2",
                           "--timeout", str(timeout)], text=True, capture_output=True, timeout=timeout + 60)


def _times(job_id: str) -> tuple[str, str, str]:
    """(state, start, end) of a job (its array's first task) as sacct reports them."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,Start,End"], text=True,
                         capture_output=True, timeout=60).stdout
    return tuple(out.strip().splitlines()[0].split("|"))


def test_six_tiny_cells_run_through_slurm_after_their_scale_s_preparation_job(tmp_path, monkeypatch):
    # a cache root of its own (the built bases and task files linked in), so the preparation job has to build the
    # scale's self-play data, base scores and reference log-probs on every run of this test
    from posttrain.cache import cache_root

    shared, own = cache_root(), tmp_path / "cache"
    own.mkdir()
    for kind in ("bases", "tasks", "python"):
        if (shared / kind).exists():
            (own / kind).symlink_to(shared / kind, target_is_directory=True)
    monkeypatch.setenv("POSTTRAIN_CACHE", str(own))
    grid = ["algo=sft,dpo,simpo", "seed=0,1", *FAST]
    started = time.monotonic()
    proc = _launch(tmp_path, *grid)
    assert time.monotonic() - started < 120, "the launch returns once the cells are submitted"
    [prep] = re.findall(r"preparation job (\d+)", proc.stdout + proc.stderr)
    sweep = tmp_path / "outputs/grid"
    cells = read_manifest(sweep)["cells"]
    assert len(cells) == 6 and all(c["job_id"] for c in cells), "the preparation job is not a cell"
    waited = _wait(sweep)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert waited.stdout.strip().splitlines()[-1] == \
        "completed=6 failed=0 cancelled=0 running=0 pending=0 missing=0"
    state, _, prep_end = _times(prep)
    assert state == "COMPLETED"
    log = next(sweep.glob(f".submitit/{prep}/{prep}_0_log.out")).read_text()
    assert "[prepared] tiny-s: data pairs, selfplay_chosen; reference log-probs pairs" in log, log
    assert "reference_logps" in log and "selfplay" in log, "it built the scale's data and reference log-probs"
    for cell in cells:
        result = read_json(Path(cell["run_dir"]) / "result.json")
        assert result["status"] == "completed" and result["train"]["steps"] == 4
        assert result["provenance"]["hardware"]["torch_threads"] == 1, "threads follow Slurm's CPU allotment"
        assert _times(cell["job_id"])[1] >= prep_end, "every cell started after the preparation job ended"
        hits = result["provenance"]["cache_hits"]
        assert hits and all(hits.values()), f"every shared artifact came from the cache: {hits}"
        assert result["train"]["reference_cache"] is (result["algo"] == "dpo")
    # relaunching the completed grid submits nothing, not even a preparation job
    proc = _launch(tmp_path, *grid)
    assert "Submitted 0 cell(s)" in proc.stdout + proc.stderr and "preparation job" not in proc.stdout + proc.stderr


def _progress(sweep: Path, total: int) -> int:
    """The highest training step the job's progress bar shows in its submitit log (0 before training starts)."""
    steps = [0]
    for log in sweep.glob(".submitit/*/*_log.err"):
        steps += [int(m) for m in re.findall(rf"(\d+)/{total} \[", log.read_text(errors="replace"))]
    return max(steps)


def test_preempted_real_run_checkpoints_at_the_signal_and_resumes_from_that_step(tmp_path):
    """No step-count checkpoints and a 30-minute interval: the only checkpoint before the requeue is the one the
    signal triggers, in the middle of the first epoch (micro-batch 1: an epoch of the default data is longer than
    the 200-step run)."""
    args = ["algo=sft", "logger=none", "trainer.max_steps=200", "trainer.micro_batch_size=1",
            "trainer.checkpoint_every=0", "trainer.checkpoint_minutes=30", "eval.limit=10"]
    _launch(tmp_path, *args)
    sweep = tmp_path / "outputs/grid"
    [cell] = read_manifest(sweep)["cells"]
    deadline = time.monotonic() + 600
    while _progress(sweep, 200) < 5:
        assert time.monotonic() < deadline, "training did not reach step 5"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", cell["job_id"]], check=True, timeout=60)
    waited = _wait(sweep)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    result = read_json(Path(cell["run_dir"]) / "result.json")
    assert result["status"] == "completed" and result["train"]["steps"] == 200
    assert result["train"]["dataset_size"] > 200, "the signal came mid-epoch"
    assert 5 <= result["train"]["resumed_from"] < 200, "resumed from the step the signal came in, not from zero"
    assert [s for s, _ in result["train"]["loss_curve"]] == list(range(1, 201)), "one continuous loss curve"
    sacct = subprocess.run(["sacct", "-n", "-X", "-j", cell["job_id"].split("_")[0], "-o", "State", "-D"],
                           text=True, capture_output=True).stdout
    assert "REQUEUED" in sacct or "PREEMPTED" in sacct, sacct
    assert [c.state for c in collect_status(sweep)] == ["completed"]


def test_a_failed_preparation_job_cancels_its_cells_and_status_says_why(tmp_path):
    proc = _launch(tmp_path, "algo=dpo,simpo", "scale.model=/nonexistent/model", *FAST)
    [prep] = re.findall(r"preparation job (\d+)", proc.stdout + proc.stderr)
    sweep = tmp_path / "outputs/grid"
    assert all(c["after"] == prep for c in read_manifest(sweep)["cells"])
    waited = _wait(sweep, timeout=300)
    assert waited.returncode != 0
    cells = collect_status(sweep)
    assert len(cells) == 2 and {c.state for c in cells} <= {"cancelled", "failed"}, cells
    for cell in cells:
        assert f"preparation job {prep} FAILED" in cell.detail and ".submitit" in cell.detail
        assert not (Path(cell.run_dir) / "result.json").exists(), "Slurm never started the cell"
    log = next(sweep.glob(f".submitit/{prep}/{prep}_0_log.err")).read_text()
    assert "nonexistent" in log
