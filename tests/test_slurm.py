"""The Slurm launcher through a real scheduler (scripts/local_slurm.sh up): submission without blocking, sweep.json,
`python -m posttrain.sweep status|wait`, cancel + relaunch, and requeue after a preemption signal.

The multiruns use the minimal Hydra app in tests/slurm_app (a task that counts checkpointed steps and writes a
result.json); to run the same checks on the real entry point, point APP at launch.py and CELL_ARGS at its keys.
Jobs only sleep, so the tests stay light on CPU; they take about a minute and a half in all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.results import read_result
from posttrain.sweep.manifest import read_manifest
from posttrain.sweep.status import collect_status, count_states

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "local_slurm.sh"
APP = [sys.executable, str(REPO / "tests" / "slurm_app" / "app.py")]
LAUNCHER_ARGS = ["hydra/launcher=slurm_local", f"hydra.searchpath=[file://{REPO / 'conf'}]"]
SKIP_DONE = "hydra.launcher.skip_if_done=app.is_done"  # the app's own "result.json says completed" check

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def local_slurm():
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (sinfo/sbatch missing); start it with scripts/local_slurm.sh up")
    proc = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"local Slurm is down ({proc.stdout.strip() or proc.stderr.strip()}); "
                    "start it with scripts/local_slurm.sh up")


# ---------------------------------------------------------------- helpers
def launch(workdir: Path, sweep: Path, *overrides: str, timeout: float = 120) -> tuple[str, float]:
    """Run a multirun through the Slurm launcher; return its output and wall time. It must not wait for the jobs."""
    t0 = time.monotonic()
    proc = subprocess.run([*APP, "-m", *overrides, *LAUNCHER_ARGS, f"hydra.sweep.dir={sweep}"], cwd=workdir,
                          capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out, elapsed


def sweep_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.sweep", *args], capture_output=True, text=True,
                          timeout=timeout)


def states(sweep: Path) -> dict[str, str]:
    return {c.cell: c.state for c in collect_status(sweep)}


def job_ids(sweep: Path) -> dict[str, str]:
    return {c["cell"]: c["job_id"] for c in read_manifest(sweep)["cells"]}


def poll(sweep: Path, until, timeout: float = 90, interval: float = 0.5, seen: list | None = None) -> dict:
    """Poll the cells' states until ``until(states)``; every observation is appended to ``seen``."""
    end = time.monotonic() + timeout
    while True:
        current = states(sweep)
        if seen is not None:
            seen.append(current)
        if until(current):
            return current
        if time.monotonic() > end:
            raise AssertionError(f"timed out; last states {current}")
        time.sleep(interval)


def ckpt_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "ckpt.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def wait_for_step(run_dir: Path, step: int, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while ckpt_step(run_dir) < step:
        assert time.monotonic() < end, f"{run_dir} never reached step {step}"
        time.sleep(0.3)


def sacct_records(job_id: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "State"], capture_output=True,
                         text=True, timeout=60).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------- tests
