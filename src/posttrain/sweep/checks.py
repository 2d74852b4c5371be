"""Every cell of a launch checked from its override strings, before Hydra composes anything (docs/design.md,
"Layers": validation before anything loads).

launch.py runs :func:`check_cells` on the cells of every command line it can read (a single run, a grid, a sweep
file; the dry run included), so a mistake is one line and exit 2 before any model, data or tokenizer loads and
before anything is submitted:

- a group option or launcher without a config (``algo=dpoo``, ``scale=13b``, ``hydra/launcher=slurm_h10``): the
  valid options;
- a key the config does not have (``trainer.max_step=3``): the config is in Hydra's struct mode, so new keys need
  ``+``; the valid keys;
- a value outside the key's type or range (posttrain.config_schema: ``trainer.max_steps=0``, ``seed=-1``,
  ``trainer.lr=abc``);
- the algorithm's hyperparameters (posttrain.algorithms.hparams.validate, through config_schema.check_algo: it
  imports torch, so it runs only for cells with ``algo.*`` overrides, once per distinct (algorithm, hyperparameters)).

Values this module cannot read without Hydra (interpolations) are left to the composed check in run.py. Torch-free
unless a cell has ``algo.*`` overrides.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from posttrain.config_schema import BACKEND_KEYS, ConfigError, check_algo, check_backends, check_value

#: Launchers Hydra itself or its installed plugins provide (conf/hydra/launcher/*.yaml add posttrain's).
BUILTIN_LAUNCHERS = ("basic",)
SUBMITIT_LAUNCHERS = ("submitit_local", "submitit_slurm")
_MISSING = object()


@lru_cache(maxsize=16)
def groups(conf_dir: str) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in Path(conf_dir).iterdir() if p.is_dir() and p.name != "hydra"))


@lru_cache(maxsize=64)
def options(conf_dir: str, group: str) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (Path(conf_dir) / group).glob("*.yaml")))


@lru_cache(maxsize=16)
def launchers(conf_dir: str) -> tuple[str, ...]:
    import importlib.util

    names = set(BUILTIN_LAUNCHERS) | set(options(conf_dir, "hydra/launcher"))
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        names |= set(SUBMITIT_LAUNCHERS)
    return tuple(sorted(names))


@lru_cache(maxsize=16)
def _root(conf_dir: str) -> tuple[dict, dict]:
    """(top-level keys of conf/config.yaml without defaults/hydra, {group: default option})."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(Path(conf_dir) / "config.yaml"), resolve=False) or {}
    chosen = {}
    for entry in raw.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if isinstance(value, str):
                    chosen[key] = value
    top = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}
    return top, chosen


@lru_cache(maxsize=1024)
def group_node(conf_dir: str, group: str, option: str) -> Optional[dict]:
    """The group option's keys and values (following a one-entry defaults alias), or None when it has no file."""
    from omegaconf import OmegaConf

    path = Path(conf_dir) / group / f"{option}.yaml"
    if not path.is_file():
        return None
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    defaults = raw.pop("defaults", None)
    if isinstance(defaults, list):
        merged: dict = {}
        for entry in defaults:
            if isinstance(entry, str) and entry != "_self_":
                merged.update(group_node(conf_dir, group, entry) or {})
        raw = {**merged, **raw}
    return raw


def choices(conf_dir: str, overrides: Sequence[str]) -> dict[str, str]:
    """{group: option} of a cell: conf/config.yaml's defaults, the cell's ``group=option`` overrides on top."""
    _, chosen = _root(conf_dir)
    chosen = dict(chosen)
    for line in overrides:
        key, eq, value = line.partition("=")
        if eq and key in chosen:
            chosen[key] = value
    return {g: o.replace("${scale}", chosen.get("scale", "")) for g, o in chosen.items()}


@lru_cache(maxsize=8192)
def _parse(line: str) -> tuple[str, str, Any]:
    """(prefix +/++/~ or '', key, value as Hydra parses it; _MISSING for a value that needs composing)."""
    from posttrain.sweep.files import _parser

    (override,) = _parser().parse_overrides([line])
    key = override.key_or_group
    prefix = "~" if override.is_delete() else ("++" if override.is_force_add() else ("+" if override.is_add() else ""))
    value = override.value()
    return prefix, key, (_MISSING if _interpolated(value) else value)


