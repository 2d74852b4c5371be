"""Hydra plugin entry point for posttrain's sweep-file sweeper (code: posttrain/sweep/sweeper.py).

Hydra 1.3 instantiates sweepers only from classes whose module is under the ``hydra_plugins`` namespace package,
so the class Hydra uses is defined here as a thin subclass; importing this module also registers the
``hydra/sweeper/posttrain`` config that launch.py selects for ``sweep=<name>``.
"""

from posttrain.sweep.sweeper import PosttrainSweeperConf, PosttrainSweeperImpl


class PosttrainSweeper(PosttrainSweeperImpl):
    """Launches the explicit cell list of a sweep file through the configured launcher (posttrain.sweep.sweeper)."""


__all__ = ["PosttrainSweeperConf", "PosttrainSweeper"]
