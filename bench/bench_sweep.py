"""Sweep machinery benchmarks; results appended as JSON lines to bench/results/sweep.jsonl.

    python bench/bench_sweep.py [--repeat 5] [--only dry_run,slurm_submit,relaunch] [--start-slurm]

(a) dry_run       `python launch.py -m sweep=paper dry_run=true`: wall time, interpreter start included (target <= 5 s).
(b) slurm_submit  submission of the tiny study (sweep=paper_tiny) to the local Slurm cluster: time until launch.py
                  returns. The jobs are submitted held (sbatch --hold) and cancelled right after, so nothing runs;
                  skipped with a note when `scripts/local_slurm.sh status` says down (--start-slurm brings it up).
(c) relaunch      relaunch of a completed sweep=paper: a fake completed tree (per cell a result.json with the config
                  hash Hydra's composition gives, padded to a real result's size, and the .config_key.json its job
                  would have written), then `launch.py -m sweep=paper`: first with the jobs' key files only (a
                  Slurm sweep's first relaunch), then twice with the sweep's memo, then cold (memo and key files
                  removed, as after a conf change: composes every completed cell). Target < 2 s; zero cells may be
                  launched and no result.json may change.

Sweeps whose algorithms have no conf/algo file yet are benchmarked without those algorithms (recorded in the line
as "dropped"), since Hydra cannot compose them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sweep.jsonl"
sys.path.insert(0, str(ROOT / "src"))


def machine() -> dict:
    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except OSError:
        return None


def record(name: str, payload: dict) -> dict:
    line = {"bench": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_sha": git_sha(),
            "machine": machine(), **payload}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as handle:
        handle.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)
    return line


def run_launch(args: list[str], cwd: Path, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    return time.perf_counter() - t0, proc


def composable_sweeps(tmp: Path) -> tuple[Path, list[str]]:
    """A copy of sweeps/ whose algo lists keep only algorithms with a conf/algo file; returns (dir, dropped)."""
    out = tmp / "sweeps"
    out.mkdir(parents=True, exist_ok=True)
    dropped: set[str] = set()
    for path in (ROOT / "sweeps").glob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        for part in data.get("parts") or []:
            algos = part["grid"].get("algo")
            if algos is None:
                continue
            algos = algos if isinstance(algos, list) else [algos]
            keep = [a for a in algos if (ROOT / "conf" / "algo" / f"{a}.yaml").is_file()]
            dropped |= set(algos) - set(keep)
            part["grid"]["algo"] = keep or ["dpo"]
        (out / path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    return out, sorted(dropped)


# ------------------------------------------------------------------ (a)
def bench_dry_run(repeat: int, work: Path) -> dict:
    times, lines = [], None
    for _ in range(repeat):
        elapsed, proc = run_launch(["-m", "sweep=paper", "dry_run=true", f"output_root={work}/outputs"], work)
        if proc.returncode != 0:
            raise SystemExit(f"dry run failed: {proc.stderr[-2000:]}")
        times.append(elapsed)
        lines = proc.stdout.splitlines()
    return record("dry_run_paper", {
        "command": "python launch.py -m sweep=paper dry_run=true", "cells": int(lines[-1].split()[0]),
        "wall_s_min": round(min(times), 3), "wall_s_median": round(statistics.median(times), 3),
        "wall_s_all": [round(t, 3) for t in times], "target_s": 5.0})


# ------------------------------------------------------------------ (b)
def slurm_up(start: bool) -> tuple[bool, str]:
    script = ROOT / "scripts" / "local_slurm.sh"
    proc = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    if start:
        up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=600)
        return up.returncode == 0, (up.stdout + up.stderr).strip()
    return False, (proc.stdout + proc.stderr).strip()


def bench_slurm_submit(work: Path, start: bool) -> dict:
    ok, note = slurm_up(start)
    if not ok:
        return record("slurm_submit_paper_tiny", {"skipped": True, "note": f"local Slurm is down: {note}"})
    sweeps, dropped = composable_sweeps(work)
    sweep_file = sweeps / "paper_tiny.yaml"
    from posttrain.sweep import files

    n_cells = len(files.expand(sweep_file, [], ROOT / "conf"))
    args = ["-m", f"sweep={sweep_file}", "hydra/launcher=slurm_local",
            "+hydra.launcher.additional_parameters.hold=true", f"output_root={work}/outputs"]
    elapsed, proc = run_launch(args, work)
    manifest_path = work / "outputs" / "paper_tiny" / "sweep.json"
    ids = []
    if manifest_path.is_file():
        ids = sorted({str(c["job_id"]).split("_")[0] for c in json.loads(manifest_path.read_text())["cells"]
                      if c.get("job_id")})
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"submission failed: {(proc.stdout + proc.stderr)[-3000:]}")
    out = proc.stdout + proc.stderr
    submitted = next((line for line in out.splitlines() if "Submitted" in line), "")
    return record("slurm_submit_paper_tiny", {
        "command": "python launch.py -m sweep=paper_tiny hydra/launcher=slurm_local (held, then cancelled)",
        "cells": n_cells, "dropped_algos": dropped, "wall_s": round(elapsed, 3), "job_arrays": ids,
        "launcher_line": submitted.split("] ", 1)[-1][:200], "slurm": note})


# ------------------------------------------------------------------ (c)
def fake_completed_tree(sweep_file: Path, sweep_dir: Path, task_args: list[str]) -> int:
    """result.json per cell, completed, with the config hash of Hydra's composition (padded like a real result),
    and the .config_key.json a job writes before it runs (posttrain.sweep.sweeper.MemoTask)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from posttrain.sweep import files
    from posttrain.sweep.cells import config_hash
    from posttrain.sweep.sweeper import CELL_KEY_FILE, conf_fingerprint, memo_key

    cells = files.expand(sweep_file, task_args, ROOT / "conf")
    fingerprint = None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for cell in cells:
            full = compose("config", overrides=list(cell.overrides), return_hydra_config=True)
            if fingerprint is None:
                fingerprint = conf_fingerprint(OmegaConf.to_container(full.hydra.runtime.config_sources))
            cfg = compose("config", overrides=list(cell.overrides), return_hydra_config=False)
            run_dir = sweep_dir / cell.path
            run_dir.mkdir(parents=True, exist_ok=True)
            chash = config_hash(cfg)
            payload = {"status": "completed", "config_hash": chash,
                       "config": OmegaConf.to_container(cfg, resolve=True),
                       "train": {"loss_curve": [[i, 0.69 - i * 1e-4] for i in range(1, 301)]},
                       "metrics": {"synth_gsm8k": {"exact_match,strict-match": 0.4}}}
            (run_dir / "result.json").write_text(json.dumps(payload, indent=2))
            (run_dir / CELL_KEY_FILE).write_text(json.dumps({"key": memo_key(fingerprint, cell.overrides),
                                                             "hash": chash}))
    return len(cells)


