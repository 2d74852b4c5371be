"""The embedded base builder: tiny Qwen2-architecture bases pretrained from scratch, cached by build config."""

from posttrain.embedded.base import BUILD_VERSION, build_key, ensure_tiny_base, greedy_accuracy  # noqa: F401
