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

Every cell of the launch is checked before Hydra composes anything (posttrain.sweep.checks): an unknown group
option, launcher or key, a value out of its range, a bad algorithm hyperparameter stop with one line, exit 2.

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


def _task_overrides(argv: list[str], sweep_file: Path | None) -> tuple[list[str], list[str]] | None:
    """(task overrides, hydra/launcher overrides) of a command line this module can read, or None (see above)."""
    task: list[str] = []
    launcher: list[str] = []
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
            if key == "hydra/launcher":
                launcher.append(arg)
            continue
        task.append(arg)
    return task, launcher


def launch_cells(argv: list[str], sweep_file: Path | None) -> list | None:
    """The launch's cells (posttrain.sweep.files.Cell), each checked before anything composes or loads
    (posttrain.sweep.checks: one line per mistake, UsageError); None when Hydra must read the command line."""
    from posttrain.config_schema import ConfigError
    from posttrain.sweep import checks, files

    parsed = _task_overrides(argv, sweep_file)
    if parsed is None:
        return None
    task, launcher = parsed
    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    dry = [a.partition("=")[2] for a in task if a.partition("=")[0] == "dry_run"]
    try:
        if sweep_file:
            cells = files.expand(sweep_file, task, CONF_DIR)
        elif multirun:
            cells = files.grid(task, CONF_DIR)
        else:
            axes = files.cli_axes(task)
            if any(len(values) != 1 for values in axes.values()):
                return None  # a sweep without -m: Hydra says so
            cells = [files.Cell(tuple(v[0] for v in axes.values()), None)]
    except files.SweepError as exc:
        if sweep_file or (dry and dry[-1] in TRUE):
            raise UsageError(str(exc)) from None
        return None  # e.g. an interval sweep: the basic sweeper's business
    try:
        for line in launcher:
            checks.check_cell([line], CONF_DIR)
        checks.check_cells([c.overrides for c in cells], CONF_DIR)
        if not launcher and not (dry and dry[-1] in TRUE):  # the cells run here: can their backend run here?
            checks.check_backends_here([c.overrides for c in cells])
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return cells


def fast_dry_run(argv: list[str], cells: list | None) -> list[str] | None:
    """The dry-run listing computed from the command line's cells alone, or None when Hydra must compose."""
    from posttrain.sweep import files

    if cells is None or not any(a in MULTIRUN_FLAGS for a in argv):
        return None
    dry = [a.partition("=")[2] for a in argv if a.partition("=")[0] == "dry_run"]
    if not dry or dry[-1] not in TRUE or any(c.path is None for c in cells):
        return None
    return files.listing(cells)


def check_output_root(argv: list[str]) -> None:
    """A launch that will write: its output root must be a directory this process can write (one line if not)."""
    import tempfile

    dry = [a.partition("=")[2] for a in argv if a.partition("=")[0] == "dry_run"]
    if dry and dry[-1] in TRUE:
        return
    given = [a.partition("=")[2] for a in argv if a.partition("=")[0] == "output_root"]
    root = given[-1].strip("'\"") if given else "outputs"
    if "${" in root:
        return  # an interpolation: Hydra resolves it
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise UsageError(f"output_root={root}: cannot write there ({exc.strerror or exc}); give a writable "
                         "directory with output_root=DIR") from None


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
        _cells = launch_cells(sys.argv[1:], _sweep_file)
        _listing = fast_dry_run(sys.argv[1:], _cells)
        if _listing is None and _cells is not None:
            check_output_root(sys.argv[1:])
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if _listing is not None:
        try:
            print("\n".join(_listing), flush=True)
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            sys.stderr.close()
        sys.exit(0)
    try:
        main()
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: run.py has recorded the cell (cancelled) in one line
        from posttrain.preemption import signal_of

        sys.exit(128 + signal_of(exc))
