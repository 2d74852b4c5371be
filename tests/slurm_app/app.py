"""Minimal Hydra app for the slurm tests (tests/test_slurm.py): behaves like a posttrain run as far as the launcher
and `python -m posttrain.sweep status` can tell.

- writes into HydraConfig.get().runtime.output_dir (the cell directory);
- skips when its result.json already says completed (as run.py does), and exposes `is_done` for the launcher's
  skip_if_done hook;
- counts `steps` steps of `step_s` seconds, saving the counter to ckpt.json after each, and resumes from it, so a
  job requeued after a preemption continues where it stopped; every start is appended to starts.log;
- writes result.json (posttrain.results.write_result) with the job's thread settings and resume point.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from posttrain.results import COMPLETED, FAILED, read_result, write_json_atomic, write_result


def is_done(cell_config: DictConfig, run_dir: Path) -> bool:
    """skip_if_done hook: the cell's result.json says completed."""
    result = read_result(run_dir)
    return bool(result) and result.get("status") == COMPLETED


def _now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds")


@hydra.main(version_base=None, config_path=".", config_name="config")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_done(cfg, out):
        return
    started = _now()
    job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job_id else os.environ.get("SLURM_JOB_ID")
    ckpt = out / "ckpt.json"
    start_step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    with open(out / "starts.log", "a") as handle:
        handle.write(f"{job_id} {start_step} {HydraConfig.get().job.id}\n")
    error = None
    try:
        for step in range(start_step, int(cfg.steps)):
            time.sleep(float(cfg.step_s))
            write_json_atomic(ckpt, {"step": step + 1})
        if cfg.fail:
            raise RuntimeError("failing as asked (fail=true)")
    except Exception as exc:  # not BaseException: submitit's requeue exits with SystemExit and must not fail the run
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": None}
    result = {
        "status": FAILED if error else COMPLETED,
        "algo": str(cfg.variant), "variant": str(cfg.variant), "scale": "tiny-s", "seed": int(cfg.seed), "lora": False,
        "config_hash": "0" * 12, "config": OmegaConf.to_container(cfg, resolve=True),
        "algo_meta": {"family": "supervised", "category": "supervised", "reference_free": True,
                      "length_normalized": False},
        "metrics": {} if error else {"synth_gsm8k": {"exact_match,strict-match": float(cfg.score)}},
        "eval": {}, "train": {"steps": int(cfg.steps)},
        "provenance": {"started": started, "finished": _now(), "hardware": socket.gethostname()},
        "error": error,
        "job": {"id": job_id, "resumed_from": start_step, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "slurm_cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK")},
    }
    write_result(out, result)
    if error:
        raise RuntimeError(error["message"])


if __name__ == "__main__":
    main()
