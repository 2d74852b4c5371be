"""Hydra callback for every multirun, whatever the launcher: sweep.json, one summary line, the exit code.

sweep.json exists from the start of a multirun on (manifest.py): before anything runs, the launching process records
itself as the ``driver`` and lists the cells of a command-line grid (the posttrain sweeper and the Slurm launcher
list theirs); each job adds its cell when it starts if sweep.json does not list it yet. So ``python -m
posttrain.sweep status|wait`` work while a local grid runs and after it is interrupted.

The cells' own job returns say what happened (completed, failed, skipped because already completed, locked by
another launch); at the end one line counts them, and the process exits 1 when any cell failed so scripts notice.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class SweepCallback(Callback):
    def __init__(self) -> None:
        self.outcomes: list[dict] = []

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from posttrain.sweep.manifest import process_info, write_manifest

        self.outcomes = []
        if config.get("dry_run") is True:
            return
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        write_manifest(sweep_dir, _basic_grid_entries(config, sweep_dir), only_new=True,
                       sweep=str(config.get("sweep_name", sweep_dir.name)), driver=process_info())

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.types import RunMode

        from posttrain.sweep.manifest import make_entry, write_manifest

        if config.hydra.mode != RunMode.MULTIRUN or config.get("dry_run") is True or config.get("prepare"):
            return  # a scale's preparation job (posttrain.sweep.preparation) is not a cell
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        try:
            entry = make_entry(sweep_dir, Path(config.hydra.runtime.output_dir).resolve(),
                               overrides=list(config.hydra.overrides.task))
        except ValueError:  # a subdir outside the sweep directory: nothing status could follow
            return
        write_manifest(sweep_dir, [entry], only_new=True)

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


def _basic_grid_entries(config: DictConfig, sweep_dir: Path) -> list[dict]:
    """Entries for every cell of a command-line grid that Hydra's basic sweeper is about to launch (the posttrain
    sweeper and the Slurm launcher list their own); cells whose directory needs composing are added as they start."""
    from posttrain.sweep import files
    from posttrain.sweep.manifest import make_entry

    if "BasicSweeper" not in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")):
        return []
    conf_dir = next((s.path for s in config.hydra.runtime.config_sources
                     if s.provider == "main" and s.schema == "file"), None)
    try:
        cells = files.grid(list(config.hydra.overrides.task), conf_dir)
    except (files.SweepError, files.NotFast, OSError, ValueError):
        return []
    return [make_entry(sweep_dir, cell=c.path, overrides=c.overrides) for c in cells if c.path is not None]
