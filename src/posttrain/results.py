"""result.json: the one contract between a run and everything that reads it (docs/design.md, "Contracts").

Every cell directory holds a result.json, written atomically (temp file + rename) at the end of every run,
completed, failed or cancelled. Readers (report, sweep status) use :func:`iter_results`, which skips the archives
``<cell dir>.<old hash>`` that a relaunch with a changed config leaves beside a cell.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

RESULT_FILE = "result.json"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"  # stopped by Ctrl-C or SIGTERM: train.steps says how far it got, the checkpoint is kept
STATUSES = (COMPLETED, FAILED, CANCELLED)

#: Top-level keys every result.json has (docs/design.md). Tests check a real run against this list.
REQUIRED_KEYS = (
    "status", "algo", "variant", "scale", "seed", "lora", "config_hash", "config", "algo_meta",
    "metrics", "eval", "train", "provenance", "error",
)
ALGO_META_KEYS = ("family", "category", "reference_free", "length_normalized")
EVAL_KEYS = ("tasks", "num_fewshot", "chat_template", "limit", "lm_eval_version", "base_metrics")
TRAIN_KEYS = ("steps", "examples", "tokens", "seconds", "tokens_per_s", "final_loss", "loss_curve")
PROVENANCE_KEYS = ("git_sha", "versions", "hardware", "started", "finished", "cache_hits")

# A cell directory is ``.../seed-<n>``; a relaunch with another config hash archives it as ``seed-<n>.<hash>``.
_ARCHIVE_RE = re.compile(r"^seed-\d+\.[0-9a-f]+$")


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=False, default=_jsonable)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared on a cluster
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_result(cell_dir: str | os.PathLike, result: dict) -> Path:
    """Validate the top-level shape and write ``cell_dir/result.json`` atomically."""
    missing = [key for key in REQUIRED_KEYS if key not in result]
    if missing:
        raise ValueError(f"result.json is missing {missing}")
    if result["status"] not in STATUSES:
        raise ValueError(f"result status must be one of {STATUSES}, got {result['status']!r}")
    path = Path(cell_dir) / RESULT_FILE
    write_json_atomic(path, result)
    return path


def read_result(cell_dir: str | os.PathLike) -> dict | None:
    """The cell's result.json, or None when it is missing or unreadable (a crash mid-write cannot leave half)."""
    path = Path(cell_dir) / RESULT_FILE
    try:
        with open(path) as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_archive(cell_dir: str | os.PathLike) -> bool:
    """True for ``seed-<n>.<old hash>`` directories kept beside a cell whose config changed."""
    return bool(_ARCHIVE_RE.match(Path(cell_dir).name))


def iter_results(root: str | os.PathLike, unreadable: list | None = None) -> Iterator[tuple[Path, dict]]:
    """Yield ``(path, result)`` for every result.json under ``root``, skipping archives, in sorted order.

    A file that is not valid JSON (a truncated copy, a disk that filled up) raises ValueError, or, when the caller
    passes an ``unreadable`` list, is appended to it as ``(path, reason)`` and skipped."""
    root = Path(root)
    for path in sorted(root.rglob(RESULT_FILE)):
        if any(is_archive(parent) for parent in path.relative_to(root).parents if parent != Path(".")):
            continue
        try:
            with open(path) as handle:
                yield path, json.load(handle)
        except json.JSONDecodeError as exc:
            if unreadable is None:
                raise ValueError(f"{path}: not valid JSON ({exc})") from exc
            unreadable.append((path, f"not valid JSON ({exc})"))
