"""Sweep files (sweeps/*.yaml): a study as a union of Cartesian grids, expanded into an explicit list of cells.

A sweep file::

    name: paper_main            # optional (default: the file's stem); the sweep directory is outputs/<name>
    description: ...            # optional, free text
    include: [other, ...]       # optional: sweeps whose cells belong to this one (a name in the same directory,
                                #   or a path relative to this file)
    parts:                      # optional: each part is one Cartesian product
      - label: full fine-tuning up to 3B      # optional, free text
        grid:
          algo: [sft, dpo]      # a list: one axis of the product
          scale: 1.5b           # a scalar: a one-value axis
          lora: ["off"]         # quote on/off: bare they are YAML booleans
          seed: [42, 123]
          algo.beta: 0.2        # any override key Hydra accepts (no hydra.* keys: those are per launch)
    overrides:                  # optional: set in every cell of this file (its parts and its includes)
      trainer.max_steps: 4

Cells = the included sweeps' cells, then each part's product, in file order; a cell already seen (same cell
directory, i.e. same algo, scale, lora, seed and variant overrides: docs/design.md "distinct configs never share a
directory") is kept once. Precedence, outermost wins: command line > including file's ``overrides`` > included
file's ``overrides`` > part grid. A key set at an outer level *replaces* the axis of that key wherever it appears
(``sweep=paper seed=0-1`` runs seeds 0 and 1 in every part); a key no part sets is added to every cell (a command-
line sweep ``trainer.lr=1e-6,1e-5`` multiplies every part). Values are rendered as Hydra override strings exactly
as Hydra's basic sweeper renders command-line values (``true`` -> ``True``), so a cell reads the same whether a
key came from the file or from the command line.

This module is also the cheap path of ``dry_run=true`` (launch.py): it computes every cell's directory from its
override strings alone (posttrain.cell.variant/cell_path; the defaults algo/scale/lora/seed come from
conf/config.yaml and the group files' ``name``/``enabled``) without composing a config, so listing ~220 cells takes
well under a second. Overrides it cannot interpret without Hydra (``+algo=...``, ``algo@pkg=...``, interpolations)
raise :class:`NotFast`; callers fall back to Hydra's composition. It imports neither torch nor transformers.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from posttrain.cell import cell_path, variant
from posttrain.sweep import checks

FILE_KEYS = ("name", "description", "include", "parts", "overrides")
PART_KEYS = ("label", "grid")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PLAIN = re.compile(r"^[A-Za-z0-9_./:+@*-]+$")
#: The keys that name a cell's directory, with the group file field each one reads.
PATH_GROUPS = {"algo": "name", "scale": "name", "lora": "enabled"}


class SweepError(ValueError):
    """A sweep name or file that cannot be used; the message is one line, fit to print as is."""


class NotFast(Exception):
    """An override the cheap path cannot interpret without Hydra's composition (the caller composes instead)."""


# ------------------------------------------------------------------ finding and reading sweep files
def available(sweeps_dir: str | Path) -> list[str]:
    """Names of the sweep files in ``sweeps_dir`` (their stems), sorted."""
    return sorted(p.stem for p in Path(sweeps_dir).glob("*.yaml"))


def resolve(name: str, sweeps_dir: str | Path) -> Path:
    """The file of sweep ``name``: ``sweeps_dir/<name>.yaml``, or a path to a .yaml file. Raises SweepError."""
    sweeps_dir = Path(sweeps_dir)
    candidate = Path(name)
    if name.endswith((".yaml", ".yml")) or "/" in name:
        if candidate.is_file():
            return candidate.resolve()
    elif _NAME.match(name) and (sweeps_dir / f"{name}.yaml").is_file():
        return (sweeps_dir / f"{name}.yaml").resolve()
    names = available(sweeps_dir)
    raise SweepError(f"unknown sweep {name!r}; the sweeps in {sweeps_dir} are: {', '.join(names) or '(none)'}")


@dataclass
class SweepFile:
    path: Path
    name: str
    description: str = ""
    include: list[Path] = field(default_factory=list)
    parts: list[tuple[str, "OrderedDict[str, list[str]]"]] = field(default_factory=list)  # (label, key -> overrides)
    overrides: "OrderedDict[str, list[str]]" = field(default_factory=OrderedDict)


