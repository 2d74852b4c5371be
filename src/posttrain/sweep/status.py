"""Where every cell of a sweep stands: ``python -m posttrain.sweep status DIR`` and ``... wait DIR``.

The cells are those of DIR/sweep.json (manifest.py). A cell's state, in this order:

1. its Slurm job is in the queue (squeue): ``pending`` or ``running``. A job requeued after a preemption or a
   timeout is pending/running again. This comes first so that a relaunched cell whose previous attempt left a
   failed result.json shows as what it is now, not as the old failure;
2. a local cell (job_id null) whose ``.running.json`` names a live process: ``running`` (manifest.py);
3. its result.json (posttrain.results.read_result): ``completed``, ``failed`` or ``cancelled`` (Ctrl-C, SIGTERM);
4. a local cell whose ``.running.json`` names a dead process (``kill -9``): ``failed``;
5. its job's final state in accounting (sacct): COMPLETED without a result.json, FAILED, TIMEOUT (a job that
   ends in TIMEOUT, i.e. was not or no longer requeued), OUT_OF_MEMORY, NODE_FAIL, ... -> ``failed``;
   CANCELLED -> ``cancelled``; PENDING/REQUEUED/RUNNING (accounting ahead of squeue) -> pending/running;
6. a local cell not started yet while the launching process (sweep.json's ``driver``) lives: ``pending``;
7. otherwise ``missing``: never run (job_id null, no result, the launch is gone), or a job the scheduler no longer
   knows.

The scheduler is asked once per refresh for all job ids together (one squeue, one sacct), never once per cell.
"""

from __future__ import annotations

import dataclasses

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping

from posttrain.results import CANCELLED as RESULT_CANCELLED, COMPLETED as RESULT_COMPLETED, FAILED as RESULT_FAILED
from posttrain.results import read_result
from posttrain.sweep.manifest import alive, read_manifest, read_running

STATES = ("completed", "failed", "cancelled", "running", "pending", "missing")
ACTIVE = ("running", "pending")
#: The metric the status table shows, first task present wins.
MAIN_METRIC = "exact_match,strict-match"
MAIN_TASKS = ("synth_gsm8k", "gsm8k")

# Slurm job states (squeue %T / sacct State) -> cell state. "ended" = final, interpreted with result.json.
_SLURM_STATES = {
    "PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending", "RESV_DEL_HOLD": "pending", "SUSPENDED": "pending", "RESIZING": "pending",
    "RUNNING": "running", "COMPLETING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
    "STOPPED": "running", "SPECIAL_EXIT": "failed",
    "COMPLETED": "ended",
    "FAILED": "failed", "TIMEOUT": "failed", "OUT_OF_MEMORY": "failed", "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "PREEMPTED": "failed", "REVOKED": "failed",
    "CANCELLED": "cancelled",
}


class NoManifest(Exception):
    """The directory has no sweep.json."""


@dataclass
class JobInfo:
    state: str          # the Slurm state word, e.g. RUNNING, CANCELLED, TIMEOUT
    elapsed_s: float | None = None
    source: str = ""    # "squeue" | "sacct"


@dataclass
class CellStatus:
    cell: str
    state: str
    job_id: str | None
    elapsed_s: float | None
    metric: float | None
    run_dir: str
    detail: str = ""    # e.g. the Slurm state behind "failed" ("TIMEOUT")


