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
# --dev: vLLM 0.33's own Python package for tests/test_vllm_backend.py (its SamplingParams and output types, checked
# against our config on the CPU), in a private directory the tests put on PYTHONPATH of a subprocess only: installed
# into this Python, TRL and lm-eval would import it everywhere and its pins (torch 2.14) would fight torch 2.13.0.
# No vLLM engine runs here (that needs CUDA); ~1 GB, ~45 s once.
if [ "${1:-}" = "--dev" ]; then
    site="${POSTTRAIN_VLLM_SITE:-$HOME/.cache/posttrain/vllm-site}"
    if [ ! -f "$site/.complete" ]; then
        rm -rf "$site.tmp"
        python -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$site.tmp" \
            vllm==0.33.0 msgspec cbor2 pyzmq openai openai-harmony pybase64 cachetools uvloop prometheus-client \
            "xgrammar==0.2.8" "apache-tvm-ffi==0.1.11" "fastapi>=0.133,<0.137" "starlette>=1.0.1" partial-json-parser \
            "llguidance>=1.7,<1.8"
        touch "$site.tmp/.complete"
        rm -rf "$site"
        mv "$site.tmp" "$site"
    fi
fi
