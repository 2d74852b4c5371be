"""Experiment tracking: W&B (offline unless configured) or nothing, behind one small interface.

Group = the sweep, run name = the cell, tags algo/scale/seed/lora, config = the resolved config with secrets
removed, id derived from the cell so a re-run or a requeued job continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import os
import re

SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}


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


class NullTracker:
    run_id = None

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker:
    def __init__(self, logger_cfg, *, sweep: str, cell: str, run_dir, config: dict, tags: list[str],
                 job_type: str):
        import wandb

        self.run_id = hashlib.sha256(f"{sweep}/{cell}".encode()).hexdigest()[:16]
        mode = os.environ.get("WANDB_MODE") or logger_cfg.get("mode", "offline")
        self._run = wandb.init(
            project=logger_cfg.get("project", "posttrain"), entity=logger_cfg.get("entity"), group=sweep,
            name=cell, id=self.run_id, resume="allow", job_type=job_type, tags=tags, config=scrub(config),
            dir=str(run_dir), mode=mode, reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))

    def log(self, metrics: dict, step: int | None = None) -> None:
        self._run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            self._run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)


def make_tracker(logger_cfg, **kwargs):
    name = logger_cfg.get("name", "none")
    if name == "none":
        return NullTracker()
    if name == "wandb":
        return WandbTracker(logger_cfg, **kwargs)
    raise ValueError(f"unknown logger {name!r}; known: wandb, none")
