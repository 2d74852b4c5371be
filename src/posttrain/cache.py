"""The cache root shared by runs: tiny bases, self-play data, base-model scores (docs/design.md).

``POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``); on a cluster point it at a shared filesystem. Every entry is
keyed by a hash of what determines it and built under a file lock, so concurrent jobs build it once and readers
never see half an entry (build into a temp directory, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

#: Cache hits and misses of this process, reported in result.json's provenance.cache_hits.
CACHE_EVENTS: dict[str, bool] = {}


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")).expanduser()


def stable_hash(payload: Any, length: int = 12) -> str:
    """Hash of a JSON-serialisable payload, independent of key order."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def cached_dir(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Return ``<root>/<kind>/<key>``, calling ``build(tmp_dir)`` under a lock the first time."""
    final = cache_root() / kind / key
    done = final / ".complete"
    if done.exists():
        CACHE_EVENTS[f"{kind}/{key}"] = True
        return final
    with _locked(final):
        if done.exists():  # another job built it while we waited
            CACHE_EVENTS[f"{kind}/{key}"] = True
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    CACHE_EVENTS[f"{kind}/{key}"] = False
    return final


def cached_json(kind: str, key: str, build: Callable[[], Any]) -> Any:
    """A JSON value cached at ``<root>/<kind>/<key>.json``, computed once under a lock."""
    from posttrain.results import write_json_atomic

    path = cache_root() / kind / f"{key}.json"
    if path.exists():
        CACHE_EVENTS[f"{kind}/{key}"] = True
        return json.loads(path.read_text())
    with _locked(path):
        if path.exists():
            CACHE_EVENTS[f"{kind}/{key}"] = True
            return json.loads(path.read_text())
        value = build()
        write_json_atomic(path, value)
    CACHE_EVENTS[f"{kind}/{key}"] = False
    return value


def cached_json_on_all_ranks(kind: str, key: str, build: Callable[[], Any], *, poll_s: float = 1.0) -> Any:
    """posttrain.cache.cached_json for every rank of a process group at once: ``build`` runs on all ranks together
    (it is collective: a data-parallel evaluation, a sharded reference pass), rank 0 writes the cache file
    atomically under the cache's file lock, and every rank returns rank 0's value.

    Only rank 0 touches the lock, and it never blocks on it: it tries to take it, tells every rank whether it got it
    (one short broadcast), and while another job builds the entry all ranks sleep ``poll_s`` and ask again. So no
    rank waits on the lock while another is inside a collective (a rank polling the lock while rank 0 broadcasts
    hangs both), and no collective lasts longer than one try. Rank 0 then decides hit or miss for all, so the ranks
    never take different paths."""
    import time

    from filelock import Timeout

    from posttrain.models import distributed
    from posttrain.results import write_json_atomic

    if distributed.world_size() == 1:
        return cached_json(kind, key, build)
    import torch.distributed

    path = cache_root() / kind / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")  # the lock cached_json takes: one builder per key across jobs
    main = distributed.is_main_process()
    while True:
        got = [False]
        if main:
            try:
                lock.acquire(timeout=0)
                got = [True]
            except Timeout:
                pass
        torch.distributed.broadcast_object_list(got, src=0)
        if got[0]:
            break
        time.sleep(poll_s)  # another job of the scale builds this entry
    try:
        hit = [json.loads(path.read_text()) if path.exists() else None] if main else [None]
        torch.distributed.broadcast_object_list(hit, src=0)
        if hit[0] is not None:
            value = hit[0]
        else:
            value = [build()]
            if main:
                write_json_atomic(path, value[0])
            torch.distributed.broadcast_object_list(value, src=0)
            value = value[0]
    finally:
        if main:
            lock.release()
    CACHE_EVENTS[f"{kind}/{key}"] = hit[0] is not None
    return value