def bench_relaunch(work: Path) -> dict:
    from posttrain.sweep.sweeper import CELL_KEY_FILE, MEMO_FILE

    sweeps, dropped = composable_sweeps(work)
    sweep_file = sweeps / "paper.yaml"
    sweep_dir = work / "outputs" / "paper"
    args = ["-m", f"sweep={sweep_file}", f"output_root={work}/outputs"]
    t0 = time.perf_counter()
    # the task overrides launch.py hands the sweeper for `args`: sweep_name (from sweep=) then output_root
    n_cells = fake_completed_tree(sweep_file, sweep_dir, ["sweep_name=paper", f"output_root={work}/outputs"])
    build_s = time.perf_counter() - t0
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("result.json")}
    runs = []
    for label in ("first relaunch: hashes from the jobs' .config_key.json", "relaunch: sweep memo",
                  "relaunch: sweep memo", "cold: no memo at all (as after a conf change), composes every cell"):
        if label.startswith("cold"):
            (sweep_dir / MEMO_FILE).unlink()
            for key_file in sweep_dir.rglob(CELL_KEY_FILE):
                key_file.unlink()
        elapsed, proc = run_launch(args, work)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SystemExit(f"relaunch failed: {out[-3000:]}")
        line = next((x for x in proc.stdout.splitlines() if "already completed" in x), "")
        launched = "Launching" in out or "[completed]" in out or " 0 to launch" not in line
        runs.append({"run": label, "wall_s": round(elapsed, 3), "sweeper_line": line.split(": ", 1)[-1],
                     "launched_any": launched})
    changed = [str(p) for p, t in before.items() if p.stat().st_mtime_ns != t]
    return record("relaunch_completed_paper", {
        "command": "python launch.py -m sweep=paper (every cell completed)", "cells": n_cells,
        "dropped_algos": dropped, "fake_tree_build_s": round(build_s, 2), "runs": runs,
        "cells_reexecuted": 0 if not changed and not any(r["launched_any"] for r in runs) else len(changed) or -1,
        "target_s": 2.0})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="dry-run repetitions (5)")
    parser.add_argument("--only", default="dry_run,slurm_submit,relaunch", help="comma list of benchmarks")
    parser.add_argument("--start-slurm", action="store_true", help="bring the local Slurm up when it is down")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        if "dry_run" in chosen:
            (work / "a").mkdir(parents=True)
            bench_dry_run(args.repeat, work / "a")
        if "slurm_submit" in chosen:
            (work / "b").mkdir(parents=True)
            bench_slurm_submit(work / "b", args.start_slurm)
        if "relaunch" in chosen:
            (work / "c").mkdir(parents=True)
            bench_relaunch(work / "c")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
