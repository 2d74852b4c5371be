"""Reading every result.json under DIR into one DataFrame; choosing cells, metrics and the baseline.

docs/design.md "Contracts": result.json's schema; archives ``seed-<n>.<hash>`` are skipped; a file that cannot be
read or lacks a key is listed in report.md and skipped, never fatal.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from posttrain.report.format import (CANCELLED, DEFAULT_METRICS, TASK_METRIC_PRIORITY, TRAIN_FIELDS, UserError,
                                     _curve, _lora, _num, is_stderr, scale_key)
from posttrain.results import COMPLETED, FAILED, RESULT_FILE, is_archive, iter_results


@dataclass
class Loaded:
    """Everything read from DIR: one row per result.json, training curves, and what was noticed on the way."""

    runs: pd.DataFrame
    metrics: list[str]
    curves: list[dict]
    n_archived: int
    notes: list[str] = field(default_factory=list)
    #: The untrained base's scores as the runs recorded them (``eval.base_metrics``): columns scale, metric, value.
    base: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["scale", "metric", "value"]))


def _unusable(result) -> str | None:
    """Why a parsed result.json cannot be used (None when it can)."""
    if not isinstance(result, dict):
        return "not a result object"
    missing = [k for k in ("status", "algo", "scale", "seed", "lora") if result.get(k) is None]
    if missing:
        return f"result.json lacks {', '.join(missing)}"
    try:
        int(result["seed"])
    except (TypeError, ValueError):
        return f"seed {result['seed']!r} is not an integer"
    return None


def load_results(root: str | os.PathLike) -> Loaded:
    """One DataFrame row per result.json under ``root`` (archives skipped), metrics flattened as ``task/metric``."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such directory")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    n_archived = sum(
        1 for p in root.rglob(RESULT_FILE)
        if any(is_archive(parent) for parent in p.relative_to(root).parents if parent != Path("."))
    )
    rows, curves, metric_names, base_rows = [], [], set(), []
    unreadable: list[tuple[Path, str]] = []  # listed in report.md and skipped: one bad file never stops the report
    items = list(iter_results(root, unreadable))
    if not items and not unreadable:
        extra = f" ({n_archived} archived results skipped)" if n_archived else ""
        raise UserError(f"no result.json under {root}{extra}")
    for path, result in items:
        rel = path.relative_to(root).as_posix()
        problem = _unusable(result)
        if problem:
            unreadable.append((path, problem))
            continue
        seed = int(result["seed"])
        train = result.get("train") or {}
        error = result.get("error") or {}
        meta = result.get("algo_meta") or {}
        row = {
            "algo": str(result["algo"]), "variant": str(result.get("variant") or result["algo"]),
            "scale": str(result["scale"]), "lora": _lora(result["lora"]), "seed": seed,
            "status": str(result["status"]),
        }
        for task, entries in (result.get("metrics") or {}).items():
            if not isinstance(entries, dict):
                continue
            for name, value in entries.items():
                value = _num(value)
                if math.isfinite(value):
                    row[f"{task}/{name}"] = value
                    metric_names.add(f"{task}/{name}")
        base = (result.get("eval") or {}).get("base_metrics") if isinstance(result.get("eval"), dict) else None
        for task, entries in (base or {}).items():
            for name, value in (entries.items() if isinstance(entries, dict) else ()):
                value = _num(value)
                if math.isfinite(value) and not is_stderr(name):
                    base_rows.append({"scale": row["scale"], "metric": f"{task}/{name}", "value": value})
        for key in TRAIN_FIELDS:
            row[f"train_{key}"] = _num(train.get(key)) if isinstance(train, dict) else math.nan
        row.update({
            "config_hash": result.get("config_hash"), "family": meta.get("family"), "category": meta.get("category"),
            "error_type": error.get("type") if isinstance(error, dict) else None,
            "error_message": (error.get("message") if isinstance(error, dict) else str(error)) or None,
            "path": rel,
        })
        rows.append(row)
        if isinstance(train, dict):
            loss, reward = _curve(train.get("loss_curve")), _curve(train.get("reward_curve"))
            if loss or reward:
                curves.append({"variant": row["variant"], "algo": row["algo"], "scale": row["scale"],
                               "lora": row["lora"],
                               "seed": seed, "loss_curve": loss, "reward_curve": reward})
    if not rows:
        path, reason = unreadable[0]
        raise UserError(f"no readable result.json under {root}: {len(unreadable)} unreadable, e.g. {path}: {reason}")
    metrics = sorted(metric_names)
    head = ["algo", "variant", "scale", "lora", "seed", "status"]
    tail = [f"train_{k}" for k in TRAIN_FIELDS] + ["config_hash", "family", "category", "error_type",
                                                   "error_message", "path"]
    runs = pd.DataFrame(rows).reindex(columns=head + metrics + tail)
    runs["_sk"] = runs["scale"].map(scale_key)
    runs = runs.sort_values(["variant", "_sk", "lora", "seed", "path"], kind="stable").drop(columns="_sk")
    runs = runs.reset_index(drop=True)
    unknown = sorted(set(runs["status"]) - {COMPLETED, FAILED, CANCELLED})
    notes = [f"`{path.relative_to(root).as_posix()}` skipped: {reason}" for path, reason in unreadable]
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if unknown:
        notes.append(f"runs with an unknown status ({', '.join(unknown)}) are listed with the failed runs and "
                     "not used in the statistics")
    base_frame = pd.DataFrame(base_rows, columns=["scale", "metric", "value"])
    return Loaded(runs=runs, metrics=metrics, curves=curves, n_archived=n_archived, notes=notes, base=base_frame)


