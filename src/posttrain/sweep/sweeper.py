"""A Hydra sweeper that launches an explicit list of cells: a sweep file's union of grids (files.py).

``python launch.py -m sweep=paper [overrides]`` selects it (launch.py turns ``sweep=<name>`` into
``hydra/sweeper=posttrain hydra.sweeper.sweep=<file> sweep_name=<name>``). Hydra's basic sweeper can only launch
one Cartesian product; a study is a union of several, so this sweeper expands the file (command-line overrides on
top, files.expand) and hands the cells to whatever launcher is configured, in batches, exactly as the basic sweeper
hands its product: the basic launcher runs them in-process, the Slurm launcher (hydra/launcher=slurm_local or
slurm_h100) submits them. With ``sweep: null`` it expands the command line as the basic sweeper does.

Relaunch without composing every cell. Before launching, a cell is skipped when its result.json says completed
with the config hash this cell would have now (posttrain.cell.is_done, the rule run.py skips by). Computing that
hash needs the composed config, 40-200 ms a cell through Hydra on our machines; so hashes are memoised under
``sha256(conf fingerprint, cell overrides)``. The conf fingerprint hashes everything the composition reads: every
file of every config source (conf/, searchpath dirs, plugin packages), the non-hydra ConfigStore entries,
posttrain/cell.py (the hash function), posttrain/sweep/cells.py and checks.py (the subdir and the variant's
defaults) and the hydra-core/omegaconf versions; if any of them changes, no memo entry matches and cells are composed
again. Two places hold the memo:

- ``<sweep dir>/.config_hashes.json``, written by the sweeper from every composition it does (validation before a
  local launch, the skip check);
- ``<cell dir>/.config_key.json``, written by the job itself before it runs (MemoTask wraps the task function), so
  cells that ran elsewhere (Slurm) are covered too.

A relaunch of a completed sweep thus reads ~220 small JSON files and launches nothing (bench/bench_sweep.py).
Cells to launch are validated (composed) before the first launch, as the basic sweeper does, so a config error
stops the sweep before any cell runs; with posttrain's Slurm launcher that validation is left to the launcher,
which composes every cell before it submits any. Skipped cells keep their sweep.json entry (one is added for a cell
sweep.json does not know); the sweeper prints one line: how many cells, how many skipped, how many to launch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from posttrain.cell import completed_hash, config_hash, is_done
from posttrain.sweep import files

log = logging.getLogger(__name__)

SWEEPER_TARGET = "hydra_plugins.posttrain_sweeper.PosttrainSweeper"
MEMO_FILE = ".config_hashes.json"
CELL_KEY_FILE = ".config_key.json"


@dataclass
class PosttrainSweeperConf:
    _target_: str = SWEEPER_TARGET
    # Path of the sweep file (launch.py sets it from sweep=<name>); null: the command line's grid, as the basic
    # sweeper expands it.
    sweep: Optional[str] = None
    # Cells per launcher call (null: all in one batch, as the basic sweeper).
    max_batch_size: Optional[int] = None
    # Skip cells whose result.json is completed with the same config hash before launching them.
    skip_completed: bool = True


ConfigStore.instance().store(group="hydra/sweeper", name="posttrain", node=PosttrainSweeperConf,
                             provider="posttrain")


# ------------------------------------------------------------------ conf fingerprint and the hash memo
def _tree_digest(root: Path, digest) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        if path.suffix in (".pyc",):
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")


def _source_dir(schema: str, location: str) -> Optional[Path]:
    if schema == "file":
        return Path(location)
    if schema == "pkg":
        try:
            spec = importlib.util.find_spec(location.replace("/", "."))
        except (ImportError, ValueError):
            return None
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    return None


def _store_digest(node: Any, prefix: str, digest) -> None:
    """Non-hydra ConfigStore entries (structured configs a task config may be composed from)."""
    for name in sorted(node):
        if not prefix and name == "hydra":
            continue
        value = node[name]
        if isinstance(value, dict):
            _store_digest(value, f"{prefix}{name}/", digest)
        else:
            cfg = getattr(value, "node", None)
            digest.update(f"{prefix}{name}\0".encode())
            if cfg is not None:
                digest.update(OmegaConf.to_yaml(cfg).encode())


def conf_fingerprint(config_sources: Sequence[Any]) -> str:
    """sha256 over everything a config composition reads (see the module docstring)."""
    from importlib.metadata import version

    import posttrain.cell as identity_module
    import posttrain.sweep.cells as cells_module
    import posttrain.sweep.checks as checks_module

    digest = hashlib.sha256()
    digest.update(f"hydra-core {version('hydra-core')} omegaconf {version('omegaconf')}\0".encode())
    for module in (identity_module, cells_module, checks_module):  # the hash, the subdir, the variant's defaults
        digest.update(Path(module.__file__).read_bytes())
    for source in config_sources:
        schema, location = str(source["schema"]), str(source["path"])
        digest.update(f"{schema}://{location}\0".encode())
        directory = _source_dir(schema, location)
        if directory is not None and directory.is_dir():
            _tree_digest(directory, digest)
    _store_digest(ConfigStore.instance().repo, "", digest)
    return digest.hexdigest()[:16]


def memo_key(fingerprint: str, overrides: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([fingerprint, list(overrides)]).encode()).hexdigest()[:24]


class HashMemo:
    """``<sweep dir>/.config_hashes.json``: {"fingerprint": F, "cells": {memo_key: {"hash", "cell"}}}."""

    def __init__(self, sweep_dir: Path, fingerprint: str) -> None:
        self.path = sweep_dir / MEMO_FILE
        self.fingerprint = fingerprint
        self.entries: Dict[str, Dict[str, str]] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("fingerprint") == fingerprint and isinstance(data.get("cells"), dict):
            self.entries = data["cells"]

    def get(self, overrides: Sequence[str]) -> Optional[Dict[str, str]]:
        return self.entries.get(memo_key(self.fingerprint, overrides))

    def put(self, overrides: Sequence[str], config_hash: str, cell: str) -> None:
        key = memo_key(self.fingerprint, overrides)
        if self.entries.get(key) != {"hash": config_hash, "cell": cell}:
            self.entries[key] = {"hash": config_hash, "cell": cell}
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        from filelock import FileLock

        from posttrain.results import write_json_atomic

        with FileLock(str(self.path) + ".lock"):
            try:  # merge entries another launch into this directory wrote meanwhile (same fingerprint only)
                data = json.loads(self.path.read_text())
                if data.get("fingerprint") == self.fingerprint:
                    self.entries = {**data.get("cells", {}), **self.entries}
            except (OSError, ValueError, AttributeError):
                pass
            write_json_atomic(self.path, {"fingerprint": self.fingerprint, "cells": self.entries})
        self.dirty = False


def read_cell_key(run_dir: Path, key: str) -> Optional[str]:
    """The config hash a job recorded in its cell directory, if it recorded it under the same memo key."""
    try:
        data = json.loads((run_dir / CELL_KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("hash") if isinstance(data, dict) and data.get("key") == key else None


class MemoTask:
    """The task function as the sweeper hands it to the launcher: before the run, the job records its memo key and
    config hash in its cell directory (``.config_key.json``), so a relaunch can skip the cell without composing it
    even when the job ran elsewhere (Slurm). Picklable (submitit pickles the launcher with its task function)."""

    def __init__(self, task_function: TaskFunction) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        if OmegaConf.select(cfg, "dry_run", default=False) is not True:
            try:
                self._record(cfg)
            except Exception as exc:  # noqa: BLE001 - the memo is an optimisation; never fail a run for it
                log.warning(f"could not record the config hash memo: {exc}")
        return self.task_function(cfg)

    @staticmethod
    def _record(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from posttrain.cell import config_hash
        from posttrain.results import write_json_atomic

        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        fingerprint = conf_fingerprint(OmegaConf.to_container(hc.runtime.config_sources))
        run_dir = Path(hc.runtime.output_dir)
        write_json_atomic(run_dir / CELL_KEY_FILE, {"key": memo_key(fingerprint, overrides),
                                                    "hash": config_hash(cfg)})


def split_completed(cells: Sequence[files.Cell], sweep_dir: Path, memo: HashMemo,
                    identity: Callable[[Sequence[str], int], tuple[str, str]]
                    ) -> tuple[List[files.Cell], List[tuple[files.Cell, str]]]:
    """(cells to launch, [(cell, its directory)] to skip): a cell is skipped when its result.json says completed
    with the config hash it would have now: from the memo, else from the key file the job wrote in its cell
    directory, else from ``identity(overrides, num)`` (composition); what is learnt is memoised. Cells without a
    completed result.json are never composed here."""
    todo: List[files.Cell] = []
    skipped: List[tuple[files.Cell, str]] = []
    for num, cell in enumerate(cells):
        entry = memo.get(cell.overrides)
        subdir = entry["cell"] if entry else cell.path
        if not subdir or completed_hash(sweep_dir / subdir) is None:
            todo.append(cell)
            continue
        if entry is not None:
            chash = entry["hash"]
        elif recorded := read_cell_key(sweep_dir / subdir, memo_key(memo.fingerprint, cell.overrides)):
            chash = recorded  # the job recorded it, under the same conf fingerprint and overrides
            memo.put(cell.overrides, chash, subdir)
        else:
            subdir, chash = identity(cell.overrides, num)
            memo.put(cell.overrides, chash, subdir)
        if is_done(sweep_dir / subdir, chash):
            skipped.append((cell, subdir))
        else:
            todo.append(cell)
    return todo, skipped


# ------------------------------------------------------------------ the sweeper
class PosttrainSweeperImpl(Sweeper):
    """The implementation; Hydra instantiates the subclass hydra_plugins.posttrain_sweeper.PosttrainSweeper."""

    def __init__(self, sweep: Optional[str] = None, max_batch_size: Optional[int] = None,
                 skip_completed: bool = True) -> None:
        super().__init__()
        self.sweep_file = sweep
        self.max_batch_size = max_batch_size
        self.skip_completed = skip_completed
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=MemoTask(task_function), config=config)

    # -- helpers
    def _conf_dir(self) -> Path:
        assert self.config is not None
        for source in self.config.hydra.runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                return Path(source.path)
        return files.default_conf_dir()

    def _compose(self, overrides: Sequence[str]) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def _composed_identity(self, overrides: Sequence[str], num: int) -> tuple[str, str]:
        """(cell directory as Hydra computes it, config hash as run.py computes it) of one cell, by composition."""
        from hydra.core.hydra_config import HydraConfig

        cfg = self._compose(overrides)
        with open_dict(cfg):
            cfg.hydra.job.num = num
            cfg.hydra.job.id = f"job_id_for_{num}"
        hydra_config = HydraConfig.instance()
        saved = hydra_config.cfg
        try:
            hydra_config.set_config(cfg)
            subdir = str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
        finally:
            hydra_config.cfg = saved
        with open_dict(cfg):
            cfg.pop("hydra")  # the task sees the config without its hydra node (hydra.core.utils.run_job)
        return os.path.normpath(subdir), config_hash(cfg)

    def cells(self, arguments: List[str]) -> List[files.Cell]:
        conf_dir = self._conf_dir()
        try:
            if self.sweep_file:
                return files.expand(self.sweep_file, arguments, conf_dir)
            return files.grid(arguments, conf_dir)
        except files.SweepError as exc:
            from hydra.errors import HydraException

            raise HydraException(str(exc)) from None

    # -- the sweep
    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        cells = self.cells(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        dry_run = OmegaConf.select(self.config, "dry_run", default=False) is True

        memo = None if dry_run else HashMemo(sweep_dir, conf_fingerprint(
            OmegaConf.to_container(self.config.hydra.runtime.config_sources)))
        tic = time.perf_counter()
        if dry_run or not self.skip_completed or memo is None:
            todo, skipped = list(cells), []
        else:
            todo, skipped = split_completed(cells, sweep_dir, memo, self._composed_identity)
        if skipped:
            self._keep_manifest_entries(sweep_dir, skipped)
        if not dry_run:
            label = f"sweep file {Path(self.sweep_file).stem}" if self.sweep_file else "grid"
            print(f"{label}: {len(cells)} cells: {len(skipped)} already completed with the same config (skipped; "
                  f"checked in {time.perf_counter() - tic:.2f}s), {len(todo)} to launch into {sweep_dir}", flush=True)

        if not dry_run and todo and not self._launcher_composes_first():
            self._list_in_manifest(sweep_dir, todo)  # before the first cell runs: status works from now on
        returns: List[Sequence[JobReturn]] = []
        size = self.max_batch_size if self.max_batch_size and self.max_batch_size > 0 else max(1, len(todo))
        first = 0
        for start in range(0, len(todo), size):
            batch = [list(c.overrides) for c in todo[start:start + size]]
            if not dry_run and not self._launcher_composes_first():
                self._validate(batch, todo[start:start + size], memo, first)
                if memo is not None:
                    memo.save()  # before launching: an interrupted sweep keeps what it learnt
            results = self.launcher.launch(batch, initial_job_idx=first)
            for r in results:
                _ = r.return_value  # as the basic sweeper: re-raise a job's exception here
            first += len(batch)
            returns.append(results)
        if memo is not None:
            memo.save()
        return returns

    def _launcher_composes_first(self) -> bool:
        """posttrain's Slurm launcher composes every cell before it submits any, so validating here would compose
        each cell twice (and double the submission time); its jobs record their hashes (MemoTask)."""
        try:
            from posttrain.sweep.launcher import PosttrainSlurmLauncherImpl
        except ImportError:
            return False
        return isinstance(self.launcher, PosttrainSlurmLauncherImpl)

    def _validate(self, batch: List[List[str]], cells: List[files.Cell], memo: Optional[HashMemo],
                  first: int) -> None:
        """Compose every cell before launching (as the basic sweeper does), recording its hash in the memo."""
        for offset, (overrides, cell) in enumerate(zip(batch, cells)):
            subdir, chash = self._composed_identity(overrides, first + offset)
            if cell.path is not None and subdir != os.path.normpath(cell.path):
                log.warning(f"cell {overrides}: Hydra's directory {subdir} differs from the fast path's {cell.path}")
            if memo is not None:
                memo.put(overrides, chash, subdir)

    def _list_in_manifest(self, sweep_dir: Path, todo: List[files.Cell]) -> None:
        """sweep.json entries (no job id) for the cells this local launch will run, before it runs any (the ones
        whose directory needs composing are added by the callback as they start)."""
        from posttrain.sweep.manifest import make_entry, write_manifest

        assert self.config is not None
        entries = [make_entry(sweep_dir, cell=Path(c.path).as_posix(), overrides=c.overrides, job_id=None)
                   for c in todo if c.path is not None]
        launcher = str(self.config.hydra.runtime.choices.get("hydra/launcher") or "basic")
        write_manifest(sweep_dir, entries, sweep=str(OmegaConf.select(self.config, "sweep_name",
                                                                      default=sweep_dir.name)), launcher=launcher)

    def _keep_manifest_entries(self, sweep_dir: Path, skipped: List[tuple[files.Cell, str]]) -> None:
        from posttrain.sweep.manifest import make_entry, read_manifest, write_manifest

        try:
            known = {str(e.get("cell")) for e in ((read_manifest(sweep_dir) or {}).get("cells") or [])}
        except ValueError:
            known = set()
        fresh = [make_entry(sweep_dir, cell=Path(subdir).as_posix(), overrides=cell.overrides, job_id=None)
                 for cell, subdir in skipped if Path(subdir).as_posix() not in known]
        if fresh:
            assert self.config is not None
            launcher = str(self.config.hydra.runtime.choices.get("hydra/launcher") or "basic")
            write_manifest(sweep_dir, fresh, sweep=str(OmegaConf.select(self.config, "sweep_name",
                                                                        default=sweep_dir.name)),
                           launcher=launcher)
