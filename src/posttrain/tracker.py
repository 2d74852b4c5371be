"""Experiment tracking: W&B (offline unless configured) or nothing, behind one small interface.

What a W&B user expects (docs/design.md, "Contracts"; issue 13):

- run id: a hash of the sweep directory's resolved absolute path and the cell, so a re-run or a requeued job
  continues the same W&B run, and two experiments that share a sweep name in different output roots never do;
- group: the sweep, ``<sweep dir name>-<6 hex of its path>``; job_type ``train`` (``report`` for the report run);
- config: top-level ``variant``, ``algo``, ``scale``, ``seed``, ``lora`` (on/off) to filter and group by, the
  resolved config (secrets removed) under ``cfg``;
- summary: the status, every metric as ``<task>/<metric>``, the base model's score ``base/<task>/<metric>`` and
  the change over it ``delta/<task>/<metric>`` (result.json's ``eval.base_metrics``).

This module imports no training code (the report uses :func:`sweep_group` and :func:`report_run_id`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}
IDENTITY_KEYS = ("variant", "algo", "scale", "seed", "lora")


def looks_secret(name: str) -> bool:
    """``api_key``, ``hf_token``, ``WANDB_API_KEY``... but not ``tokenizer`` or ``max_new_tokens``."""
    return any(part in SECRET_WORDS for part in re.split(r"[_.\-]", str(name).lower()))


def scrub(value):
    """Drop every mapping entry whose name looks like a secret (api_key, hf_token, ...), recursively."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if looks_secret(k) else scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ identity


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def sweep_dir_of(cell_dir: str | os.PathLike, cell: str) -> Path:
    """The sweep directory a cell directory sits in: ``cell_dir`` without the cell's own path components."""
    cell_dir = Path(cell_dir).resolve()
    depth = len(Path(cell).parts)
    return cell_dir.parents[depth - 1] if 0 < depth <= len(cell_dir.parents) else cell_dir


def sweep_group(sweep_dir: str | os.PathLike) -> str:
    """The W&B group of a sweep: its directory name plus 6 hex of its resolved absolute path."""
    path = Path(sweep_dir).resolve()
    return f"{path.name}-{_digest(str(path), 6)}"


def run_id(sweep_dir: str | os.PathLike, cell: str) -> str:
    """The W&B run id of one cell: 16 hex of (resolved sweep directory, cell)."""
    return _digest(f"{Path(sweep_dir).resolve()}\0{cell}", 16)


def report_run_id(sweep_dir: str | os.PathLike) -> str:
    """The id of the sweep's one report run (``report --wandb`` resumes it on every call)."""
    return run_id(sweep_dir, "\0report")


def _lora(value) -> str:
    return "on" if value is True or str(value).lower() in ("on", "true", "1") else "off"


def run_config(result: dict) -> dict:
    """W&B config of a run: the identity keys at top level, the resolved (scrubbed) config under ``cfg``."""
    return {"variant": result.get("variant") or result.get("algo"), "algo": result.get("algo"),
            "scale": result.get("scale"), "seed": result.get("seed"), "lora": _lora(result.get("lora")),
            "cfg": scrub(result.get("config") or {})}


def _is_stderr(metric: str) -> bool:
    return metric.split(",", 1)[0].endswith("_stderr")


def result_summary(result: dict) -> dict:
    """Run summary: status, ``task/metric``, ``base/task/metric`` and ``delta/task/metric`` (run minus base)."""
    out: dict = {"status": result.get("status")}
    base = (result.get("eval") or {}).get("base_metrics") or {}
    for task, metrics in (result.get("metrics") or {}).items():
        for metric, value in metrics.items():
            out[f"{task}/{metric}"] = value
    for task, metrics in base.items():
        for metric, value in metrics.items():
            if _is_stderr(metric) or not isinstance(value, (int, float)):
                continue
            out[f"base/{task}/{metric}"] = value
            trained = (result.get("metrics") or {}).get(task, {}).get(metric)
            if isinstance(trained, (int, float)):
                out[f"delta/{task}/{metric}"] = trained - value
    steps = (result.get("train") or {}).get("steps")
    if steps is not None:
        out["train/steps_done"] = steps
    return out


# ------------------------------------------------------------------------------------------------ trackers


class NullTracker:
    run_id = None

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


def wandb_mode(logger_cfg) -> str:
    return os.environ.get("WANDB_MODE") or logger_cfg.get("mode") or "offline"


class WandbTracker:
    """One W&B run per cell (see the module docstring for its id, group, job_type, config and summary)."""

    def __init__(self, logger_cfg, *, cell: str, run_dir, result: dict, sweep: str | None = None):
        import wandb

        sweep_dir = sweep_dir_of(run_dir, cell)
        self.run_id = run_id(sweep_dir, cell)
        self.group = sweep_group(sweep_dir)
        config = run_config(result)
        config["sweep"] = sweep or sweep_dir.name
        tags = [f"algo:{config['algo']}", f"scale:{config['scale']}", f"seed:{config['seed']}",
                f"lora:{config['lora']}"]
        self._run = wandb.init(
            project=logger_cfg.get("project") or "posttrain", entity=logger_cfg.get("entity"), group=self.group,
            name=cell, id=self.run_id, resume="allow", job_type="train", tags=tags, config=config,
            dir=str(run_dir), mode=wandb_mode(logger_cfg), reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    @property
    def run(self):
        return self._run

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self._run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)


def make_tracker(logger_cfg, **kwargs):
    """``logger.name``: ``wandb`` (:class:`WandbTracker`; kwargs cell, run_dir, result, sweep) or ``none``."""
    name = logger_cfg.get("name", "none")
    if name == "none":
        return NullTracker()
    if name == "wandb":
        return WandbTracker(logger_cfg, **kwargs)
    raise ValueError(f"unknown logger {name!r}; known: wandb, none")
