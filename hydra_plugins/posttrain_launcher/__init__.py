"""Hydra plugin entry point for posttrain's non-blocking Slurm launcher (code: posttrain/sweep/launcher.py).

Hydra 1.3 instantiates launchers only from classes whose module is under the ``hydra_plugins`` namespace package,
so the class Hydra uses is defined here as a thin subclass; importing this module also registers the
``hydra/launcher/posttrain_slurm`` schema that conf/hydra/launcher/slurm_*.yaml extend.
"""

from posttrain.sweep.launcher import PosttrainSlurmConf, PosttrainSlurmLauncherImpl


class PosttrainSlurmLauncher(PosttrainSlurmLauncherImpl):
    """Submits every cell of a multirun to Slurm and returns at once (see posttrain.sweep.launcher)."""


__all__ = ["PosttrainSlurmConf", "PosttrainSlurmLauncher"]
