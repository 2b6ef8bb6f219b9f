#!/usr/bin/env bash
# The SmolLM2-135M-Instruct x BIG-bench experiment (docs/results.md). Resumable: rerun to continue.
#   experiments/smollm2_bigbench.sh [SEED ...]     (default seeds: 0 1)
# Per seed: runs/smollm2-bigbench-s<SEED>-r2 (base, joint, merit-r2, random-k4) and
#           runs/smollm2-bigbench-s<SEED>-r1 (merit-r1, random-k2; joint is shared with r2),
# then every checkpoint is also scored on 8 BIG-bench tasks that are in no training mixture
# (runs/<run>/transfer/<method>.json): the paper's claim is about benchmarks outside the mixture.
# Then experiments/summarize.py writes docs/results.md and its plots.
set -euo pipefail
cd "$(dirname "$0")/.."
merit=${MERIT:-.venv/bin/merit}
python=${PYTHON:-.venv/bin/python}
data=../shared/data/bigbench-mix
unseen=(qa_wikidata tense modified_arithmetic unnatural_in_context_learning__dates_unnatural_content
        date_understanding misconceptions ruin_names logical_fallacy_detection)
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1)

transfer() {  # transfer RUN_FOLDER METHOD CHECKPOINT: score one checkpoint on the unseen tasks, once
  local out="$1/transfer/$2.json"
  [ -f "$out" ] && return 0
  "$merit" eval "$3" --mixture "$data" --include "${unseen[@]}" --max-per-source 25 --max-length 320 \
    --batch-size 16 --max-new-tokens 16 --normalize lower --out "$out"
}

for seed in "${seeds[@]}"; do
  r2="runs/smollm2-bigbench-s$seed-r2"; r1="runs/smollm2-bigbench-s$seed-r1"
  "$merit" run configs/smollm2-bigbench.yaml --out "$r2" --set seed="$seed"
  "$merit" run configs/smollm2-bigbench.yaml --out "$r1" --set seed="$seed" \
    --set split.r=1 --set baselines.joint=false
  theta0=$("$python" -c "import json,sys; print(json.load(open(sys.argv[1]))['path'])" "$r2/theta0/manifest.json")
  transfer "$r2" base "$theta0"
  transfer "$r2" joint "$r2/joint"
  transfer "$r2" merit-r2 "$r2/merged/token-weighted"
  transfer "$r2" random-k4 "$r2/baselines/random-k4/merged/token-weighted"
  transfer "$r1" merit-r1 "$r1/merged/token-weighted"
  transfer "$r1" random-k2 "$r1/baselines/random-k2/merged/token-weighted"
done
"$python" experiments/summarize.py runs/smollm2-bigbench-s*-r* --out docs/results.md
"$python" experiments/task_vectors.py runs/smollm2-bigbench-s*-r* --out docs/results-task-vectors.md
