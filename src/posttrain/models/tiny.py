"""Former home of the embedded base builder, now :mod:`posttrain.embedded`; a thin re-export kept for tests/conftest.py
and bench/ (the base cache key does not depend on the module path)."""

from posttrain.embedded.base import BUILD_VERSION, build_key, ensure_tiny_base, greedy_accuracy  # noqa: F401
