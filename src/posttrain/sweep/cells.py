"""Cell identity: config hash, variant name and cell directory (docs/design.md, "Contracts").

A cell directory is ``<variant>/<scale>/lora-<on|off>/seed-<n>``. The variant is the algo name, plus ``@`` and the
overrides that enter the config hash (other than algo/scale/lora/seed), as typed, sorted by key, joined by ``,``;
characters outside ``[A-Za-z0-9._=,@+-]`` become ``_``; past 80 characters the tail becomes a short hash.
"""

from __future__ import annotations

import hashlib
import re

from omegaconf import DictConfig, OmegaConf

#: Top-level keys that cannot change a run's result: left out of the config hash and of the variant.
NON_RESULT_KEYS = ("logger", "dry_run", "sweep_name", "output_root", "keep_checkpoints", "hydra", "sweep", "mirror")
#: Keys inside groups that cannot change the result either.
NON_RESULT_SUBKEYS = ("trainer.checkpoint_every", "trainer.checkpoint_minutes", "trainer.log_every", "trainer.threads",
                      "eval.batch_size", "data.generation_batch_size", "data.min_pair_yield", "data.mirror")
#: Override keys that already name the cell's path (not repeated in the variant).
PATH_KEYS = ("algo", "scale", "lora", "seed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,@+-]")
MAX_VARIANT = 80


def config_hash(cfg: DictConfig) -> str:
    """sha256 (first 12 hex) of the resolved config minus what cannot change the result."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NON_RESULT_KEYS:
        container.pop(key, None)
    for dotted in NON_RESULT_SUBKEYS:
        group, _, leaf = dotted.partition(".")
        if isinstance(container.get(group), dict):
            container[group].pop(leaf, None)
    blob = repr(_sorted(container)).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key


def _enters_hash(key: str) -> bool:
    root = key.split(".", 1)[0].split("/", 1)[0]
    if key.startswith("hydra") or root in NON_RESULT_KEYS or key in NON_RESULT_SUBKEYS:
        return False
    return root not in PATH_KEYS or "." in key  # `algo.beta=0.2` enters, `algo=dpo` is the path


def variant(algo: str, overrides: list[str]) -> str:
    """``algo`` or ``algo@k1=v1,k2=v2`` from the overrides that enter the hash, sorted by key, made path-safe."""
    extra = sorted((o for o in overrides if _enters_hash(_override_key(o))), key=_override_key)
    name = algo if not extra else f"{algo}@{','.join(o.lstrip('+') for o in extra)}"
    name = _UNSAFE.sub("_", name)
    if name in (".", "..") or name.startswith("."):
        name = "_" + name
    if len(name) > MAX_VARIANT:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[:MAX_VARIANT - 9]}-{digest}"
    return name


def cell_path(variant_name: str, scale: str, lora: bool, seed: int) -> str:
    """The cell directory relative to the sweep directory."""
    scale = _UNSAFE.sub("_", str(scale)).lstrip(".") or "_"
    return f"{variant_name}/{scale}/lora-{'on' if lora else 'off'}/seed-{int(seed)}"


def _cell_resolver(*, _root_) -> str:
    """``${posttrain_cell:}`` for ``hydra.sweep.subdir``: the cell directory of the job being launched.

    Hydra evaluates the subdir before it sets the job's HydraConfig, so this reads the job's own overrides from
    the config root (``hydra.overrides.task``) rather than from HydraConfig.
    """
    overrides = list(_root_.hydra.overrides.task)
    name = variant(str(_root_.algo.name), overrides)
    return cell_path(name, _root_.scale.name, bool(_root_.lora.enabled), int(_root_.seed))


def register_resolvers() -> None:
    """Register ``posttrain_cell`` (idempotent); every process that resolves a sweep config must call it."""
    if not OmegaConf.has_resolver("posttrain_cell"):
        OmegaConf.register_new_resolver("posttrain_cell", _cell_resolver)


register_resolvers()
