#!/usr/bin/env bash
# Verifiable parallel-decoding tasks, end to end, on CPU:
#   task data -> train a small base -> exact rollouts -> distill the joint sampler -> eval tasks.
# Full run: scripts/task_pipeline.sh (about an hour on 2 CPU cores: the shipped models' parts below)
# Smoke run (about 1 min, throwaway dirs):     SMOKE=1 scripts/task_pipeline.sh
# The base trains on prompt/completion pairs with `--packing documents` (each sequence one
# example from position 0, EOS padding after it, only the completion masked and scored) and a
# separate LM head. At lr 2e-3 it never learned to copy from the prompt; at 1e-3 it does. On the
# current four tasks, 20,000 steps give exact (K = 1) validity list 0.960, shuffle 0.975, pick
# 0.995, reverse 1.000 (models/task-base/README.md). If exact validity is low, the base is
# undertrained: raise BASE_STEPS (train-base resumes; only --steps and --eval-every may change).
# The sampler has two blocks (SAMPLER_LAYERS=2): one block kept list, shuffle and reverse but did not
# learn pick's copy; two learn it (models/task-base/sampler/README.md).
# Measured for the shipped models: train-base 2,095 s on 2 threads (about 0.09 s/step), rollouts
# 43 s, distill 1,241 s on 2 threads (two blocks; one block took 926 s on 1 thread), eval about 1 min.
# Every knob is an environment variable (see below). Each step resumes: train-base, rollouts and
# distill continue from their checkpoints when rerun with the same directories.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${SMOKE:-0}" == 1 ]]; then  # tiny everything, in runs/task-smoke (ignored by git)
  : "${WORK:=runs/task-smoke}" "${N_TRAIN:=3000}" "${BASE_STEPS:=30}" "${BASE_BATCH:=16}" "${LAYERS:=1}"
  : "${HIDDEN:=64}" "${INTER:=160}" "${ROLLOUTS:=48}" "${N_ROLLOUT_PROMPTS:=8}" "${DISTILL_STEPS:=10}"
  : "${DISTILL_BATCH:=8}" "${N_EVAL:=8}" "${EVAL_EVERY:=10}" "${BASE_DIR:=$WORK/task-base}" "${RESULTS_DIR:=$WORK}"
fi
WORK=${WORK:-runs/tasks}                    # data, rollouts and logs
BASE_DIR=${BASE_DIR:-models/task-base}
SAMPLER_DIR=${SAMPLER_DIR:-$BASE_DIR/sampler}  # found by default beside the base
RESULTS_DIR=${RESULTS_DIR:-results}           # tasks.json, tasks.md, tasks.png
RESULTS=$RESULTS_DIR/tasks.json
DEVICE=${DEVICE:-cpu}                        # rollouts, distill, eval (train-base runs on CPU)
SEED=${SEED:-0}
GEN_LENGTH=${GEN_LENGTH:-10}                 # answer (up to 7 tokens) + EOS; rollouts and eval must agree
# data
N_TRAIN=${N_TRAIN:-200000}                   # training examples (one document each, tasks in equal shares)
N_ROLLOUT_PROMPTS=${N_ROLLOUT_PROMPTS:-1200} # train-split prompts per task for rollouts
N_EVAL=${N_EVAL:-200}                        # held-out prompts per task
# base model
LAYERS=${LAYERS:-4}; HIDDEN=${HIDDEN:-128}; HEADS=${HEADS:-4}; INTER=${INTER:-344}
SEQ_LEN=${SEQ_LEN:-28}; VOCAB=${VOCAB:-512}  # longest prompt (12 tokens) + GEN_LENGTH must fit SEQ_LEN
BASE_STEPS=${BASE_STEPS:-20000}; BASE_BATCH=${BASE_BATCH:-64}; BASE_LR=${BASE_LR:-1e-3}
EVAL_EVERY=${EVAL_EVERY:-500}
# joint sampler
ROLLOUTS=${ROLLOUTS:-7200}                   # exact trajectories (cycled over the rollout prompts)
DISTILL_STEPS=${DISTILL_STEPS:-12000}; DISTILL_BATCH=${DISTILL_BATCH:-32}; DISTILL_LR=${DISTILL_LR:-1e-3}
MIN_LR_RATIO=${MIN_LR_RATIO:-0.05}           # cosine decay of the distill lr to this share
ENTROPY_WINDOWS=${ENTROPY_WINDOWS:-0.8}       # share of windows drawn by the entropy of the tokens they write
MAX_UNROLLS=${MAX_UNROLLS:-3}                # serves adjust up to K = MAX_UNROLLS + 1
SAMPLER_LAYERS=${SAMPLER_LAYERS:-2}          # blocks in the sampler (1 is the method's; see its card)
# evaluation
STRATEGIES=${STRATEGIES:-exact,parallel:2,parallel:4,adjust:2,adjust:4,threshold:tau=0.9,entropy-bound:gamma=0.5,adjust-threshold:tau=0.9,threshold-adjust:tau=0.9;K=2,threshold-adjust:tau=0.9;K=4}
TEMPERATURE=${TEMPERATURE:-1.0}; ORDER=${ORDER:-entropy}

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
adjust() { "$PY" -m adjust.cli "$@"; }
QUIET=$([[ -t 2 ]] && echo "" || echo --quiet)
mkdir -p "$WORK" "$RESULTS_DIR"
T0=$(date +%s)
step() { echo "[task_pipeline $(( $(date +%s) - T0 ))s] $*" >&2; }

