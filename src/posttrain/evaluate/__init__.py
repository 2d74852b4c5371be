"""lm-eval wrapper and the embedded task YAMLs."""
