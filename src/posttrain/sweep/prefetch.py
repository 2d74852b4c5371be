"""``python -m posttrain.sweep prefetch [sweep=NAME] [OVERRIDES...]``: everything a launch's cells need, in the mirror.

Compute nodes of real clusters are often air-gapped. Prefetch takes the same arguments as a launch
(``sweep=paper``, or a CLI grid ``algo=dpo,simpo scale=0.5b,7b seed=0-4``, Hydra overrides, ``mirror=DIR`` or
``POSTTRAIN_MIRROR``), expands them into cells as ``python launch.py -m`` would (posttrain.sweep.files: sweep files
without composing every cell), composes one config per distinct (scale, eval, data, mirror) overrides (four for
``sweep=paper``), and resolves what those cells read:

- the model and tokenizer of each scale (``scale.model``/``scale.tokenizer``: a hub id; a local directory is used
  as is, the embedded tiny bases are built locally);
- GSM8K train when ``data.source`` is gsm8k (``scale.data_path``: self-play prompts and their few-shot examples);
- the dataset splits of every lm-eval task of ``eval.tasks``, read from lm-eval's own YAMLs (groups expanded:
  minerva_math's 7 hendrycks_math configs), posttrain.evaluate.lm_eval_tasks;
- the antlr4 4.11 runtime lm-eval's minerva_math scores with (posttrain.evaluate.math_runtime).

Each one is checked in the mirror (layout: posttrain.mirror) and, where absent, downloaded into it where the hub
is reachable: models with ``huggingface_hub.snapshot_download``, datasets with ``datasets.load_dataset`` (each
split written as jsonl, the dataset's own schema), the runtime with ``pip --target`` (or copied from the cache).
What cannot be had is listed, one line each (what, which id, where it should go, who needs it), and the exit code
is 1; everything present gives one summary line and exit 0. With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set it
only checks (no download is tried); after the first network failure the remaining downloads are not tried either,
so an unreachable hub costs one timeout, never a hang. Usage errors exit 2 with one line.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from posttrain import mirror as layout

#: Top-level config keys whose overrides can change what a cell reads from the hub.
NEED_ROOTS = ("scale", "eval", "data", "mirror")
MULTIRUN_FLAGS = ("-m", "--multirun")


class PrefetchUsage(Exception):
    """A command line prefetch cannot use; one line."""


class HubUnreachable(Exception):
    """The hub (or PyPI) did not answer: further downloads are not tried."""


@dataclass
class Need:
    """One thing the cells read: a model, a dataset (some splits of one config) or a Python runtime."""
    kind: str                   # "model" | "tokenizer" | "dataset" | "python"
    ident: str                  # hub id, "path (name)", or "dist==version"
    target: Path                # where it goes in the mirror
    users: list[str] = field(default_factory=list)
    path: str = ""              # dataset: hub path and config name
    name: str | None = None
    splits: list[str] = field(default_factory=list)
    local: bool = False         # a local path given in the config (checked, never fetched)
    mirror: str = ""

    def present(self) -> bool:
        if self.local:
            return self.target.exists()
        if self.kind == "model":
            return (self.target / "config.json").is_file() and self.tokenizer_present()
        if self.kind == "tokenizer":
            return self.tokenizer_present()
        if self.kind == "dataset":
            return not layout.missing_splits(self.mirror, self.path, self.name, self.splits)
        from posttrain.evaluate import math_runtime

        return math_runtime.installed(self.target)

    def tokenizer_present(self) -> bool:
        return any((self.target / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))

    def where(self) -> str:
        if self.kind == "dataset":
            files = ",".join(f"{s}.jsonl" for s in self.splits)
            return f"{self.target}/{{{files}}}" if len(self.splits) > 1 else f"{self.target}/{files}"
        return f"{self.target}/" if not self.local else str(self.target)

    def line(self, status: str, note: str = "") -> str:
        extra = f"; {note}" if note else ""
        return f"{status:8s} {self.kind:9s} {self.ident}  -> {self.where()}  (for {', '.join(self.users)}{extra})"


# ------------------------------------------------------------------ cells and their configs
def _load_launch(root: Path):
    """launch.py's ``rewrite_ranges`` (``seed=0-4``), one definition for launch and prefetch."""
    spec = importlib.util.spec_from_file_location("posttrain_launch_cli", root / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cells(arguments: Sequence[str], conf_dir: Path, sweeps_dir: Path) -> list:
    """The cells ``python launch.py -m ARGUMENTS`` would launch (sweep files expanded)."""
    from posttrain.sweep import files

    launch = _load_launch(conf_dir.parent)
    try:
        args = launch.rewrite_ranges([a for a in arguments if a not in MULTIRUN_FLAGS])
    except launch.UsageError as exc:
        raise PrefetchUsage(str(exc)) from None
    bad = [a for a in args if a.startswith("-") or "=" not in a]
    if bad:
        raise PrefetchUsage(f"{bad[0]!r}: prefetch takes key=value overrides and sweep=NAME only")
    sweeps = [a for a in args if a.partition("=")[0] == "sweep"]
    rest = [a for a in args if a.partition("=")[0] != "sweep" and not a.startswith(("hydra.", "hydra/"))]
    try:
        if len(sweeps) > 1:
            raise PrefetchUsage(f"give one sweep=, not {len(sweeps)}")
        if sweeps:
            return files.expand(files.resolve(sweeps[0].partition("=")[2], sweeps_dir), rest, conf_dir)
        return files.grid(rest, conf_dir)
    except files.SweepError as exc:
        raise PrefetchUsage(str(exc)) from None


def _root(override: str) -> str:
    key = override.partition("=")[0].lstrip("+~")
    for sep in (".", "/", "@"):
        key = key.split(sep, 1)[0]
    return key


def need_keys(cell_list) -> dict[tuple[str, ...], int]:
    """Distinct overrides that matter for what a cell reads (NEED_ROOTS), with how many cells share each."""
    keys: dict[tuple[str, ...], int] = {}
    for cell in cell_list:
        key = tuple(o for o in cell.overrides if _root(o) in NEED_ROOTS)
        keys[key] = keys.get(key, 0) + 1
    return keys


def compose_all(keys, conf_dir: Path) -> list:
    """One composed config per key (Hydra's compose API; the run's own config files)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from posttrain.sweep import cells as _cells  # noqa: F401 - registers the ${posttrain_cell:} resolver

    out = []
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="prefetch"):
        for key in keys:
            try:
                out.append(compose(config_name="config", overrides=list(key)))
            except (HydraException, OmegaConfBaseException) as exc:
                raise PrefetchUsage(f"{' '.join(key) or '(defaults)'}: {str(exc).splitlines()[0]}") from None
    return out


# ------------------------------------------------------------------ what the configs read
def needs(configs, mirror: str) -> list[Need]:
    """Every model, dataset and runtime the composed configs read, merged (users and splits joined)."""
    from posttrain.evaluate import lm_eval_tasks, math_runtime
    from posttrain.evaluate.harness import EMBEDDED

    found: dict[tuple[str, str], Need] = {}

    def add(need: Need, user: str) -> None:
        have = found.setdefault((need.kind, need.ident), need)
        if user not in have.users:
            have.users.append(user)
        have.splits += [s for s in need.splits if s not in have.splits]

    def dataset(path: str, name: str | None, splits, user: str) -> None:
        ident = f"{path} ({name or layout.DEFAULT_NAME})"
        add(Need("dataset", ident, layout.dataset_dir(mirror, path, name), path=path, name=name,
                 splits=list(splits), mirror=mirror), user)

    leaves_of: dict[tuple[str, ...], list] = {}
    for cfg in configs:
        scale = cfg.scale
        model, tokenizer = scale.get("model"), scale.get("tokenizer")
        if model is not None:
            _model_need(add, "model", str(model), mirror, f"scale {scale.name}")
        if tokenizer is not None and tokenizer != model:
            _model_need(add, "tokenizer", str(tokenizer), mirror, f"scale {scale.name}")
        if cfg.data.get("source") == "gsm8k" and cfg.data.get("path"):
            from posttrain.data.gsm8k import CONFIG

            path = str(cfg.data.path)
            if layout.is_local_path(path):
                add(Need("dataset", path, Path(path).expanduser(), local=True), "self-play prompts")
            else:
                dataset(path, CONFIG, ["train"], "self-play prompts")
        tasks = tuple(t for t in cfg.eval.tasks if t not in EMBEDDED)
        if tasks and tasks not in leaves_of:
            leaves_of[tasks] = lm_eval_tasks.study_leaves(list(tasks))
        for leaf in leaves_of.get(tasks, []):
            dataset(leaf.dataset_path, leaf.dataset_name, leaf.splits, f"lm-eval {leaf.name}")
            if leaf.lm_eval_dir in math_runtime.TASK_DIRS:
                add(Need("python", f"{math_runtime.DIST}=={math_runtime.VERSION}",
                         layout.python_dir(mirror, math_runtime.DIST, math_runtime.VERSION)), "lm-eval minerva_math")
    return list(found.values())


def _model_need(add: Callable, kind: str, ident: str, mirror: str, user: str) -> None:
    if layout.is_local_path(ident):
        add(Need(kind, ident, Path(ident).expanduser(), local=True), user)
    else:
        add(Need(kind, ident, layout.model_dir(mirror, ident)), user)


# ------------------------------------------------------------------ fetching
def _fresh(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def _publish(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _hub_error(exc: Exception) -> Exception:
    """An error of this one item (the id does not exist, is gated) or HubUnreachable (stop trying)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    item_errors: tuple = (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError)
    try:
        from datasets.exceptions import DatasetNotFoundError

        item_errors += (DatasetNotFoundError,)
    except ImportError:  # pragma: no cover - older datasets
        pass
    message = str(exc).splitlines()[0][:160] if str(exc) else ""
    if isinstance(exc, item_errors) and not isinstance(exc, ConnectionError):
        return ValueError(f"{type(exc).__name__}: {message}")
    return HubUnreachable(f"{type(exc).__name__}: {message}")


def fetch_model(need: Need) -> None:
    from huggingface_hub import snapshot_download

    tmp = _fresh(need.target)
    try:
        patterns = ["*.json", "*.txt", "*.model", "*.tiktoken"] if need.kind == "tokenizer" else None
        snapshot_download(repo_id=need.ident, local_dir=str(tmp), allow_patterns=patterns,
                          ignore_patterns=["*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot", "original/*"])
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        _publish(tmp, need.target)
    except Exception as exc:
        raise _hub_error(exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_dataset(need: Need, mirror: str) -> None:
    from datasets import load_dataset

    for split in layout.missing_splits(mirror, need.path, need.name, need.splits):
        final = layout.expected_file(mirror, need.path, need.name, split)
        partial = final.with_name(f".{final.name}.partial")
        try:
            ds = load_dataset(need.path, need.name, split=split)
            final.parent.mkdir(parents=True, exist_ok=True)
            ds.to_json(str(partial), lines=True, force_ascii=False)
        except Exception as exc:
            partial.unlink(missing_ok=True)
            raise _hub_error(exc) from None
        os.replace(partial, final)


def fetch_python(need: Need, *, allow_network: bool = True) -> str:
    """The runtime into the mirror: copied from the cache when it is there, else from PyPI (``allow_network``)."""
    from posttrain.evaluate import math_runtime

    cached = math_runtime.cache_dir()
    if not math_runtime.installed(cached) and not allow_network:
        raise HubUnreachable("not in the cache and no download tried")
    tmp = _fresh(need.target)
    try:
        if math_runtime.installed(cached):
            shutil.copytree(cached, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
            note = f"copied from {cached}"
        else:
            try:
                math_runtime.pip_install(tmp)
            except math_runtime.MathRuntimeError as exc:
                raise HubUnreachable(str(exc)) from None
            note = "from PyPI"
        _publish(tmp, need.target)
        return note
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ the command
def prefetch(arguments: Sequence[str], *, conf_dir: Path | None = None, sweeps_dir: Path | None = None,
             out=print) -> int:
    """Check (and where possible fetch) everything the launch's cells need; 0 all present, 1 missing, 2 usage."""
    from posttrain.sweep import files

    conf_dir = Path(conf_dir) if conf_dir is not None else files.default_conf_dir()
    sweeps_dir = Path(sweeps_dir) if sweeps_dir is not None else conf_dir.parent / "sweeps"
    try:
        cell_list = cells(arguments, conf_dir, sweeps_dir)
        configs = compose_all(need_keys(cell_list), conf_dir)
        mirrors = {c.get("mirror") for c in configs}
        if len(mirrors) > 1:
            raise PrefetchUsage(f"one mirror per prefetch, not {len(mirrors)}: {', '.join(map(str, mirrors))}")
        mirror = mirrors.pop() if mirrors else None
        if not mirror:
            raise PrefetchUsage("prefetch needs a mirror directory: give mirror=DIR or set POSTTRAIN_MIRROR")
        found = needs(configs, str(mirror))
    except (PrefetchUsage, ValueError) as exc:  # ValueError: lm-eval knows no such task or group
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    order = ("model", "tokenizer", "dataset", "python")
    found.sort(key=lambda n: order.index(n.kind))
    unreachable = "the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if layout.hub_offline() else ""
    missing: list[str] = []
    for need in found:
        if need.present():
            continue
        if need.local:
            missing.append(need.line("missing", "a local path that does not exist"))
            continue
        try:
            if need.kind == "python":  # a copy from the cache needs no network
                out(need.line("fetched", fetch_python(need, allow_network=not unreachable)))
                continue
            if unreachable:
                missing.append(need.line("missing"))
                continue
            if need.kind in ("model", "tokenizer"):
                fetch_model(need)
            else:
                fetch_dataset(need, str(mirror))
            out(need.line("fetched"))
        except HubUnreachable as exc:
            unreachable = unreachable or f"a download failed ({exc})"
            missing.append(need.line("missing"))
        except (ValueError, OSError) as exc:  # OSError: an unwritable or full mirror
            missing.append(need.line("missing", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"))
    for line in missing:
        out(line)
    counts = _counts(found)
    if missing:
        why = f" ({unreachable})" if unreachable else ""
        out(f"{len(missing)} of {len(found)} needs of {len(cell_list)} cells missing from {mirror}{why}: copy them "
            f"there as listed, or run this again where the hub and PyPI are reachable")
        return 1
    out(f"mirror {mirror} holds everything {len(cell_list)} cells need ({counts})" if found else
        f"nothing to fetch: the {len(cell_list)} cells use embedded models and tasks only")
    return 0


def _counts(found: list[Need]) -> str:
    order = ("model", "tokenizer", "dataset", "python")
    names = {"model": "models", "tokenizer": "tokenizers", "dataset": "datasets", "python": "python runtimes"}
    return ", ".join(f"{sum(n.kind == k for n in found)} {names[k]}" for k in order if any(n.kind == k for n in found))
