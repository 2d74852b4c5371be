"""One preparation job per scale, before the scale's cells, on Slurm (docs/design.md, "Shared per-scale work").

The base scores, the self-play data and the reference log-probs belong to a scale (posttrain.prepare). Without a
preparation job, the first cell of a scale to start builds them under a file lock while every other cell of the
scale waits on the lock with its GPUs allocated and idle (hours at 7b: 7,473 prompts x 16 samples). So the Slurm
launcher groups the cells it submits by what determines those artifacts -- every override except the algorithm,
its hyperparameters, the seed and LoRA (``scale_key``) -- submits one job per group with one GPU that runs
:func:`posttrain.prepare.prepare_scale` for the group's algorithms and LoRA settings, and submits the group's cells
with ``--dependency=afterok:<that job>`` (and ``--kill-on-invalid-dep=yes``: if the preparation fails, Slurm
cancels the cells instead of leaving them pending forever; the preparation job's log says why). Cells whose
artifacts are already cached only wait for a job that reads the cache and exits.

Locally (Hydra's basic launcher, the posttrain sweeper) cells run one after another, so the first cell of each scale
builds what the later ones read: the same order, without a separate job.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List

from posttrain.cache import stable_hash
from posttrain.cell import override_key

#: Override roots that do not change a scale's shared artifacts (the cell's own path and the launcher's settings).
PER_RUN_ROOTS = ("algo", "seed", "lora", "hydra", "trainer", "logger")
#: trainer keys that do change them (the reference pass's numerics).
SHARED_TRAINER_KEYS = ("trainer.precision", "trainer.reference_cache")
SUBDIR = ".prepare"


def scale_key(overrides: Iterable[str]) -> str:
    """The cells with equal keys share their preparation job."""
    keep = []
    for override in overrides:
        key = override_key(override)
        root = key.split(".", 1)[0].split("/", 1)[0]
        if root not in PER_RUN_ROOTS or key in SHARED_TRAINER_KEYS:
            keep.append(override.lstrip("+"))
    return json.dumps(sorted(keep))


def prepare_override(algos: Iterable[str], loras: Iterable[bool]) -> str:
    """The task override that turns a cell's job into its scale's preparation job (posttrain.run.main)."""
    names = ",".join(sorted(set(algos)))
    flags = ",".join(str(flag).lower() for flag in sorted(set(loras)))
    return f"+prepare={{algos:[{names}],lora:[{flags}]}}"


def subdir(key: str) -> str:
    """The preparation job's Hydra output directory, relative to the sweep directory (not a cell)."""
    return f"{SUBDIR}/{stable_hash(key, length=10)}"


def job_parameters(params: Dict[str, Any]) -> Dict[str, Any]:
    """A cell's launcher parameters for its preparation job: one task, one GPU where the cell has GPUs (generation,
    scoring and the no-grad reference pass of one model fit one H100 up to 7b), no array."""
    out = dict(params)
    if out.get("gpus"):
        out["gpus"] = 1
    out["tasks_per_node"] = 1
    out["nodes"] = 1
    return out


def after(params: Dict[str, Any], job_id: str) -> Dict[str, Any]:
    """A cell's launcher parameters, made to start only once the preparation job ``job_id`` succeeded."""
    additional = dict(params.get("additional_parameters") or {})
    additional["dependency"] = f"afterok:{job_id}"
    additional["kill_on_invalid_dep"] = "yes"
    return {**params, "additional_parameters": additional}


def groups(cells: List[Any]) -> Dict[str, List[Any]]:
    """Cells (with ``overrides``) by :func:`scale_key`, in submission order."""
    out: Dict[str, List[Any]] = {}
    for cell in cells:
        out.setdefault(scale_key(cell.overrides), []).append(cell)
    return out
