#!/usr/bin/env bash
# The SmolLM2-135M-Instruct x BIG-bench experiment (docs/results.md). Resumable: rerun to continue.
#   experiments/smollm2_bigbench.sh [SEED ...]     (default seeds: 0 1)
# Per seed: runs/smollm2-bigbench-s<SEED>-r2 (base, joint, merit-r2, random-k4) and
#           runs/smollm2-bigbench-s<SEED>-r1 (merit-r1, random-k2; joint is shared with r2).
# Then experiments/summarize.py writes docs/results.md and its plots.
set -euo pipefail
cd "$(dirname "$0")/.."
merit=${MERIT:-.venv/bin/merit}
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1)
for seed in "${seeds[@]}"; do
  "$merit" run configs/smollm2-bigbench.yaml --out "runs/smollm2-bigbench-s$seed-r2" --set seed="$seed"
  "$merit" run configs/smollm2-bigbench.yaml --out "runs/smollm2-bigbench-s$seed-r1" --set seed="$seed" \
    --set split.r=1 --set baselines.joint=false
done
"${PYTHON:-.venv/bin/python}" experiments/summarize.py runs/smollm2-bigbench-s*-r* --out docs/results.md
