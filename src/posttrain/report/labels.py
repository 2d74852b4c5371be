"""Short variant labels: a variant's name without the overrides that every variant shares.

A variant is ``<algo>@<key>=<value>,...`` (docs/design.md, "Cell directory"). When every variant of a report
carries the same overrides (``eval.limit=50,trainer.max_steps=10`` in a quick grid), they say nothing about
the difference between variants: labels drop them and the report names them once, in its header.
"""

from __future__ import annotations

import re
from typing import Iterable

_SPLIT = re.compile(r",(?![^\[]*\])")  # commas between overrides, not inside a [list]


def overrides(variant: str) -> tuple[str, list[str]]:
    """(algo, [key=value, ...]) of a variant name."""
    algo, _, rest = str(variant).partition("@")
    return algo, [o for o in _SPLIT.split(rest) if o] if rest else []


def short_labels(variants: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """({variant: label}, shared overrides). Labels are unique because the same overrides leave every name."""
    variants = sorted(set(map(str, variants)))
    parsed = {v: overrides(v) for v in variants}
    shared = set.intersection(*(set(o) for _, o in parsed.values())) if variants else set()
    if not shared:
        return {v: v for v in variants}, []
    labels = {}
    for v, (algo, items) in parsed.items():
        rest = [o for o in items if o not in shared]
        labels[v] = f"{algo}@{','.join(rest)}" if rest else algo
    if len(set(labels.values())) < len(labels):  # cannot happen for well-formed names; keep full names if it does
        return {v: v for v in variants}, []
    first = parsed[variants[0]][1]
    return labels, [o for o in first if o in shared]