step "data -> $WORK"
"$PY" -m adjust.eval.tasks data --out "$WORK/train.jsonl" --n "$N_TRAIN" --seed "$SEED"
"$PY" -m adjust.eval.tasks prompts --out "$WORK/rollout_prompts.jsonl" --n "$N_ROLLOUT_PROMPTS" --split train \
  --seed $((SEED + 2))
"$PY" -m adjust.eval.tasks prompts --out "$WORK/eval_prompts.jsonl" --n "$N_EVAL" --split eval --seed $((SEED + 1))

step "train-base -> $BASE_DIR"
adjust train-base --data "$WORK/train.jsonl" --out "$BASE_DIR" --layers "$LAYERS" --hidden-size "$HIDDEN" \
  --heads "$HEADS" --intermediate-size "$INTER" --seq-len "$SEQ_LEN" --vocab-size "$VOCAB" --steps "$BASE_STEPS" \
  --packing documents --untie-embeddings \
  --batch-size "$BASE_BATCH" --lr "$BASE_LR" --eval-every "$EVAL_EVERY" --seed "$SEED" $QUIET \
  | tee "$WORK/train_base.json"

step "rollouts -> $WORK/rollouts"
adjust rollouts --base "$BASE_DIR" --device "$DEVICE" --prompts "$WORK/rollout_prompts.jsonl" \
  --out "$WORK/rollouts" --num-samples "$ROLLOUTS" --gen-length "$GEN_LENGTH" --temperature "$TEMPERATURE" \
  --order "$ORDER" --batch-size 64 --seed "$SEED" $QUIET

step "distill -> $SAMPLER_DIR"
adjust distill --base "$BASE_DIR" --device "$DEVICE" --rollouts "$WORK/rollouts" --out "$SAMPLER_DIR" \
  --steps "$DISTILL_STEPS" --batch-size "$DISTILL_BATCH" --lr "$DISTILL_LR" --max-unrolls "$MAX_UNROLLS" \
  --min-lr-ratio "$MIN_LR_RATIO" --entropy-windows "$ENTROPY_WINDOWS" --sampler-layers "$SAMPLER_LAYERS" \
  --eval-every "$EVAL_EVERY" --seed "$SEED" $QUIET | tee "$WORK/distill.json"

step "eval tasks -> $RESULTS"
adjust eval tasks --base "$BASE_DIR" --sampler "$SAMPLER_DIR" --device "$DEVICE" --prompts "$WORK/eval_prompts.jsonl" \
  --strategies "$STRATEGIES" --gen-length "$GEN_LENGTH" --temperature "$TEMPERATURE" --order "$ORDER" \
  --seed "$SEED" --out-dir "$RESULTS_DIR" --json > /dev/null
cat "$RESULTS_DIR/tasks.md"  # the table eval tasks wrote (validity per task and strategy, tokens/pass)
step "done; results in $RESULTS"
