"""The ``${posttrain_cell:}`` resolver: Hydra's ``hydra.sweep.subdir`` is the cell directory (docs/design.md,
"Contracts"). The identity itself (config hash, variant, cell directory, done) is posttrain.cell; its names are
re-exported here for callers that import them from the sweep package."""

from __future__ import annotations

from omegaconf import OmegaConf

from posttrain.cell import (MAX_VARIANT, NON_RESULT_KEYS, NON_RESULT_SUBKEYS, PATH_KEYS,  # noqa: F401
                            cell_of, cell_path, config_hash, variant)

__all__ = ["MAX_VARIANT", "NON_RESULT_KEYS", "NON_RESULT_SUBKEYS", "PATH_KEYS", "cell_of", "cell_path", "config_hash",
           "variant", "composed_is_default", "register_resolvers"]


def _cell_resolver(*, _root_) -> str:
    """``${posttrain_cell:}`` for ``hydra.sweep.subdir``: the cell directory of the job being launched.

    Hydra evaluates the subdir before it sets the job's HydraConfig, so this reads the job's own overrides from
    the config root (``hydra.overrides.task``) rather than from HydraConfig.
    """
    return cell_of(_root_, list(_root_.hydra.overrides.task), composed_is_default(_root_.hydra))[1]


def composed_is_default(hydra_node):
    """posttrain.cell.variant's ``is_default`` for a composed config, from its Hydra node (``hydra.runtime``: the
    main config directory and the group choices), as the fast path computes it from conf/ (sweep/checks.py)."""
    from posttrain.sweep.checks import is_default_override

    conf_dir = None
    for source in hydra_node.runtime.config_sources or []:
        if source.provider == "main" and source.schema == "file":
            conf_dir = source.path
    if conf_dir is None:
        return None
    chosen = {str(k): str(v) for k, v in (hydra_node.runtime.choices or {}).items() if v is not None}
    return is_default_override(conf_dir, chosen)


def register_resolvers() -> None:
    """Register ``posttrain_cell`` (idempotent); every process that resolves a sweep config must call it."""
    if not OmegaConf.has_resolver("posttrain_cell"):
        OmegaConf.register_new_resolver("posttrain_cell", _cell_resolver)


register_resolvers()
