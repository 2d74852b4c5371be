"""The Family records are the loop's only dispatch (posttrain.algorithms.families), with the structure issue 12 asks
for: one record per registry family, no import cycle between the offline and online parts, pure losses, and no
comparison with an algorithm, loss or estimator name outside the registry."""

from __future__ import annotations

import ast
import re

from posttrain.algorithms import families, registry
from posttrain.algorithms.advantages import ESTIMATORS
from posttrain.algorithms.pairs import PAIR_BUILDERS
from posttrain.losses import PAIRWISE_LOSSES, POLICY_GRADIENT_LOSSES, TOKEN_PAIRWISE_LOSSES, UNPAIRED_LOSSES

from conftest import ROOT

SRC = ROOT / "src" / "posttrain"


def test_every_registry_family_has_one_record_and_every_entry_finds_its_own():
    assert set(families.FAMILIES) == set(registry.FAMILIES)
    for name, algo in registry.ALGORITHMS.items():
        family = families.of(algo)
        assert family.name == algo.family
        for field in ("prepare", "objective", "updates_per_batch", "step_hook"):
            assert callable(getattr(family, field)), (name, field)


def _project_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("posttrain"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("posttrain")}
    return out


def test_no_import_cycle_and_losses_import_nothing_of_the_project():
    assert not {m for m in _project_imports(SRC / "algorithms/objectives.py") if "online" in m}
    for path in (SRC / "losses").glob("*.py"):
        assert all(m.startswith("posttrain.losses") for m in _project_imports(path)), path.name


def test_no_comparison_with_an_algorithm_loss_or_estimator_name_outside_the_registry():
    names = (set(registry.ALGORITHMS) | set(PAIRWISE_LOSSES) | set(UNPAIRED_LOSSES) | set(POLICY_GRADIENT_LOSSES)
             | set(TOKEN_PAIRWISE_LOSSES) | set(ESTIMATORS) | set(PAIR_BUILDERS) | {"k1", "k2", "k3"})
    compared = re.compile(r"""(==|!=)\s*["']([a-z0-9_]+)["']|["']([a-z0-9_]+)["']\s*(==|!=)""")
    files = [*(SRC / "algorithms").glob("*.py"), *(SRC / "losses").glob("*.py"), SRC / "train.py"]
    found = []
    for path in files:
        if path.name == "registry.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in compared.finditer(line):
                if (m.group(2) or m.group(3)) in names:
                    found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found
