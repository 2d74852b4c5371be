"""sweep.json: what a multirun launched, so that status works for any launcher (docs/design.md, "Contracts").

    {"sweep": <name>, "launcher": <name>,
     "cells": [{"cell": <cell dir relative to the sweep dir>, "run_dir": <absolute cell dir>,
                "overrides": [<override strings>], "job_id": <str or null>, "submitted": <ISO time>}, ...]}

Every multirun writes it in the sweep directory, whatever its launcher: the Slurm launcher with the job ids it got
back, local (basic-launcher) multiruns with ``job_id`` null. A later launch into the same directory merges into it:
entries of the cells it launches again are replaced, the others are kept. Writes are atomic and serialised by a lock
file beside sweep.json, so concurrent launches into one sweep directory cannot lose each other's cells.

A local multirun writes it before its first cell runs (the posttrain sweeper lists every cell it will launch; with
Hydra's basic sweeper each cell is added as it starts) and records the launching process as ``"driver": {"pid",
"host", "started"}``; each run marks its cell directory with ``.running.json`` ({"pid", "host", "started"}) while it
runs. So status works during a local grid and after Ctrl-C, SIGTERM or ``kill -9``: a cell whose process is alive is
running, one still to come while the driver lives is pending, one whose process died without a result.json failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from filelock import FileLock

from posttrain.results import write_json_atomic

MANIFEST_FILE = "sweep.json"
RUNNING_FILE = ".running.json"
ENTRY_KEYS = ("cell", "run_dir", "overrides", "job_id", "submitted")


def now_iso() -> str:
    """The current time as ISO 8601 with the local UTC offset, to the second."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def manifest_path(sweep_dir: str | os.PathLike) -> Path:
    return Path(sweep_dir) / MANIFEST_FILE


def make_entry(sweep_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None, *,
               cell: str | None = None, overrides: Iterable[str] = (), job_id: Any = None,
               submitted: str | None = None, after: Any = None) -> dict:
    """One sweep.json cell entry from either the cell directory or its path relative to the sweep directory;
    ``after``: the job id of the scale's preparation job the cell's job waits for (posttrain.sweep.preparation)."""
    sweep_dir = Path(sweep_dir).absolute()
    if run_dir is None and cell is None:
        raise ValueError("a sweep.json entry needs run_dir or cell")
    if run_dir is None:
        run_dir = sweep_dir / str(cell)
    run_dir = Path(run_dir)
    if not run_dir.is_absolute():
        run_dir = Path(os.path.abspath(run_dir))
    if cell is None:
        try:
            cell = run_dir.relative_to(sweep_dir).as_posix()
        except ValueError as exc:
            raise ValueError(f"cell directory {run_dir} is not inside the sweep directory {sweep_dir}") from exc
    return {
        "cell": str(cell),
        "run_dir": str(run_dir),
        "overrides": [str(o) for o in overrides],
        "job_id": None if job_id is None else str(job_id),
        "submitted": submitted or now_iso(),
        **({"after": str(after)} if after is not None else {}),
    }


def _normalise(sweep_dir: Path, entry: Mapping[str, Any]) -> dict:
    return make_entry(sweep_dir, entry.get("run_dir"), cell=entry.get("cell"),
                      overrides=entry.get("overrides") or (), job_id=entry.get("job_id"),
                      submitted=entry.get("submitted"), after=entry.get("after"))


def read_manifest(sweep_dir: str | os.PathLike) -> dict | None:
    """sweep.json of ``sweep_dir`` as a dict, or None when there is none. Raises ValueError on a corrupt file."""
    path = manifest_path(sweep_dir)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ValueError(f"{path}: not a sweep manifest (no 'cells' list)")
    return data


def write_manifest(sweep_dir: str | os.PathLike, entries: Iterable[Mapping[str, Any]], *,
                   sweep: str | None = None, launcher: str | None = None, driver: Mapping | None = None,
                   only_new: bool = False) -> Path:
    """Merge ``entries`` into ``sweep_dir/sweep.json`` (created if missing) and write it atomically.

    Each entry needs ``run_dir`` (absolute or relative to the current directory) or ``cell`` (relative to the
    sweep directory); the other is derived. ``overrides`` defaults to [], ``job_id`` to None, ``submitted`` to now.
    An entry replaces an existing one for the same cell; cells not named here are kept, in their order, and new
    cells are appended. ``sweep`` defaults to the existing name or the directory's name, ``launcher`` to the
    existing one or "basic". ``driver`` (:func:`process_info` of a local launch) replaces the recorded one;
    ``only_new``: entries for cells sweep.json already has are dropped, not replaced (a job adding its own cell).
    """
    sweep_dir = Path(sweep_dir).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    new = [_normalise(sweep_dir, e) for e in entries]
    with FileLock(str(manifest_path(sweep_dir)) + ".lock"):
        current = read_manifest(sweep_dir) or {}
        cells: dict[str, dict] = {}
        for old in current.get("cells", []):
            if isinstance(old, Mapping) and old.get("cell") is not None:
                cells[str(old["cell"])] = dict(old)
        for entry in new:
            if not (only_new and entry["cell"] in cells):
                cells[entry["cell"]] = entry  # dict keeps first-insertion order, so a replaced cell keeps its place
        payload = {
            "sweep": sweep or current.get("sweep") or sweep_dir.name,
            "launcher": launcher or current.get("launcher") or "basic",
            "cells": list(cells.values()),
        }
        if driver is not None or current.get("driver") is not None:
            payload["driver"] = dict(driver if driver is not None else current["driver"])
        path = manifest_path(sweep_dir)
        write_json_atomic(path, payload)
    return path


# ------------------------------------------------------------------ who is running what (local launches)
def process_info() -> dict:
    """This process, as sweep.json's ``driver`` and a cell's ``.running.json`` record it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso()}


def alive(info: Mapping | None) -> bool | None:
    """Whether the recorded process still runs: True/False on its own host, None elsewhere (cannot tell)."""
    if not isinstance(info, Mapping) or not isinstance(info.get("pid"), int):
        return False
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that pid
        return True
    return True


def read_running(cell_dir: str | os.PathLike) -> dict | None:
    """The cell's ``.running.json`` marker, or None."""
    try:
        data = json.loads((Path(cell_dir) / RUNNING_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def running(cell_dir: str | os.PathLike):
    """Mark ``cell_dir`` as run by this process for the duration of the block (a ``kill -9`` leaves the marker,
    whose dead pid tells status what happened)."""
    path = Path(cell_dir) / RUNNING_FILE
    write_json_atomic(path, process_info())
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
