#!/usr/bin/env bash
# The SmolLM2-135M-Instruct x BIG-bench experiment (docs/results-pilot.md). Resumable: rerun to continue.
#   experiments/smollm2_bigbench.sh [SEED ...]     (default seeds: 0 1)
# Per seed: runs/smollm2-bigbench-s<SEED>-r2 (base, joint, merit-r2, random-k4) and
#           runs/smollm2-bigbench-s<SEED>-r1 (merit-r1, random-k2; joint is shared with r2),
# every checkpoint is also scored on 8 BIG-bench tasks that are in no training mixture (eval.transfer in
# the config; the transfer block of results.json): the paper's claim is about benchmarks outside the mixture.
# Then experiments/summarize.py writes docs/results-pilot.md and its plots.
set -euo pipefail
cd "$(dirname "$0")/.."
merit=${MERIT:-.venv/bin/merit}
python=${PYTHON:-.venv/bin/python}
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1)

for seed in "${seeds[@]}"; do
  r2="runs/smollm2-bigbench-s$seed-r2"; r1="runs/smollm2-bigbench-s$seed-r1"
  "$merit" run configs/smollm2-bigbench.yaml --out "$r2" --set seed="$seed"
  "$merit" run configs/smollm2-bigbench.yaml --out "$r1" --set seed="$seed" \
    --set split.r=1 --set baselines.joint=false
done
"$python" experiments/summarize.py runs/smollm2-bigbench-s*-r* --out docs/results-pilot.md
"$python" experiments/task_vectors.py runs/smollm2-bigbench-s*-r* --out docs/results-task-vectors.md
