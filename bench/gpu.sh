#!/usr/bin/env bash
# The GPU measurements issue 14 asks for, in one go, on a CUDA machine with the project installed
# (bash scripts/setup.sh; trl for the TRL arms: setup.sh --dev). Appends to bench/results/*_cuda.jsonl and prints the
# tables. Random-init models of the published Qwen2.5 shapes (no hub needed), bf16, 8 pairs x 512 tokens.
#
#   bash bench/gpu.sh            # 0.5b and 1.5b DPO (shared prompt on and off), GRPO
#   STEPS=10 bash bench/gpu.sh   # fewer timed steps
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: no CUDA device here")'
steps="${STEPS:-20}"
gpu="$(python -c 'import torch; print(torch.cuda.get_device_name())')"
for scale in 0.5b 1.5b; do
  for shared in auto false; do
    python bench/throughput.py --device cuda --scale "$scale" --steps "$steps" --shared-prompt "$shared" \
      --impls posttrain,trl,trl_no_gc,posttrain_study --out bench/results/throughput_cuda.jsonl \
      --note "bench/gpu.sh on $gpu, shared_prompt=$shared"
  done
done
python bench/grpo_throughput.py --device cuda --scale 0.5b --out bench/results/grpo_cuda.jsonl \
  --note "bench/gpu.sh on $gpu"
