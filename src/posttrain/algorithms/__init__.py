"""Algorithm registry and the per-family objectives the one training loop runs."""

from posttrain.algorithms.registry import ALGORITHMS, Algorithm, get  # noqa: F401
