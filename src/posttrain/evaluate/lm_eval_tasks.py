"""lm-eval's own task definitions for the study's tasks: where they live, which dataset splits they read, and how
they are pointed at the local mirror without changing anything else.

The study profile (conf/eval/default.yaml) names lm-eval tasks: gsm8k, minerva_math (a group of 7 subtasks, one
per EleutherAI/hendrycks_math config), arc_challenge, hellaswag, winogrande. Their YAMLs are read from the installed
lm-eval (``lm_eval/tasks/<dir>``), indexing only the directories they live in (:data:`STUDY_TASK_DIRS`: ~0.1 s
instead of ~10 s for lm-eval's ~10,000 YAMLs); any other lm-eval task name falls back to lm-eval's whole index.

Mirror, as lm-eval 0.4.13 allows it: a task YAML may ``include`` another and override keys, and a later
``include_path`` overrides a task of the same name. For each leaf task whose dataset the mirror holds,
:func:`write_mirror_overrides` writes::

    include: <lm-eval's own YAML of the task>
    dataset_path: json            # or parquet: datasets' file builders
    dataset_name: null
    dataset_kwargs: {data_files: {<split>: <mirror file>, ...}}

so prompts, few-shot settings (gsm8k's few-shot examples come from its ``train`` split, minerva_math's from its
fixed list), ``process_docs`` (hellaswag, minerva_math), filters and metric names are lm-eval's, and only where
the rows come from changes. Every split the YAML names (training, validation, test, few-shot) must be in the
mirror: a dataset the mirror holds only in part, or one it lacks while the hub is offline, is one line naming the
task, the dataset and the file expected (:class:`posttrain.mirror.MirrorMissing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain import mirror as mirror_layout

#: Study task -> the lm-eval task directories its YAMLs (and its group's) live in.
STUDY_TASK_DIRS = {
    "gsm8k": ("gsm8k",),
    "minerva_math": ("minerva_math", "benchmarks"),
    "arc_challenge": ("arc",),
    "hellaswag": ("hellaswag",),
    "winogrande": ("winogrande",),
}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


@dataclass(frozen=True)
class LeafTask:
    """One lm-eval task (not a group) and the dataset splits its YAML reads."""
    name: str
    yaml_path: Path
    dataset_path: str
    dataset_name: str | None
    splits: tuple[str, ...]
    output_type: str

    @property
    def lm_eval_dir(self) -> str:
        return self.yaml_path.parent.name


def index_dirs(tasks) -> list[Path] | None:
    """The lm-eval task directories to index for ``tasks``, or None when one is not a study task (index all)."""
    if any(t not in STUDY_TASK_DIRS for t in tasks):
        return None
    root = lm_eval_tasks_dir()
    out: list[Path] = []
    for task in tasks:
        out += [root / d for d in STUDY_TASK_DIRS[task] if root / d not in out]
    return out


def build_index(dirs: list[Path] | None) -> dict:
    """lm-eval's ``{name: Entry}`` index over ``dirs`` (all of lm-eval's tasks when None)."""
    import logging

    from lm_eval.tasks._index import TaskIndex

    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)  # "overrides existing task": intended
    return TaskIndex.build(dirs if dirs is not None else [lm_eval_tasks_dir()])


def _splits(cfg: dict) -> tuple[str, ...]:
    found: list[str] = []
    fewshot = cfg.get("fewshot_config") or {}
    for value in [cfg.get(k) for k in SPLIT_KEYS] + [fewshot.get("split") if isinstance(fewshot, dict) else None]:
        if isinstance(value, str) and value not in found:
            found.append(value)
    return tuple(found)


def leaf_tasks(tasks, index: dict) -> list[LeafTask]:
    """The leaf tasks of ``tasks`` (groups expanded), with their datasets, from lm-eval's YAMLs."""
    from lm_eval.tasks._index import Kind

    out: list[LeafTask] = []
    seen: set[str] = set()

    def members(items: list, where: str) -> None:
        for child in items:
            if isinstance(child, str):
                visit(child, where)
            elif isinstance(child, dict) and isinstance(child.get("task"), str):
                visit(child["task"], where)
            elif isinstance(child, dict) and "group" in child:  # an inline subgroup
                members(child.get("task") or [], f"{where}::{child['group']}")

    def visit(name: str, where: str) -> None:
        entry = index.get(name)
        if entry is None:
            raise ValueError(f"{where}: lm-eval {lm_eval_version()} has no task or group {name!r}")
        if entry.kind == Kind.GROUP:
            members(entry.cfg.get("task") or [], f"group {name}")
            return
        if entry.kind == Kind.TAG:
            for child in sorted(entry.tags):
                visit(child, f"tag {name}")
            return
        if name in seen or entry.yaml_path is None or entry.kind != Kind.TASK:
            return
        cfg = entry.cfg or {}
        if not isinstance(cfg.get("dataset_path"), str) or cfg.get("custom_dataset"):
            return  # a task that brings its own data: nothing to mirror
        seen.add(name)
        name_cfg = cfg.get("dataset_name")
        out.append(LeafTask(name=name, yaml_path=Path(entry.yaml_path), dataset_path=cfg["dataset_path"],
                            dataset_name=name_cfg if isinstance(name_cfg, str) else None, splits=_splits(cfg),
                            output_type=str(cfg.get("output_type", ""))))

    for task in tasks:
        visit(task, "eval.tasks")
    return out


def study_leaves(tasks) -> list[LeafTask]:
    """The leaf tasks of study tasks (as prefetch and evaluation see them), from lm-eval's own YAMLs."""
    return leaf_tasks(tasks, build_index(index_dirs(tasks)))


def write_mirror_overrides(leaves: list[LeafTask], mirror: str, out_dir: Path) -> list[str]:
    """Write an overriding YAML into ``out_dir`` for each leaf whose dataset the mirror holds; the task names.

    Raises MirrorMissing for a dataset held in part, or absent while the hub is offline (HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE); an absent dataset with the hub reachable is left to lm-eval (the hub)."""
    written = []
    for leaf in leaves:
        held = mirror_layout.has_dataset(mirror, leaf.dataset_path, leaf.dataset_name)
        if not held and not mirror_layout.hub_offline():
            continue
        local = mirror_layout.dataset_files(mirror, leaf.dataset_path, leaf.dataset_name, leaf.splits,
                                            needed_by=f"lm-eval task {leaf.name}")
        config = {"include": str(leaf.yaml_path), "task": leaf.name, "dataset_path": local.builder,
                  "dataset_name": None, "dataset_kwargs": {"data_files": local.files}}
        (out_dir / f"{leaf.name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        written.append(leaf.name)
    return written