def load(path: str | Path, conf_dir: str | Path | None = None) -> SweepFile:
    """Read and check one sweep file (not its includes). Raises SweepError with a one-line message."""
    path = Path(path)
    where = _short(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(f"{where}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SweepError(f"{where}: not valid YAML{at}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: a sweep file is a mapping with keys {', '.join(FILE_KEYS)}")
    unknown = [k for k in raw if k not in FILE_KEYS]
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; a sweep file has "
                         f"{', '.join(FILE_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise SweepError(f"{where}: name must be a plain word (letters, digits, . _ -), got {name!r}")
    include = raw.get("include") or []
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise SweepError(f"{where}: include is a list of sweep names or paths")
    include_paths = []
    for item in include:
        target = path.parent / (item if item.endswith((".yaml", ".yml")) or "/" in item else f"{item}.yaml")
        if not target.is_file():
            raise SweepError(f"{where}: include {item!r}: no such sweep (known: "
                             f"{', '.join(available(path.parent))})")
        include_paths.append(target.resolve())
    parts_raw = raw.get("parts") or []
    if not isinstance(parts_raw, list):
        raise SweepError(f"{where}: parts is a list of {{label, grid}} mappings")
    parts = []
    for i, part in enumerate(parts_raw):
        if not isinstance(part, dict) or "grid" not in part or not isinstance(part["grid"], dict):
            raise SweepError(f"{where}: part {i + 1} needs a grid: mapping of key -> value or list of values")
        bad = [k for k in part if k not in PART_KEYS]
        if bad:
            raise SweepError(f"{where}: part {i + 1}: unknown key(s) {', '.join(map(str, bad))}; a part has "
                             f"{', '.join(PART_KEYS)}")
        parts.append((str(part.get("label") or f"part {i + 1}"),
                      _axes(part["grid"], f"{where}: part {i + 1}", conf_dir)))
    overrides = _axes(raw.get("overrides") or {}, f"{where}: overrides", conf_dir)
    if not include_paths and not parts:
        raise SweepError(f"{where}: no cells: give parts or include")
    return SweepFile(path=path.resolve(), name=name, description=str(raw.get("description") or ""),
                     include=include_paths, parts=parts, overrides=overrides)


def _short(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _axes(mapping: Any, where: str, conf_dir: str | Path | None) -> "OrderedDict[str, list[str]]":
    """key -> list of normalised override strings, in the mapping's order."""
    if not isinstance(mapping, dict):
        raise SweepError(f"{where}: expected a mapping of key -> value or list of values")
    axes: OrderedDict[str, list[str]] = OrderedDict()
    for key, values in mapping.items():
        if not isinstance(key, str) or not key:
            raise SweepError(f"{where}: key {key!r} is not a string")
        bare = key.lstrip("+~")
        if bare == "hydra" or bare.startswith(("hydra.", "hydra/")):
            raise SweepError(f"{where}: {key}: hydra settings apply to a whole launch; give them on the command "
                             f"line, not in a sweep file")
        if bare in ("sweep", "sweep_name"):
            raise SweepError(f"{where}: {key} is set by the sweep itself (use the file's name:)")
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise SweepError(f"{where}: {key}: an empty list gives no cells")
        rendered = []
        for value in values:
            if isinstance(value, bool) and conf_dir is not None and (Path(conf_dir) / bare).is_dir():
                word = "on" if value else "off"
                raise SweepError(f"{where}: {key}: {word} is read as a YAML boolean; quote the option: \"{word}\"")
            rendered.append(_normalise(f"{key}={_render(value, where, key)}", where))
        axes[_axis_key(rendered[0])] = rendered
    return axes


def _render(value: Any, where: str, key: str) -> str:
    """A YAML value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.match(value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_render(v, where, key) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_render(v, where, key)}" for k, v in value.items()) + "}"
    raise SweepError(f"{where}: {key}: cannot use a value of type {type(value).__name__}")


@lru_cache(maxsize=None)
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


@lru_cache(maxsize=4096)
def _normalise(line: str, where: str = "") -> str:
    """``key=value`` re-rendered as Hydra's basic sweeper renders a single (non-sweep) command-line override."""
    from hydra.errors import HydraException

    try:
        (override,) = _parser().parse_overrides([line])
    except HydraException as exc:
        raise SweepError(f"{where}: {line!r} is not a valid override ({str(exc).splitlines()[0]})") from None
    if override.is_sweep_override():
        raise SweepError(f"{where}: {line!r} is a sweep; list the values as a YAML list instead")
    return f"{override.get_key_element()}={override.get_value_element_as_str()}"


def _axis_key(line: str) -> str:
    """The key an override sets, without its +/++/~ prefix (``+algo.x=1`` and ``algo.x=2`` set the same key)."""
    return line.split("=", 1)[0].lstrip("+~")


def cli_axes(arguments: Sequence[str]) -> "OrderedDict[str, list[str]]":
    """Command-line task overrides as axes, exactly as Hydra's basic sweeper splits them (sweeps enumerated)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException

    axes: OrderedDict[str, list[str]] = OrderedDict()
    try:
        parsed = _parser().parse_overrides(list(arguments))
    except HydraException as exc:
        raise SweepError(str(exc).splitlines()[0]) from None
    for override in parsed:
        if override.is_sweep_override() and not override.is_discrete_sweep():
            raise SweepError(f"{override.input_line}: only discrete sweeps (a,b or range()) can be launched here")
        values = BasicSweeper.split_arguments([override], None)[0]
        axes[_axis_key(values[0][0])] = [v[0] for v in values]
    return axes


# ------------------------------------------------------------------ expansion
@dataclass(frozen=True)
class Cell:
    overrides: tuple[str, ...]
    path: str | None  # the cell directory relative to the sweep directory (None: needs Hydra's composition)


def expand(path: str | Path, arguments: Sequence[str] = (), conf_dir: str | Path | None = None) -> list[Cell]:
    """The cells of the sweep file at ``path`` with command-line task overrides ``arguments`` on top."""
    conf_dir = Path(conf_dir) if conf_dir is not None else default_conf_dir()
    seen: dict[Any, Cell] = {}
    for overrides in _expand(Path(path).resolve(), cli_axes(arguments), conf_dir, ()):
        try:
            where: Any = cell_dir(overrides, conf_dir)
        except NotFast:
            where = None
        key = where if where is not None else tuple(sorted(overrides))
        if key not in seen:
            seen[key] = Cell(tuple(overrides), where)
    return list(seen.values())


def _expand(path: Path, outer: "OrderedDict[str, list[str]]", conf_dir: Path, stack: tuple) -> Iterable[list[str]]:
    if path in stack:
        chain = " -> ".join(p.stem for p in (*stack, path))
        raise SweepError(f"{_short(path)}: include cycle ({chain})")
    sweep = load(path, conf_dir)
    effective = OrderedDict(sweep.overrides)
    for key, values in outer.items():
        effective[key] = values
    for included in sweep.include:
        yield from _expand(included, effective, conf_dir, (*stack, path))
    for _label, grid in sweep.parts:
        axes = OrderedDict(grid)
        for key, values in effective.items():
            axes[key] = values
        for combo in itertools.product(*axes.values()):
            yield list(combo)


def grid(arguments: Sequence[str], conf_dir: str | Path | None = None) -> list[Cell]:
    """The cells of a plain command-line multirun, in Hydra's basic sweeper's order."""
    conf_dir = Path(conf_dir) if conf_dir is not None else default_conf_dir()
    cells = []
    for combo in itertools.product(*cli_axes(arguments).values()):
        try:
            where = cell_dir(list(combo), conf_dir)
        except NotFast:
            where = None
        cells.append(Cell(tuple(combo), where))
    return cells


# ------------------------------------------------------------------ cell directories without composition
def default_conf_dir() -> Path:
    """conf/ of the source tree this module belongs to (the editable install's; launch.py passes its own)."""
    return Path(__file__).resolve().parents[3] / "conf"


@lru_cache(maxsize=16)
def _defaults(conf_dir: str) -> dict:
    """algo/scale/lora choices and seed from conf/config.yaml."""
    raw = yaml.safe_load((Path(conf_dir) / "config.yaml").read_text()) or {}
    out = {"seed": raw.get("seed", 0)}
    for entry in raw.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key in PATH_GROUPS:
                    if not isinstance(value, str):
                        raise NotFast(f"conf/config.yaml: defaults entry {key}: {value!r} is not an option name")
                    out[key] = value
    missing = [k for k in PATH_GROUPS if k not in out]
    if missing:
        raise NotFast(f"conf/config.yaml has no default for {', '.join(missing)}")
    return out


@lru_cache(maxsize=1024)
def _group_field(conf_dir: str, group: str, option: str) -> tuple[Any, bool]:
    """(value of the group file's name/enabled field, whether the file exists)."""
    path = Path(conf_dir) / group / f"{option}.yaml"
    if not path.is_file():
        return (option if PATH_GROUPS[group] == "name" else None), False
    raw = yaml.safe_load(path.read_text()) or {}
    if "defaults" in raw:  # an alias of one other option of the group (lora/scale_7b.yaml: defaults: ["on"])
        entries = raw["defaults"]
        if set(raw) != {"defaults"} or not isinstance(entries, list) or len(entries) != 1 \
                or not isinstance(entries[0], str):
            raise NotFast(f"{group}/{option}.yaml has a defaults list")
        return _group_field(conf_dir, group, entries[0])
    value = raw.get(PATH_GROUPS[group])
    if PATH_GROUPS[group] == "name":
        if value is None:
            raise NotFast(f"{group}/{option}.yaml has no name")
        return str(value), True
    if not isinstance(value, bool):
        raise NotFast(f"{group}/{option}.yaml: enabled is not a boolean")
    return value, True


def _scalar(value: str) -> str:
    if "${" in value or value.startswith(("'", '"')):
        raise NotFast(f"value {value!r} needs Hydra to interpret")
    return value


def _bool(value: str) -> bool:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    raise NotFast(f"{value!r} is not a boolean")


def cell_dir(overrides: Sequence[str], conf_dir: str | Path | None = None) -> str:
    """The cell directory (relative to the sweep directory) a launch with these job overrides uses, computed
    from the strings alone, as ``hydra.sweep.subdir`` (``${posttrain_cell:}``) computes it from the composed
    config. Raises NotFast for overrides that need composition."""
    conf = str(Path(conf_dir) if conf_dir is not None else default_conf_dir())
    d = _defaults(conf)
    choice = {g: d[g] for g in PATH_GROUPS}
    seed_value: Any = d["seed"]
    fields: dict[str, str] = {}
    for line in overrides:
        key, eq, value = line.partition("=")
        if not eq:
            raise NotFast(f"{line!r}: not key=value")
        bare = key.lstrip("+~")
        root = bare.split(".", 1)[0].split("@", 1)[0].split("/", 1)[0]
        if root not in PATH_GROUPS and root != "seed":
            continue
        if key != bare or "@" in bare or "/" in bare:
            raise NotFast(f"{line!r}: prefixed or packaged override of a path key")
        if bare == "seed":
            seed_value = _scalar(value)
        elif bare in PATH_GROUPS:
            choice[bare] = _scalar(value)
        elif bare == f"{root}.{PATH_GROUPS[root]}":
            fields[root] = _scalar(value)
    algo = fields.get("algo") or _group_field(conf, "algo", choice["algo"])[0]
    scale = fields.get("scale") or _group_field(conf, "scale", choice["scale"])[0]
    choice["lora"] = _per_scale(choice["lora"], choice["scale"])
    if "lora" in fields:
        lora = _bool(fields["lora"])
    else:
        lora, exists = _group_field(conf, "lora", choice["lora"])
        if not exists:
            raise NotFast(f"lora={choice['lora']}: no such option")
    try:
        seed = int(str(seed_value))
    except ValueError:
        raise NotFast(f"seed={seed_value!r} is not an integer") from None
    is_default = checks.is_default_override(conf, checks.choices(conf, overrides))
    return cell_path(variant(str(algo), list(overrides), is_default), str(scale), bool(lora), seed)


def _per_scale(option: str, scale_choice: str) -> str:
    """A default that the scale picks (``lora: scale_${scale}`` in conf/config.yaml) for the scale chosen."""
    return option.replace("${scale}", scale_choice)


def listing(cells: Sequence[Cell]) -> list[str]:
    """The dry-run lines: ``<cell dir>  <overrides>`` per cell (as run.py prints them), then ``N cells``."""
    lines = [f"{c.path}  {' '.join(c.overrides)}" for c in cells]
    lines.append(f"{len(cells)} cells")
    return lines
