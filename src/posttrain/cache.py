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
