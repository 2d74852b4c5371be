#!/usr/bin/env bash
# Install posttrain and everything it needs into the current Python (idempotent; seconds when done already).
# torch 2.13.0 goes first: on a CPU machine that is the small CPU build; an unpinned torch would pull CUDA (GBs).
# Usage: bash scripts/setup.sh [--dev]     (--dev adds the test dependencies, TRL included, and wandb-workspaces)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,wandb]"
python -m pip install -q --disable-pip-version-check --root-user-action=ignore "torch==2.13.0"
python -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".${extra}"
# lm-eval's minerva_math scores with antlr4 4.11 while Hydra pins 4.9.3: a private 4.11 runtime, used only while
# MATH is scored (posttrain/evaluate/math_runtime.py), fetched once into the cache
python -m posttrain.evaluate.math_runtime >/dev/null