# ------------------------------------------------------------------ scheduler queries (batched)
def _run(cmd: list[str], timeout: float = 60) -> str | None:
    """stdout of cmd, or None when the command is missing or fails (e.g. every id unknown to squeue)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout


def parse_duration(text: str) -> float | None:
    """Slurm's [D-]HH:MM:SS / MM:SS / M:SS.ms as seconds."""
    text = text.strip()
    if not text or text in ("INVALID", "UNLIMITED", "NOT_SET"):
        return None
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        days = int(head)
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        return None
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return days * 86400 + seconds


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """Lines ``%i|%T|%M`` (squeue -h -r): job id (array tasks as 123_4), state, time used."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        elapsed = parse_duration(parts[2]) if len(parts) > 2 else None
        jobs[parts[0]] = JobInfo(parts[1].split()[0].upper(), elapsed, "squeue")
    return jobs


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """Lines ``JobID|State|ElapsedRaw`` (sacct -n -P -X); "CANCELLED by 0" -> CANCELLED."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0]:
            continue
        state = parts[1].split()[0].upper() if parts[1].strip() else "UNKNOWN"
        elapsed = None
        if len(parts) > 2 and parts[2].strip().isdigit():
            elapsed = float(parts[2])
        jobs[parts[0]] = JobInfo(state, elapsed, "sacct")  # the last record (latest requeue) wins
    return jobs


def _expand_indices(spec: str) -> set[int] | None:
    """``1-3,7%4`` -> {1, 2, 3, 7}; None when unparsable."""
    out: set[int] = set()
    try:
        for part in spec.split("%")[0].split(","):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        return None
    return out


def match_array_tasks(ids: Iterable[str], records: Mapping[str, JobInfo]) -> dict[str, JobInfo]:
    """Accounting records for job ids, array tasks (``A_i``) included. sacct does not list every task under its own
    id: a task still pending sits in ``A_[i-j]``, an array cancelled before any task started is the bare ``A``, and
    a task cancelled while pending leaves no record at all while its siblings have theirs (reported CANCELLED)."""
    out: dict[str, JobInfo] = {}
    by_array: dict[str, list[tuple[str, JobInfo]]] = {}
    for rid, info in records.items():
        by_array.setdefault(rid.split("_", 1)[0], []).append((rid, info))
    for jid in ids:
        if jid in records:
            out[jid] = records[jid]
            continue
        array, sep, index = jid.partition("_")
        if not sep or not index.isdigit() or array not in by_array:
            continue
        found = None
        for rid, info in by_array[array]:
            if rid == array:  # the array as a whole, never split into tasks
                found = info
            elif rid.startswith(array + "_[") and rid.endswith("]"):
                indices = _expand_indices(rid[len(array) + 2:-1])
                if indices and int(index) in indices:
                    found = info
                    break
        out[jid] = found or JobInfo("CANCELLED", None, "sacct")  # removed before it started
    return out