def select_cells(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The completed runs the statistics use: one per (variant, scale, lora, seed).

    Two results for one cell with different config hashes are a user error (two configs would be pooled);
    with the same hash (the same run found twice, e.g. two sweep directories under DIR) the completed one
    first in path order is used and the others are named in a note.
    """
    notes = []
    keys = ["variant", "scale", "lora", "seed"]
    for key, group in runs.groupby(keys, sort=False):
        hashes = group["config_hash"].astype(str).tolist()
        if len(set(hashes)) > 1:
            first = group.iloc[0]
            other = group[group["config_hash"].astype(str) != str(first["config_hash"])].iloc[0]
            raise UserError(
                f"runs of different config in one cell (variant={key[0]}, scale={key[1]}, lora={key[2]}, "
                f"seed={key[3]}): {first['path']} (config_hash {first['config_hash']}) and {other['path']} "
                f"(config_hash {other['config_hash']}); remove or move one of them"
            )
    completed = runs[runs["status"] == COMPLETED]
    dup = completed.duplicated(keys, keep="first")
    for _, row in completed[dup].iterrows():
        kept = completed[(completed[keys] == row[keys]).all(axis=1)].iloc[0]
        notes.append(f"`{row['path']}` repeats the cell of `{kept['path']}` (same config hash); only the latter "
                     "is used in the statistics")
    return completed[~dup].reset_index(drop=True), notes


def select_metrics(available: Sequence[str], requested: Sequence[str] | None, any_completed: bool) -> list[str]:
    """The metrics to compare: ``--metric`` values (checked) or the default."""
    if requested:
        out = []
        for m in requested:
            if is_stderr(m):
                raise UserError(f"metric {m!r} is a standard-error entry; stderr entries are never compared")
            if any_completed and m not in available:
                shown = [a for a in available if not is_stderr(a)]
                raise UserError(f"metric {m!r} is in no result.json; available: {', '.join(shown) or 'none'}")
            if m not in out:
                out.append(m)
        return out
    primary = primary_metrics(available)
    if primary:
        return primary
    if not any_completed or not available:
        return [DEFAULT_METRICS[-1]]
    shown = [a for a in available if not is_stderr(a)]
    raise UserError(f"no task reports a known primary metric ({', '.join(TASK_METRIC_PRIORITY)}); pass --metric, "
                    f"one of: {', '.join(shown)}")


def primary_metrics(available: Sequence[str]) -> list[str]:
    """Every task's primary metric (the first of TASK_METRIC_PRIORITY it reports): the report's default.

    Tasks of DEFAULT_METRICS come first, in that order (gsm8k, then synth_gsm8k), the others by name.
    """
    tasks: dict[str, set[str]] = {}
    for m in available:
        if "/" in m and not is_stderr(m):
            task, name = m.split("/", 1)
            tasks.setdefault(task, set()).add(name)
    chosen = {task: f"{task}/{next(p for p in TASK_METRIC_PRIORITY if p in names)}"
              for task, names in tasks.items() if any(p in names for p in TASK_METRIC_PRIORITY)}
    first = [m.split("/", 1)[0] for m in DEFAULT_METRICS]
    order = sorted(chosen, key=lambda t: (first.index(t) if t in first else len(first), t))
    return [chosen[t] for t in order]


def resolve_baseline(baseline: str | None, completed: pd.DataFrame) -> tuple[str | None, list[str]]:
    """``--baseline`` names a variant, or an algo that has exactly one variant here."""
    if baseline is None:
        return None, []
    variants = sorted(set(completed["variant"]))
    if baseline in variants:
        return baseline, []
    matching = sorted(set(completed.loc[completed["algo"] == baseline, "variant"]))
    if len(matching) == 1:
        return matching[0], [f"baseline `{baseline}` is the algo of variant `{matching[0]}`, used as the baseline"]
    if len(matching) > 1:
        raise UserError(f"baseline {baseline!r} is the algo of several variants ({', '.join(matching)}); name one")
    raise UserError(f"baseline {baseline!r} is not among the completed variants: {', '.join(variants) or 'none'}")