def _interpolated(value: Any) -> bool:
    """Whether a parsed override value holds an interpolation anywhere (``${scale.lr}``, in a list or dict too)."""
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_interpolated(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_interpolated(v) for v in value)
    return False


def _valid(names: Iterable[str]) -> str:
    return ", ".join(names)


def check_cell(overrides: Sequence[str], conf_dir: str | Path) -> Optional[tuple[str, dict]]:
    """Raise ConfigError for the first bad override of one cell; returns (algorithm name, hyperparameters) when the
    cell has ``algo.*`` overrides (for the caller to check once per distinct pair), else None."""
    conf = str(conf_dir)
    top, _ = _root(conf)
    chosen = choices(conf, overrides)
    algo_lines = []
    for line in overrides:
        prefix, key, value = _parse(line)
        if key == "hydra/launcher":
            if value is not _MISSING and str(value) not in launchers(conf):
                raise ConfigError(f"{line}: no such launcher; valid: {_valid(launchers(conf))}")
            continue
        if key.startswith(("hydra.", "hydra/")) or key == "hydra" or "@" in line.partition("=")[0]:
            continue  # hydra settings (Hydra checks them); a packaged override (algo@x=...): Hydra composes it
        root, _, rest = key.partition(".")
        if not rest and root in groups(conf):  # a group choice: algo=dpo
            if prefix != "~" and value is not _MISSING and (Path(conf) / root / f"{value}.yaml").is_file() is False:
                raise ConfigError(f"{line}: Could not find '{root}/{value}'; valid: {_valid(options(conf, root))}")
            continue
        # a top-level algo.* key without + is the hyperparameter schema's to judge (unknown vs. needs +, below)
        if prefix == "+" or (prefix == "" and not (root == "algo" and "." not in rest)):
            _check_exists(conf, top, chosen, root, rest, line, adding=prefix == "+")
        if root == "algo":
            algo_lines.append((prefix, rest, value, line))
            continue
        if prefix != "~" and value is not _MISSING:
            check_value(key, value, shown=line.partition("=")[2])
    if not algo_lines:
        return None
    node = group_node(conf, "algo", chosen["algo"]) or {}
    name = str(node.get("name", chosen["algo"]))
    # interpolated values (``${scale.max_new_tokens}``) need composing: run.py checks them on the composed config
    hparams = {k: v for k, v in node.items() if k != "name" and not (isinstance(v, str) and "${" in v)}
    present = set(node)  # interpolated keys too: they exist, only their value needs composing
    missing = []
    for prefix, rest, value, line in algo_lines:
        leaf = rest.split(".", 1)[0]
        if prefix == "~":
            hparams.pop(leaf, None)
            present.discard(leaf)
        elif value is not _MISSING and "." not in rest:
            if prefix == "" and leaf not in present:
                missing.append(line)
            hparams[leaf] = value
    return name, {"hparams": hparams, "missing": missing}


def _check_exists(conf: str, top: dict, chosen: dict, root: str, rest: str, line: str, adding: bool = False) -> None:
    """Struct mode, as Hydra applies it: a key that is not in the config needs ``+``; ``+`` on a key that is there
    is refused (Hydra: "Could not append"), so ``adding`` checks the opposite."""
    if adding:
        try:
            _check_exists(conf, top, chosen, root, rest, line)
        except ConfigError:
            return  # not there: + adds it
        if root == "algo" and not rest:
            return
        raise ConfigError(f"{line}: {line.partition('=')[0].lstrip('+')} is already in the config; set it without "
                          f"+ ({line.lstrip('+')}) or force it with +{line}")
    if root in chosen:
        node: Any = group_node(conf, root, chosen[root]) or {}
        where = f"{root} ({root}/{chosen[root]}.yaml)"
    else:
        node, where = top, "the config (conf/config.yaml)"
        rest = f"{root}.{rest}" if rest else root
    path = rest.split(".") if rest else []
    for depth, part in enumerate(path):
        if isinstance(node, str) and "${" in node:
            return  # an interpolated node: Hydra's composition checks it
        if not isinstance(node, dict) or part not in node:
            keys = sorted(node) if isinstance(node, dict) else []
            hint = f"; valid: {_valid(keys)}" if keys else ""
            raise ConfigError(f"{line}: no key {'.'.join(path[:depth + 1])} in {where}{hint}; to add a new key "
                              f"use +{line}")
        node = node[part]