def query_scheduler(job_ids: Iterable[str], final_ids: Iterable[str] | None = None) -> dict[str, JobInfo]:
    """State of the job ids: one squeue call for all of them, then one sacct call for those not in the queue
    (restricted to ``final_ids`` when given: the cells whose result.json does not already settle them)."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    joined = ",".join(ids)
    active = parse_squeue(_run(["squeue", "-h", "-r", "-j", joined, "-o", "%i|%T|%M"]) or "")
    wanted = set(ids) if final_ids is None else {str(j) for j in final_ids if j}
    rest = [j for j in ids if j not in active and j in wanted]
    ended: dict[str, JobInfo] = {}
    if rest:
        # Ask for the whole arrays too (``A`` lists every task of array A): see match_array_tasks.
        query = sorted(set(rest) | {j.split("_", 1)[0] for j in rest if "_" in j})
        records = parse_sacct(_run(["sacct", "-n", "-P", "-X", "-j", ",".join(query),
                                    "-o", "JobID,State,ElapsedRaw"]) or "")
        ended = match_array_tasks(rest, records)
    return {**ended, **active}


# ------------------------------------------------------------------ one cell
def _since(marker: Mapping) -> float | None:
    try:
        return max(0.0, (datetime.now().astimezone() - datetime.fromisoformat(str(marker["started"]))).total_seconds())
    except (KeyError, TypeError, ValueError):
        return None


def main_metric(result: Mapping | None) -> float | None:
    metrics = (result or {}).get("metrics") or {}
    for task in MAIN_TASKS:
        value = (metrics.get(task) or {}).get(MAIN_METRIC)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _result_elapsed(result: Mapping) -> float | None:
    prov = result.get("provenance") or {}
    try:
        started = datetime.fromisoformat(str(prov["started"]))
        finished = datetime.fromisoformat(str(prov["finished"]))
        return max(0.0, (finished - started).total_seconds())
    except (KeyError, TypeError, ValueError):
        pass
    seconds = (result.get("train") or {}).get("seconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def cell_state(entry: Mapping, result: Mapping | None, job: JobInfo | None, marker: Mapping | None = None,
               driver_alive: bool | None = False) -> CellStatus:
    """The state of one sweep.json entry from its result.json and its job's scheduler record (rules: module doc);
    for a cell of a local launch (no job id) also from its ``.running.json`` marker and the launching process."""
    job_id = entry.get("job_id")
    job_id = None if job_id is None else str(job_id)
    mapped = _SLURM_STATES.get(job.state, "failed") if job else None
    base = dict(cell=str(entry.get("cell")), job_id=job_id, run_dir=str(entry.get("run_dir", "")),
                metric=main_metric(result))
    if job is not None and mapped in ACTIVE and job.source == "squeue":
        return CellStatus(state=mapped, elapsed_s=job.elapsed_s, detail=job.state, **base)
    if result is not None and result.get("status") in (RESULT_COMPLETED, RESULT_FAILED, RESULT_CANCELLED):
        elapsed = _result_elapsed(result)
        if elapsed is None and job is not None:
            elapsed = job.elapsed_s
        detail = ""
        if result.get("status") in (RESULT_FAILED, RESULT_CANCELLED) and isinstance(result.get("error"), Mapping):
            detail = str(result["error"].get("type" if result["status"] == RESULT_FAILED else "message") or "")
        if marker is not None and alive(marker) is not False and job is None:
            return CellStatus(state="running", elapsed_s=_since(marker), detail="relaunched", **base)
        return CellStatus(state=result["status"], elapsed_s=elapsed, detail=detail, **base)
    if job is None and marker is not None:  # a local run: its process is alive, or died without a record
        if alive(marker) is not False:
            return CellStatus(state="running", elapsed_s=_since(marker), detail="local", **base)
        return CellStatus(state="failed", elapsed_s=_since(marker), detail="process gone without a result.json",
                          **base)
    if job is None and job_id is None and driver_alive is not False:
        return CellStatus(state="pending", elapsed_s=None, detail="local launch", **base)
    if job is not None:
        if mapped == "ended":  # the job finished cleanly but left no result.json
            return CellStatus(state="failed", elapsed_s=job.elapsed_s, detail="no result.json", **base)
        return CellStatus(state=mapped, elapsed_s=job.elapsed_s, detail=job.state, **base)
    detail = "never run" if job_id is None else "job unknown to the scheduler"
    return CellStatus(state="missing", elapsed_s=None, detail=detail, **base)


# ------------------------------------------------------------------ a sweep
def collect_status(sweep_dir: str | os.PathLike, *, scheduler=query_scheduler) -> list[CellStatus]:
    """One CellStatus per sweep.json entry, in manifest order. Raises NoManifest without sweep.json."""
    sweep_dir = Path(sweep_dir)
    manifest = read_manifest(sweep_dir)
    if manifest is None:
        raise NoManifest(f"{sweep_dir}: no sweep.json here (not a sweep directory, or nothing was launched into it)")
    entries = [e for e in manifest["cells"] if isinstance(e, Mapping)]
    results, runs = {}, {}
    for entry in entries:
        run_dir = entry.get("run_dir") or str(sweep_dir / str(entry.get("cell")))
        if not Path(run_dir).exists() and entry.get("cell") is not None:
            run_dir = str(sweep_dir / str(entry["cell"]))  # the sweep directory was moved
        results[id(entry)] = read_result(run_dir)
        runs[id(entry)] = run_dir
    # Every job id goes to squeue (an active job overrides an older result.json); sacct is only needed for the
    # cells that have no result.json.
    wanted = [str(e["job_id"]) for e in entries if e.get("job_id")]
    unsettled = [str(e["job_id"]) for e in entries if e.get("job_id") and results[id(e)] is None]
    preparations = sorted({str(e["after"]) for e in entries if e.get("after") and results[id(e)] is None})
    jobs = scheduler(wanted + preparations, unsettled + preparations) if wanted else {}
    driver = alive(manifest.get("driver")) if manifest.get("driver") else False
    cells = [cell_state(e, results[id(e)], jobs.get(str(e.get("job_id"))),
                        None if e.get("job_id") else read_running(runs[id(e)]), driver) for e in entries]
    for i, entry in enumerate(entries):  # a cell Slurm never started because its preparation job failed
        prep = jobs.get(str(entry.get("after"))) if entry.get("after") and results[id(entry)] is None else None
        if prep is not None and _SLURM_STATES.get(prep.state, "failed") in ("failed", "cancelled") \
                and cells[i].state in ("cancelled", "failed", "missing", "pending"):
            cells[i] = dataclasses.replace(
                cells[i], state="failed" if cells[i].state == "pending" else cells[i].state,
                detail=f"preparation job {entry['after']} {prep.state}: its log is in "
                       f"{Path(sweep_dir) / '.submitit' / str(entry['after'])}")
    return cells


def count_states(cells: Iterable[CellStatus]) -> dict[str, int]:
    counts = {state: 0 for state in STATES}
    for cell in cells:
        counts[cell.state] = counts.get(cell.state, 0) + 1
    return counts


def summary_line(cells: Iterable[CellStatus]) -> str:
    counts = count_states(cells)
    return " ".join(f"{state}={counts[state]}" for state in STATES)


def format_elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_table(cells: list[CellStatus]) -> str:
    header = ("cell", "state", "job", "elapsed", f"{MAIN_TASKS[0]}/{MAIN_METRIC}")
    rows = [header]
    for c in cells:
        state = c.state + (f" ({c.detail})" if c.detail and c.state in ("failed", "missing", "cancelled") else "")
        rows.append((c.cell, state, c.job_id or "-", format_elapsed(c.elapsed_s),
                     "-" if c.metric is None else f"{c.metric:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(summary_line(cells))
    return "\n".join(lines)


def cmd_status(sweep_dir: str) -> int:
    try:
        cells = collect_status(sweep_dir)
    except (NoManifest, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    print(format_table(cells))
    return 0


def cmd_wait(sweep_dir: str, interval: float = 10.0, timeout: float | None = None) -> int:
    """Block until no cell is pending or running; exit 0 when every cell completed, else 1."""
    from tqdm import tqdm

    try:
        cells = collect_status(sweep_dir)
    except (NoManifest, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    start = time.monotonic()
    with tqdm(total=len(cells), desc=f"sweep {Path(sweep_dir).name}", unit="cell", file=sys.stderr,
              dynamic_ncols=True) as bar:
        while True:
            counts = count_states(cells)
            done = len(cells) - counts["pending"] - counts["running"]
            bar.total = len(cells)
            bar.n = done
            bar.set_postfix_str(" ".join(f"{s}={counts[s]}" for s in STATES if counts[s]), refresh=False)
            bar.refresh()
            if counts["pending"] + counts["running"] == 0:
                break
            if timeout is not None and time.monotonic() - start >= timeout:
                bar.close()
                print(f"timed out after {timeout:g}s: {summary_line(cells)}", file=sys.stderr)
                return 1
            time.sleep(interval)
            try:
                cells = collect_status(sweep_dir)
            except ValueError:  # sweep.json being replaced by a concurrent launch: try again next round
                continue
    print(summary_line(cells))
    return 0 if cells and all(c.state == "completed" for c in cells) else 1
