"""Faults leave records (issue 13): Ctrl-C and SIGTERM write result.json ``cancelled`` with the steps done and the
checkpoint kept, one line, exit 130 / 143; a relaunch says where it resumes; environment failures are one line; and
``python -m posttrain.sweep status|wait`` follow a local grid while it runs and after it is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, launch, read_json
from posttrain.preemption import Cancelled, Preemption, cancellation, signal_of
from posttrain.sweep.manifest import process_info, read_manifest, running, write_manifest
from posttrain.sweep.status import cell_state, collect_status

CELL = "dpo/tiny-s/lora-off/seed-0"


# ------------------------------------------------------------------ in-process: the signal plumbing
def test_a_cancel_signal_in_the_loop_waits_for_the_step_end_and_a_second_one_stops_at_once():
    with Preemption(every_minutes=None) as p:
        os.kill(os.getpid(), signal.SIGINT)  # delivered to this (main) thread before kill returns
        assert p.pending is not None and p.pending[0] == signal.SIGINT
        assert p.due(lambda v: v) == (True, True)  # checkpoint now, then stop
        with pytest.raises(Cancelled) as info:
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: at once
        assert signal_of(info.value) == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with Preemption(every_minutes=None) as p:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Cancelled) as info:
            p.hand_over()  # after the step's checkpoint
        assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)


def test_sigterm_unwinds_like_ctrl_c_inside_a_run_and_a_handler_already_there_is_left_alone():
    with cancellation():
        with pytest.raises(Cancelled):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))  # submitit's bypass handler
    try:
        with cancellation():
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_local_cells_are_running_pending_or_gone_from_their_markers(tmp_path):
    entry = {"cell": "a/s/lora-off/seed-0", "run_dir": str(tmp_path), "job_id": None}
    with running(tmp_path):
        assert cell_state(entry, None, None, json.loads((tmp_path / ".running.json").read_text())).state == "running"
    assert not (tmp_path / ".running.json").exists()
    dead = {**process_info(), "pid": _dead_pid()}
    assert cell_state(entry, None, None, dead).state == "failed"  # kill -9: the marker stays, its process is gone
    assert cell_state(entry, None, None, None, driver_alive=True).state == "pending"
    assert cell_state(entry, None, None, None, driver_alive=False).state == "missing"
    cancelled = {"status": "cancelled", "error": {"type": "KeyboardInterrupt", "message": "SIGINT after 3 steps"}}
    state = cell_state(entry, cancelled, None)
    assert (state.state, state.detail) == ("cancelled", "SIGINT after 3 steps")


def test_sweep_json_keeps_its_driver_and_only_new_never_replaces(tmp_path):
    write_manifest(tmp_path, [{"cell": "a", "job_id": "7"}], driver=process_info())
    write_manifest(tmp_path, [{"cell": "a", "job_id": None}, {"cell": "b"}], only_new=True)
    data = read_manifest(tmp_path)
    assert [(c["cell"], c["job_id"]) for c in data["cells"]] == [("a", "7"), ("b", None)]
    assert data["driver"]["pid"] == os.getpid()
    assert [c.state for c in collect_status(tmp_path, scheduler=lambda *a: {})] == ["missing", "pending"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ environment failures: one line
def test_an_output_root_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "logger=none", f"output_root={blocker}/out"],
                          cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: output_root={blocker}/out: cannot write there")


def test_a_slurm_launcher_without_slurm_is_one_line(tmp_path):
    (tmp_path / "bin").mkdir()
    proc = launch(["-m", "hydra/launcher=slurm_h100", "logger=none"], tmp_path, env={"PATH": str(tmp_path / "bin")},
                  timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: hydra/launcher=slurm_h100 submits to Slurm, but there is no sbatch")


# ------------------------------------------------------------------ real runs, real signals
def _start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    err = cwd / f"stderr-{time.monotonic_ns()}.txt"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args, f"output_root={cwd}/outputs"], cwd=cwd,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=open(err, "w"))
    return proc, err


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _steps_shown(err: Path) -> int:
    import re

    found = re.findall(r"training dpo:\s+\d+%\|[^|]*\|\s*(\d+)/", err.read_text(errors="replace"))
    return int(found[-1]) if found else 0


RUN = ["logger=none", "eval.limit=10", "trainer.threads=1"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_leave_a_cancelled_record_with_the_steps_done(tiny_base, tmp_path, sig, code):
    proc, err = _start(RUN, tmp_path)
    _wait_for(lambda: _steps_shown(err) >= 2, 600, "two training steps")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    stderr = err.read_text(errors="replace")
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    cell = tmp_path / "outputs/run" / "dpo@eval.limit=10/tiny-s/lora-off/seed-0"
    result = read_json(cell / "result.json")
    assert result["status"] == "cancelled" and result["train"]["steps"] >= 2
    assert result["error"]["message"] == f"{sig.name} after {result['train']['steps']} steps"
    assert (cell / "checkpoint/checkpoint.pt").exists(), "the checkpoint is kept (written at the step it stopped)"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("[cancelled] dpo@eval.limit=10/tiny-s/lora-off/seed-0: ") and "a relaunch resumes" in last
    if sig == signal.SIGTERM:  # the relaunch says where it resumes and why, in one line
        again, err2 = _start(RUN, tmp_path)
        line = _wait_for(lambda: next((ln for ln in again.stdout if ln.startswith("[resumed]")), None), 600,
                         "the resume line")
        again.send_signal(signal.SIGINT)
        again.send_signal(signal.SIGINT)
        again.communicate(timeout=300)
        assert line.startswith(f"[resumed] training continues from step {result['train']['steps']} of ")
        assert str(cell / "checkpoint/checkpoint.pt") in line


@pytest.mark.slow
def test_status_follows_a_local_grid_while_it_runs_and_after_ctrl_c(tiny_base, tmp_path):
    proc, err = _start(["-m", "algo=dpo,simpo", *RUN], tmp_path)
    sweep = tmp_path / "outputs/grid"

    def status() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "posttrain.sweep", "status", str(sweep)], text=True,
                              capture_output=True, timeout=120)

    first = _wait_for(lambda: (s := status()).returncode == 0 and s, 300, "sweep.json")
    assert "pending=" in first.stdout and "simpo@eval.limit=10/tiny-s/lora-off/seed-0" in first.stdout
    during = _wait_for(lambda: "running=1 pending=1" in (s := status()).stdout and s, 600, "the first cell running")
    assert "dpo@eval.limit=10/tiny-s/lora-off/seed-0" in during.stdout
    _wait_for(lambda: _steps_shown(err) >= 1, 600, "a training step")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    after = status()
    assert after.stdout.strip().splitlines()[-1] == "completed=0 failed=0 cancelled=1 running=0 pending=0 missing=1"
    waited = subprocess.run([sys.executable, "-m", "posttrain.sweep", "wait", str(sweep), "--interval", "0.1",
                             "--timeout", "30"], text=True, capture_output=True, timeout=120)
    assert waited.returncode == 1 and "cancelled=1" in waited.stdout  # returns: nothing left running
