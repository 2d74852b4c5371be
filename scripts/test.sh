#!/usr/bin/env bash
# THE test command (the README's and CI's: one definition). Installs, then runs the whole suite; slurm tests run
# when a local Slurm is up (scripts/local_slurm.sh up), gpu tests when CUDA is there; both skip with a reason
# otherwise. Extra arguments go to pytest. Exit code 5 (no test collected) counts as failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev || exit 1
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
