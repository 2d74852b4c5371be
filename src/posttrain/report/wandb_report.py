"""``--wandb``: the report as ONE W&B run per sweep (job_type "report", stable id, resumed on every call), in the
sweep's group and the project its own config names (``logger.project``), plus the sweep's dashboard view.

Ids and groups come from :mod:`posttrain.tracker` (the sweep directory's resolved path, never its name), so the
report run sits beside the sweep's training runs. Offline (the default) nothing can be saved to the server: one
line says where the offline runs are and how to sync them (docs/design.md "Report").
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from posttrain.report.builder import Analysis
from posttrain.report.dashboard import build_workspace, save_workspace
from posttrain.report.format import UserError
from posttrain.results import iter_results
from posttrain.tracker import report_run_id, sweep_group


def sweep_logger(root: Path) -> dict:
    """The ``logger`` section of the sweep's own config (the first result.json that has one with a project)."""
    found: dict = {}
    for _, result in iter_results(root, []):
        logger = ((result or {}).get("config") or {}).get("logger") if isinstance(result, dict) else None
        if isinstance(logger, dict) and logger.get("project"):
            if logger.get("name") == "wandb":
                return logger
            found = found or logger
    return found


def report_summary(analysis: Analysis) -> dict:
    """``<metric>/<variant>/<scale>/lora-<x>/mean`` and ``.../delta`` (mean minus the base's score)."""
    out = {}
    for row in analysis.cells.itertuples(index=False):
        key = f"{row.metric}/{row.variant}/{row.scale}/lora-{row.lora}"
        out[f"{key}/mean"] = float(row.mean)
        if math.isfinite(row.delta):
            out[f"{key}/delta"] = float(row.delta)
    return out


def log_to_wandb(root: Path, analysis: Analysis) -> str:
    """Log tables, plots, report.md and the summary to the sweep's report run; save (or say why not) its view.

    Returns the one line printed about the dashboard view.
    """
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package (pip install wandb)") from None
    logger = sweep_logger(root)
    group = sweep_group(root)
    project = logger.get("project") or os.environ.get("WANDB_PROJECT") or "posttrain"
    mode = os.environ.get("WANDB_MODE") or logger.get("mode") or "offline"
    run = wandb.init(project=project, entity=logger.get("entity"), group=group, job_type="report",
                     id=report_run_id(root), resume="allow", name=f"report-{group}", dir=str(root), mode=mode,
                     config={"report_dir": str(Path(root).resolve()), "metrics": list(analysis.metrics)},
                     reinit="finish_previous", settings=wandb.Settings(silent=True, console="off",
                                                                       x_disable_stats=True))
    try:
        for name, frame in (("summary", analysis.summary), ("comparisons", analysis.comparisons),
                            ("inversions", analysis.inversions), ("power", analysis.power)):
            if not frame.empty:
                run.log({name: wandb.Table(dataframe=frame.astype(object).where(frame.notna(), None))})
        if analysis.plots:
            run.log({f"plots/{key}": wandb.Image(str(path)) for key, path in analysis.plots.items()})
        for key, value in report_summary(analysis).items():
            run.summary[key] = value
        artifact = wandb.Artifact(f"report-{re.sub(r'[^A-Za-z0-9._-]', '_', group)}", type="report")
        for fname in ("report.md", "summary.csv", "comparisons.csv", "inversions.csv", "power.csv"):
            if (root / fname).exists():
                artifact.add_file(str(root / fname))
        run.log_artifact(artifact)
        entity = logger.get("entity") or (None if mode == "offline" else _default_entity(wandb))
        view = build_workspace(entity=entity or "offline", project=project, group=group, metrics=analysis.metrics)
    finally:
        run.finish()
    if view is None:
        line = "W&B dashboard view not built: pip install wandb-workspaces (pip install -e '.[wandb]')"
    elif mode != "online":
        line = (f"W&B dashboard view not saved ({mode} mode); the offline runs are under {root}: sync them with "
                f"`{sync_command(root)}`, then rerun with WANDB_MODE=online to save the view")
    else:
        try:
            line = f"W&B dashboard view saved: {save_workspace(view)}"
        except Exception as exc:  # noqa: BLE001 - network, login, permissions: the runs were logged anyway
            line = f"W&B dashboard view not saved: {' '.join(str(exc).split())[:200]}"
    print(line, flush=True)
    return line


def sync_command(root: Path) -> str:
    """The shell command that uploads every offline run under ``root`` (training cells and the report run)."""
    return f"find {root} -type d -name 'offline-run-*' -exec wandb sync {{}} +"


def _default_entity(wandb) -> str | None:
    try:
        return wandb.Api().default_entity
    except Exception:  # noqa: BLE001 - no login: the view cannot be saved; the run itself was logged
        return None
