"""Hydra callback for every multirun, whatever the launcher: sweep.json, one summary line, the exit code.

The cells' own job returns say what happened (completed, failed, skipped because already completed, locked by
another launch); at the end one line counts them, and the process exits 1 when any cell failed so scripts notice.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.outcomes: list[dict] = []

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.outcomes = []

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        try:
            value = job_return.return_value
        except BaseException as exc:  # noqa: BLE001 - a job that raised is a failed cell
            value = {"status": "failed", "error": str(exc)}
        entry = dict(value) if isinstance(value, dict) else {"status": "failed"}
        entry["overrides"] = list(job_return.overrides or [])
        self.outcomes.append(entry)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from posttrain.sweep.manifest import write_manifest

        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        launcher = str(config.hydra.launcher.get("_target_", "basic")).rsplit(".", 1)[-1]
        if not self.outcomes:  # a submitting launcher (Slurm): the jobs run elsewhere and it wrote sweep.json
            return
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries = [{"cell": o["cell"], "run_dir": o["run_dir"], "overrides": o["overrides"], "job_id": None,
                    "submitted": now} for o in self.outcomes if "cell" in o]
        if entries and not any(o.get("status") == "dry_run" for o in self.outcomes):
            write_manifest(sweep_dir, entries, sweep=str(config.get("sweep_name", sweep_dir.name)),
                           launcher=launcher)
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.get("status", "failed")] = counts.get(o.get("status", "failed"), 0) + 1
        if counts.get("dry_run"):
            print(f"{counts['dry_run']} cells", flush=True)
            return
        ran = counts.get("completed", 0) + counts.get("failed", 0)
        print(f"sweep {sweep_dir}: {len(self.outcomes)} cells: {counts.get('completed', 0)} completed, "
              f"{counts.get('failed', 0)} failed, {counts.get('skipped', 0)} skipped (already completed), "
              f"{counts.get('locked', 0)} running elsewhere; {ran} executed", flush=True)
        if counts.get("failed"):
            sys.exit(1)
