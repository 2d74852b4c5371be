"""The local mirror: copies of the models, datasets and Python runtime a run needs, for clusters without hub access.

A mirror is a directory (``mirror=DIR`` on the command line, or ``POSTTRAIN_MIRROR``; ``conf/config.yaml``) that
``python -m posttrain.sweep prefetch`` fills where the hub is reachable, and that runs read with the hub offline.
Its layout, owned by this module::

    <mirror>/models/<hub id>/                            an HF ``save_pretrained`` directory with its tokenizer
                                                         files (Qwen/Qwen2.5-0.5B-Instruct/config.json, ...)
    <mirror>/datasets/<dataset_path>/<name>/<split>.jsonl    rows in the dataset's own schema (field names and
                                                         types as on the hub); <name> is the dataset's config
                                                         name, or ``default`` when it has none; ``.parquet``
                                                         instead of ``.jsonl`` also works (one format per name)
    <mirror>/python/<dist>-<version>/                    a ``pip install --target`` directory: the antlr4 4.11
                                                         runtime that lm-eval's minerva_math scores with
                                                         (posttrain.evaluate.math_runtime)

e.g. ``<mirror>/datasets/openai/gsm8k/main/train.jsonl`` (the self-play prompts and gsm8k's few-shot examples),
``<mirror>/datasets/EleutherAI/hendrycks_math/algebra/test.jsonl``, ``<mirror>/datasets/Rowan/hellaswag/default/
validation.jsonl``. A model id that is a local directory is used as it is, never looked up here. Nothing here
imports torch, transformers or datasets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_FORMATS = (".jsonl", ".parquet")
DEFAULT_NAME = "default"
PREFETCH_HINT = "python -m posttrain.sweep prefetch"
_OFF = ("", "0", "false", "no", "off")


class MirrorMissing(ValueError):
    """A file the run needs is not in the mirror; the message is one line naming it and the fix."""


def is_local_path(location: str) -> bool:
    """Whether ``location`` names a local file or directory (it exists, or it is spelled as a path)."""
    text = str(location)
    return Path(text).expanduser().exists() or text.startswith(("/", "./", "../", "~"))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set (the hub must not be asked)."""
    return any(os.environ.get(k, "").strip().lower() not in _OFF for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _under(root: Path, *parts: str) -> Path:
    """``root/parts...``, refusing ids that would leave the mirror (``..``, absolute parts)."""
    for part in parts:
        pieces = str(part).split("/")
        if not part or part.startswith("/") or any(p in ("", ".", "..") for p in pieces):
            raise ValueError(f"{part!r} cannot name a mirror entry (a hub id like org/name is expected)")
    return root.joinpath(*parts)


# ------------------------------------------------------------------ models
def model_dir(mirror: str | Path, model_id: str) -> Path:
    """Where the mirror keeps ``model_id`` (whether or not it is there)."""
    return _under(Path(mirror).expanduser(), "models", model_id)


def has_model(mirror: str | Path, model_id: str) -> bool:
    """The mirror holds a ``save_pretrained`` directory (config.json) with tokenizer files for ``model_id``."""
    where = model_dir(mirror, model_id)
    return (where / "config.json").is_file() and any(
        (where / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))


def model_location(model_id: str, mirror: str | None) -> str:
    """What to load for ``model_id``: a local directory as is; else the mirror's copy when the mirror holds it;
    else the id unchanged (the hub, or the HF cache, decides)."""
    if not mirror or is_local_path(model_id):
        return model_id
    return str(model_dir(mirror, model_id)) if has_model(mirror, model_id) else model_id


def model_missing(model_id: str, mirror: str | None) -> str:
    """The one line for a hub model id that cannot be had: not in the mirror (or no mirror) and the hub offline."""
    where = f"not in the mirror (expected {model_dir(mirror, model_id)}/)" if mirror else "no mirror is set"
    return (f"model {model_id!r}: {where} and the hub is offline; run `{PREFETCH_HINT}` where the hub is reachable "
            "(mirror=DIR or POSTTRAIN_MIRROR), or point scale.model at a local directory")


# ------------------------------------------------------------------ datasets
def dataset_dir(mirror: str | Path, path: str, name: str | None) -> Path:
    """``<mirror>/datasets/<path>/<name or default>``."""
    return _under(Path(mirror).expanduser(), "datasets", path, name or DEFAULT_NAME)


def expected_file(mirror: str | Path, path: str, name: str | None, split: str) -> Path:
    """The file a split should be in (``.jsonl``, the format prefetch writes)."""
    return dataset_dir(mirror, path, name) / f"{split}{DATA_FORMATS[0]}"


def split_file(mirror: str | Path, path: str, name: str | None, split: str) -> Path | None:
    """The mirror's file of one split (``.jsonl`` or ``.parquet``), or None."""
    base = dataset_dir(mirror, path, name)
    for suffix in DATA_FORMATS:
        candidate = base / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def has_dataset(mirror: str | Path, path: str, name: str | None) -> bool:
    """The mirror holds at least one split of (path, name)."""
    base = dataset_dir(mirror, path, name)
    return base.is_dir() and any(p.suffix in DATA_FORMATS for p in base.iterdir())


def missing_splits(mirror: str | Path, path: str, name: str | None, splits) -> list[str]:
    return [s for s in splits if split_file(mirror, path, name, s) is None]


def missing_split(mirror: str | Path, path: str, name: str | None, split: str, *, needed_by: str) -> MirrorMissing:
    """The one-line error for a split the mirror lacks: who needs it, which dataset, the file expected, the fix."""
    return MirrorMissing(
        f"{needed_by} needs dataset {path} ({name or DEFAULT_NAME}) split {split!r}: expected "
        f"{expected_file(mirror, path, name, split)} (run `{PREFETCH_HINT}` where the hub is reachable)")


@dataclass(frozen=True)
class DatasetFiles:
    """Local files of a dataset's splits: ``load_dataset(builder, data_files=files)`` reads them."""
    builder: str            # "json" or "parquet" (the datasets builder)
    files: dict[str, str]   # split -> path


def dataset_files(mirror: str | Path, path: str, name: str | None, splits, *, needed_by: str) -> DatasetFiles:
    """The mirror's files for ``splits`` of (path, name), or :class:`MirrorMissing` naming the first missing one
    and who needs it (``needed_by``, e.g. "lm-eval task gsm8k")."""
    files: dict[str, Path] = {}
    for split in splits:
        found = split_file(mirror, path, name, split)
        if found is None:
            raise missing_split(mirror, path, name, split, needed_by=needed_by)
        files[split] = found
    suffixes = {p.suffix for p in files.values()}
    if len(suffixes) > 1:
        raise MirrorMissing(f"{dataset_dir(mirror, path, name)} mixes {' and '.join(sorted(suffixes))} files; "
                            "keep one format per dataset")
    builder = "parquet" if suffixes == {".parquet"} else "json"
    return DatasetFiles(builder, {split: str(p) for split, p in files.items()})


# ------------------------------------------------------------------ python runtimes
def python_dir(mirror: str | Path, dist: str, version: str) -> Path:
    """``<mirror>/python/<dist>-<version>`` (a pip --target directory)."""
    return _under(Path(mirror).expanduser(), "python", f"{dist}-{version}")
