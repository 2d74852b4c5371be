"""posttrain's entry point: Hydra with a little sugar.

    python launch.py                                                  # one embedded run (DPO, tiny-s, CPU)
    python launch.py -m algo=dpo,simpo,kto scale=0.5b,1.5b,7b seed=0-4  # a grid
    python launch.py -m sweep=paper [overrides]                       # a study from sweeps/paper.yaml
    python launch.py -m sweep=paper dry_run=true                      # list its cells, run nothing

``seed=0-4`` is an inclusive integer range: an override value matching ``^\\d+-\\d+$`` exactly becomes Hydra's
``range(0,5)`` before Hydra parses (``scale=tiny-s``, model ids and paths are untouched).

``sweep=<name>`` (a file in sweeps/, or a path to one) becomes ``hydra/sweeper=posttrain
hydra.sweeper.sweep=<file> sweep_name=<file's name>`` (and implies ``-m``): the posttrain sweeper
(posttrain/sweep/sweeper.py) launches the file's union of grids through any launcher, the other overrides applied
on top of every part (posttrain/sweep/files.py). An unknown name stops with one line listing sweeps/, exit 2.

``-m ... dry_run=true`` lists the cells without Hydra composing each one (posttrain.sweep.files computes every cell
directory from the override strings): one line per cell, ``<cell dir>  <overrides>``, then ``N cells``. Command
lines this cheap path cannot read exactly (Hydra flags other than -m, ``+algo=...``, interpolations in the path keys,
a sweeper or sweep subdir set by hand) go through Hydra as before. Everything else is plain Hydra.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from posttrain.sweep import cells  # noqa: F401 - registers the ${posttrain_cell:} resolver

ROOT = Path(__file__).resolve().parent
SWEEPS_DIR = ROOT / "sweeps"
CONF_DIR = ROOT / "conf"
RANGE = re.compile(r"^(\d+)-(\d+)$")
INT_LIST = re.compile(r"^-?\d+(,-?\d+)*$|^range\(.*\)$")


class UsageError(Exception):
    pass


def rewrite_ranges(argv: list[str]) -> list[str]:
    """Turn ``key=a-b`` into ``key=range(a,b+1)``; refuse reversed ranges and non-integer seeds, one line each."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or arg.startswith("-"):
            out.append(arg)
            continue
        match = RANGE.match(value)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise UsageError(f"'{arg}': reversed range; write {key}={hi}-{lo} (inclusive)")
            out.append(f"{key}=range({lo},{hi + 1})")
            continue
        if key.lstrip("+~") == "seed" and not INT_LIST.match(value):
            raise UsageError(f"'{arg}': seed must be an integer, a comma list (0,1,2) or an inclusive range (0-4)")
        out.append(arg)
    return out


MULTIRUN_FLAGS = ("-m", "--multirun")
TRUE = ("true", "True", "TRUE")  # what Hydra parses as the boolean true


def _quote(value: str) -> str:
    """A path as a Hydra override value (quoted when Hydra's grammar would split it)."""
    if re.fullmatch(r"[A-Za-z0-9_./:+@-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_sweep_arg(argv: list[str], sweeps_dir: Path = SWEEPS_DIR) -> tuple[list[str], Path | None]:
    """Replace ``sweep=<name>`` by the posttrain sweeper's settings; returns (argv, sweep file or None)."""
    from posttrain.sweep import files

    found = [a for a in argv if a.partition("=")[0] == "sweep" and "=" in a]
    if not found:
        return argv, None
    if len(found) > 1:
        raise UsageError(f"give one sweep=, not {len(found)} ({' '.join(found)})")
    if any(a.partition("=")[0] == "hydra/sweeper" for a in argv):
        raise UsageError("sweep= runs through the posttrain sweeper; drop hydra/sweeper=... from the command line")
    name = found[0].partition("=")[2]
    if not name or "," in name:
        raise UsageError(f"'{found[0]}': give one sweep name; the sweeps are: {', '.join(files.available(sweeps_dir))}")
    try:
        path = files.resolve(name, sweeps_dir)
        sweep = files.load(path, CONF_DIR)
    except files.SweepError as exc:
        raise UsageError(str(exc)) from None
    out = []
    for arg in argv:
        if arg is found[0]:
            out += ["hydra/sweeper=posttrain", f"hydra.sweeper.sweep={_quote(str(path))}"]
            if not any(a.partition("=")[0] == "sweep_name" for a in argv):
                out.append(f"sweep_name={sweep.name}")
        else:
            out.append(arg)
    if not any(a in MULTIRUN_FLAGS for a in out):
        out.insert(0, "-m")
    return out, path


def fast_dry_run(argv: list[str], sweep_file: Path | None) -> list[str] | None:
    """The dry-run listing computed from the command line alone, or None when Hydra must compose (see above)."""
    from posttrain.sweep import files

    if not any(a in MULTIRUN_FLAGS for a in argv):
        return None
    task: list[str] = []
    for arg in argv:
        if arg in MULTIRUN_FLAGS:
            continue
        if arg.startswith("-") or "=" not in arg:
            return None  # --cfg, -cn, --help, ...: Hydra's business
        key = arg.partition("=")[0]
        if key.startswith(("hydra.", "hydra/")):
            if key.startswith(("hydra.sweep.subdir", "hydra.sweeper.params", "hydra/sweeper")) and \
                    not (key == "hydra/sweeper" and sweep_file is not None):
                return None
            continue
        task.append(arg)
    dry = [a.partition("=")[2] for a in task if a.partition("=")[0] == "dry_run"]
    if not dry or dry[-1] not in TRUE:
        return None
    try:
        cells = files.expand(sweep_file, task, CONF_DIR) if sweep_file else files.grid(task, CONF_DIR)
    except files.SweepError as exc:
        raise UsageError(str(exc)) from None
    if any(c.path is None for c in cells):
        return None
    missing = files.missing_options(cells, CONF_DIR)
    if missing:
        what = ", ".join(f"{k} ({n} cells)" for k, n in missing.items())
        print(f"warning: no config for {what} in {CONF_DIR}; a real launch stops at them", file=sys.stderr)
    return files.listing(cells)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from posttrain.run import UserError, main as run_main

    try:
        outcome = run_main(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.RUN and outcome.get("status") == "failed":
        sys.exit(1)
    return outcome


if __name__ == "__main__":
    try:
        sys.argv[1:], _sweep_file = expand_sweep_arg(rewrite_ranges(sys.argv[1:]))
        _listing = fast_dry_run(sys.argv[1:], _sweep_file)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if _listing is not None:
        try:
            print("\n".join(_listing), flush=True)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            sys.stderr.close()
        sys.exit(0)
    main()
