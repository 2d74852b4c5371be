"""posttrain's entry point: Hydra with one piece of sugar.

    python launch.py                                                  # one embedded run (DPO, tiny-s, CPU)
    python launch.py -m algo=dpo,simpo,kto scale=0.5b,1.5b,7b seed=0-4  # a grid

``seed=0-4`` is an inclusive integer range: an override value matching ``^\\d+-\\d+$`` exactly becomes Hydra's
``range(0,5)`` before Hydra parses (``scale=tiny-s``, model ids and paths are untouched). Everything else is plain
Hydra.
"""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from posttrain.sweep import cells  # noqa: F401 - registers the ${posttrain_cell:} resolver

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
        sys.argv[1:] = rewrite_ranges(sys.argv[1:])
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()
