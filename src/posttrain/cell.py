"""A cell's identity, in one place: config hash, variant name, cell directory, "done", the ranks rule.

docs/design.md, "Contracts". A cell directory is ``<variant>/<scale>/lora-<on|off>/seed-<n>``. The variant is the
algo name, plus ``@`` and the overrides that enter the config hash (other than algo/scale/lora/seed), as typed,
sorted by key, joined by ``,``; characters outside ``[A-Za-z0-9._=,@+-]`` become ``_``; past 80 characters the tail
becomes a short hash. A cell is *done* when its result.json says completed with the config hash the cell has now.

Every caller uses these definitions: run.py (skip or rerun a cell), the sweeper (skip before launching), the Slurm
launcher (skip before submitting), sweep/files.py (the dry run's directories without composition) and the
``${posttrain_cell:}`` resolver (Hydra's ``hydra.sweep.subdir``, sweep/cells.py). Torch-free and cheap to import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf

#: Top-level keys that cannot change a run's result: left out of the config hash and of the variant.
NON_RESULT_KEYS = ("logger", "dry_run", "sweep_name", "output_root", "keep_checkpoints", "hydra", "sweep", "mirror",
                   "prepare")
#: Keys inside groups that cannot change the result either.
NON_RESULT_SUBKEYS = ("trainer.checkpoint_every", "trainer.checkpoint_minutes", "trainer.log_every", "trainer.threads",
                      "trainer.reference_cache", "trainer.group_by_length",
                      "trainer.gradient_checkpointing", "trainer.liger",  # same values, other speed/memory
                      "trainer.shared_prompt",
                      "eval.batch_size", "data.generation_batch_size", "data.min_pair_yield", "data.mirror")
#: Override keys that already name the cell's path (not repeated in the variant).
#: Keys added after sweeps were run, at a default that reproduces what those sweeps did: left out of the config
#: hash while they hold that value, so completed cells stay completed; any other value enters the hash.
NEUTRAL_DEFAULTS: dict = {"data.generation_backend": "hf", "eval.backend": "hf"}
PATH_KEYS = ("algo", "scale", "lora", "seed")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,@+-]")
MAX_VARIANT = 80
RESULT_FILE = "result.json"  # posttrain.results.RESULT_FILE (not imported: results.py is the writer's module)
COMPLETED = "completed"


# ------------------------------------------------------------------ the config hash
def config_hash(cfg: DictConfig) -> str:
    """sha256 (first 12 hex) of the resolved config minus what cannot change the result."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NON_RESULT_KEYS:
        container.pop(key, None)
    for dotted in NON_RESULT_SUBKEYS:
        group, _, leaf = dotted.partition(".")
        if isinstance(container.get(group), dict):
            container[group].pop(leaf, None)
    for dotted, default in NEUTRAL_DEFAULTS.items():
        group, _, leaf = dotted.partition(".")
        node = container.get(group)
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            node.pop(leaf)
    blob = repr(_sorted(container)).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _sorted(value):
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


# ------------------------------------------------------------------ the variant and the cell directory
def override_key(override: str) -> str:
    """The key an override sets, without its +/++/~ prefix."""
    return override.split("=", 1)[0].lstrip("+~")


def enters_hash(key: str) -> bool:
    """Whether an override of ``key`` can change the config hash (so it names the variant)."""
    root = key.split(".", 1)[0].split("/", 1)[0]
    if key.startswith("hydra") or root in NON_RESULT_KEYS or key in NON_RESULT_SUBKEYS:
        return False
    return root not in PATH_KEYS or "." in key  # `algo.beta=0.2` enters, `algo=dpo` is the path


def variant(algo: str, overrides: Sequence[str], is_default: Optional[Callable[[str], bool]] = None) -> str:
    """``algo`` or ``algo@k1=v1,k2=v2`` from the overrides that enter the hash, sorted by key, made path-safe.

    ``is_default(override)``: True for an override that sets its key to the value the config has without it
    (``algo.beta=0.1`` for dpo); such an override changes neither the config hash nor the variant."""
    extra = sorted((o for o in overrides if enters_hash(override_key(o)) and not (is_default and is_default(o))),
                   key=override_key)
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


def cell_of(cfg: DictConfig, overrides: Sequence[str],
            is_default: Optional[Callable[[str], bool]] = None) -> tuple[str, str]:
    """(variant, cell directory) of a composed config and the job overrides it was composed from."""
    name = variant(str(cfg.algo.name), overrides, is_default)
    return name, cell_path(name, str(cfg.scale.name), bool(cfg.lora.enabled), int(cfg.seed))


# ------------------------------------------------------------------ done
def completed_hash(cell_dir: Union[str, os.PathLike]) -> Optional[str]:
    """The config hash of the cell's result.json when it says completed, else None (missing, unreadable, failed,
    cancelled)."""
    try:
        with open(Path(cell_dir) / RESULT_FILE) as handle:
            result = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("status") != COMPLETED:
        return None
    return str(result.get("config_hash") or "")


def is_done(cell_dir: Union[str, os.PathLike], chash: Union[str, Callable[[], str]]) -> bool:
    """True when the cell's result.json is completed with config hash ``chash`` (a callable is called only when
    there is a completed result to compare with: composing a config costs 40-200 ms)."""
    recorded = completed_hash(cell_dir)
    if not recorded:
        return False
    return recorded == (chash() if callable(chash) else chash)


# ------------------------------------------------------------------ several ranks need DeepSpeed
def deepspeed_on(deepspeed_cfg: Any) -> bool:
    """Whether a ``deepspeed`` config node turns DeepSpeed on (torch-free)."""
    if deepspeed_cfg is None:
        return False
    if isinstance(deepspeed_cfg, DictConfig):
        return bool(OmegaConf.select(deepspeed_cfg, "enabled", default=False))
    return bool(dict(deepspeed_cfg).get("enabled", False))


def ranks_refusal(ranks: int, deepspeed_cfg: Any, what: str, fix: str = "run one process") -> Optional[str]:
    """The one-line refusal when ``ranks`` > 1 processes would each train their own copy (no DeepSpeed), else None.
    ``what`` names the ranks ("2 processes (torchrun)"), ``fix`` the other way out."""
    if int(ranks) <= 1 or deepspeed_on(deepspeed_cfg):
        return None
    return (f"{what} but deepspeed is off, so each would train its own copy; add deepspeed=zero3 (or zero2), "
            f"or {fix}")