def check_cells(cells: Iterable[Sequence[str]], conf_dir: str | Path) -> int:
    """Check every cell (each a list of override strings); raise ConfigError with the first bad one's line, the
    cell named when the launch has several. Returns the number of cells checked."""
    cells = [list(c) for c in cells]
    pending: dict[str, tuple[str, dict, list[str], list[str]]] = {}
    for overrides in cells:
        try:
            found = check_cell(overrides, conf_dir)
        except ConfigError as exc:
            raise ConfigError(_in_cell(str(exc), overrides, len(cells))) from None
        if found is not None:
            name, info = found
            key = json.dumps([name, info["hparams"]], sort_keys=True, default=str)
            pending.setdefault(key, (name, info["hparams"], info["missing"], overrides))
    for name, hparams, missing, overrides in pending.values():
        try:
            check_algo(name, hparams)
        except ConfigError as exc:
            raise ConfigError(_in_cell(str(exc), overrides, len(cells))) from None
        if missing:
            line = missing[0]
            raise ConfigError(_in_cell(f"{line}: {name} accepts {line.partition('=')[0]} but conf/algo has no such "
                                       f"key; add it with +{line}", overrides, len(cells)))
    return len(cells)


def check_backends_here(cells: Iterable[Sequence[str]]) -> None:
    """Cells that run in this process (no launcher override, not a dry run: the caller decides): a backend key set to
    vllm where vllm cannot run here is one ConfigError line (config_schema.check_backends), before Hydra starts.
    Cells sent to a cluster are checked where they run (run.py, on the composed config)."""
    for overrides in cells:
        for line in overrides:
            _, key, value = _parse(line)
            if key in BACKEND_KEYS and value == "vllm":
                group, _, leaf = key.partition(".")
                check_backends({group: {leaf: value}})


def _in_cell(message: str, overrides: Sequence[str], n_cells: int) -> str:
    from posttrain.cell import PATH_KEYS, enters_hash, override_key

    named = [o for o in overrides if enters_hash(override_key(o)) or override_key(o) in PATH_KEYS]
    return message if n_cells <= 1 else f"{message} (cell: {' '.join(named)})"


# ------------------------------------------------------------------ overrides equal to the default
def _same(a: Any, b: Any) -> bool:
    """Equal with equal types all the way down (1 and 1.0 differ: they hash differently)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b and not (isinstance(a, str) and "${" in a)


def default_value(conf_dir: str | Path, chosen: dict, key: str) -> Any:
    """The value ``key`` has in the config files of the chosen group options, or _MISSING (no such key, or an
    interpolation: its value needs composing)."""
    conf = str(conf_dir)
    root, _, rest = key.partition(".")
    if rest and root in chosen and root in groups(conf):
        node: Any = group_node(conf, root, str(chosen[root]))
        path = rest.split(".")
    else:
        node, path = _root(conf)[0], key.split(".")
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def is_default_override(conf_dir: str | Path, chosen: dict):
    """``is_default(override)`` for posttrain.cell.variant: True when the override sets its key to the value the
    chosen config files give it (``algo.beta=0.1`` for dpo), so it names no new variant."""
    def is_default(line: str) -> bool:
        try:
            prefix, key, value = _parse(line)
        except Exception:  # noqa: BLE001 - not a plain override: it names the variant as typed
            return False
        if prefix == "~" or value is _MISSING or "@" in line.partition("=")[0]:
            return False
        default = default_value(conf_dir, chosen, key)
        return default is not _MISSING and _same(value, default)
    return is_default