def test_multirun_submits_without_waiting_and_all_cells_complete(tmp_path):
    sweep = tmp_path / "grid"
    out, elapsed = launch(tmp_path, sweep, "variant=a,b,c", "seed=0,1", "steps=4", "step_s=1")
    assert "Submitted 6 cell(s)" in out
    # Back before the jobs could have finished (each sleeps 4 s after its start): nothing completed yet.
    first = states(sweep)
    assert len(first) == 6 and set(first.values()) <= {"pending", "running"}, (elapsed, first)

    manifest = read_manifest(sweep)
    assert manifest["launcher"] == "slurm_local"
    ids = [c["job_id"] for c in manifest["cells"]]
    assert len(set(ids)) == 6 and len({i.split("_")[0] for i in ids}) == 1  # one job array
    assert sorted(c["cell"] for c in manifest["cells"]) == sorted(
        f"{v}/lora-off/seed-{s}" for v in "abc" for s in (0, 1))
    assert all(c["run_dir"] == str(sweep / c["cell"]) and c["submitted"] for c in manifest["cells"])

    # Launching the same multirun again while its jobs are queued or running submits nothing twice.
    out, _ = launch(tmp_path, sweep, "variant=a,b,c", "seed=0,1", "steps=4", "step_s=1", SKIP_DONE)
    assert "Submitted 0 cell(s)" in out, out
    assert [c["job_id"] for c in read_manifest(sweep)["cells"]] == ids

    waiter = subprocess.Popen([sys.executable, "-m", "posttrain.sweep", "wait", str(sweep), "--interval", "1",
                               "--timeout", "240"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict] = []
    poll(sweep, lambda s: all(v == "completed" for v in s.values()), timeout=240, seen=seen)
    stdout, stderr = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, stderr
    assert stdout.strip().splitlines()[-1] == "completed=6 failed=0 cancelled=0 running=0 pending=0 missing=0"
    for observed in seen:  # status throughout: every cell accounted for, only these states
        assert len(observed) == 6 and set(observed.values()) <= {"pending", "running", "completed"}
    assert any("running" in s.values() for s in [first, *seen])

    proc = sweep_cli("status", str(sweep))
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "completed=6 failed=0 cancelled=0 running=0 pending=0 missing=0"
    assert sum("0.2500" in line for line in lines) == 6
    for cell in manifest["cells"]:
        result = read_result(cell["run_dir"])
        assert result["status"] == "completed"
        # torch/OMP threads follow the CPUs Slurm allotted (slurm_local: 1 per task)
        assert result["job"]["omp_num_threads"] == result["job"]["slurm_cpus_per_task"] == "1"
        assert result["job"]["id"] == cell["job_id"]


def test_cancelled_cell_is_relaunched_and_completes(tmp_path):
    sweep = tmp_path / "grid"
    args = ["variant=k", "seed=0,1", "steps=12", "step_s=0.5"]
    launch(tmp_path, sweep, *args)
    first_ids = job_ids(sweep)
    victim, other = "k/lora-off/seed-0", "k/lora-off/seed-1"
    poll(sweep, lambda s: s[victim] == "running")
    wait_for_step(sweep / victim, 1)
    subprocess.run(["scancel", first_ids[victim]], check=True, timeout=60)
    poll(sweep, lambda s: s[victim] == "cancelled", timeout=60)

    proc = sweep_cli("wait", str(sweep), "--interval", "1", "--timeout", "120")
    assert proc.returncode == 1, proc.stderr  # not every cell completed
    assert proc.stdout.strip().splitlines()[-1] == "completed=1 failed=0 cancelled=1 running=0 pending=0 missing=0"

    # Relaunch the same multirun: the completed cell is skipped, the cancelled one resubmitted.
    out, _ = launch(tmp_path, sweep, *args, SKIP_DONE)
    assert "Submitted 1 cell(s)" in out and "1 skipped" in out, out
    second_ids = job_ids(sweep)
    assert second_ids[other] == first_ids[other] and second_ids[victim] != first_ids[victim]
    assert states(sweep)[victim] in ("pending", "running")

    proc = sweep_cli("wait", str(sweep), "--interval", "1", "--timeout", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "completed=2 failed=0 cancelled=0 running=0 pending=0 missing=0"
    result = read_result(sweep / victim)
    assert result["job"]["id"] == second_ids[victim]
    assert result["job"]["resumed_from"] >= 1  # picked up the cancelled attempt's checkpoint


def test_preempted_job_is_requeued_and_resumes_from_checkpoint(tmp_path):
    sweep = tmp_path / "grid"
    launch(tmp_path, sweep, "variant=p", "seed=0", "steps=16", "step_s=0.5")
    cell = "p/lora-off/seed-0"
    run_dir = sweep / cell
    job_id = job_ids(sweep)[cell]
    wait_for_step(run_dir, 3)
    # What a preemption looks like to the job (submitit's Job._interrupt): SIGTERM, ignored by submitit, then
    # USR2 -> checkpoint() -> `scontrol requeue` of the same call.
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=60)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    seen: list[dict] = []
    poll(sweep, lambda s: s[cell] == "completed", timeout=180, seen=seen)
    observed = [s[cell] for s in seen]
    assert set(observed) <= {"running", "pending", "completed"}, observed  # never failed or cancelled
    assert "pending" in observed, observed  # back in the queue after the requeue

    assert sweep_cli("wait", str(sweep), "--interval", "1", "--timeout", "60").returncode == 0
    records = sacct_records(job_id)
    assert "REQUEUED" in records and records[-1] == "COMPLETED", records
    starts = (run_dir / "starts.log").read_text().split("\n")
    starts = [line.split() for line in starts if line.strip()]
    assert len(starts) == 2 and starts[0][1] == "0" and int(starts[1][1]) >= 3, starts
    result = read_result(run_dir)
    assert result["status"] == "completed" and result["job"]["resumed_from"] >= 3
    assert job_ids(sweep)[cell] == job_id  # requeued under the same job id


def test_failing_task_is_failed_in_status_and_in_slurm(tmp_path):
    sweep = tmp_path / "grid"
    launch(tmp_path, sweep, "variant=f", "seed=0", "steps=1", "step_s=0", "fail=true")
    proc = sweep_cli("wait", str(sweep), "--interval", "1", "--timeout", "120")
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == "completed=0 failed=1 cancelled=0 running=0 pending=0 missing=0"
    job_id = job_ids(sweep)["f/lora-off/seed-0"]
    # The task's exception is re-raised after Hydra caught it, so Slurm records the job as FAILED too.
    end = time.monotonic() + 30
    while sacct_records(job_id)[-1:] != ["FAILED"]:
        assert time.monotonic() < end, sacct_records(job_id)
        time.sleep(0.5)
    status = sweep_cli("status", str(sweep)).stdout
    assert "failed (RuntimeError)" in status
    assert count_states(collect_status(sweep))["failed"] == 1
