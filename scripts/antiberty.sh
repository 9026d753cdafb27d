#!/usr/bin/env bash
# ADJUST on a real pretrained masked LM nobody here trained: AntiBERTy (antiberty==0.1.3 on PyPI, MIT
# license; 8 layers, hidden 512, a 25-token amino-acid vocabulary, trained on 558M antibody sequences).
#   download the wheel (~97 MB, PyPI) -> convert the pickled weights (weights-only) to safetensors ->
#   exact rollouts after 8 real antibody prefixes -> distill -> joint-KL at K = 2, 4, 8 -> tokens/s.
# Every knob is an environment variable; each step resumes or is skipped when its output exists.
# SMOKE=1: a one-minute run of every step at toy sizes (into runs/antiberty-smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
ADJUST=${ADJUST:-.venv/bin/adjust}
SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then
  WORK=${WORK:-runs/antiberty-smoke}; N=${N:-16}; GEN=${GEN:-8}; STEPS=${STEPS:-3}; STATES=${STATES:-4}; DRAWS=${DRAWS:-2}
  RESULTS_DIR=${RESULTS_DIR:-$WORK/results}; BENCH_REPEATS=${BENCH_REPEATS:-1}
else
  WORK=${WORK:-runs/antiberty}; N=${N:-768}; GEN=${GEN:-40}; STEPS=${STEPS:-3000}; STATES=${STATES:-128}; DRAWS=${DRAWS:-8}
  RESULTS_DIR=${RESULTS_DIR:-results/antiberty}; BENCH_REPEATS=${BENCH_REPEATS:-5}
fi
ENTROPY_WINDOWS=${ENTROPY_WINDOWS:-0.8}
MAX_UNROLLS=${MAX_UNROLLS:-3}
SEED=${SEED:-0}
DTYPE=${DTYPE:-bfloat16}  # faster than float32 per pass on CPUs with avx512_bf16; every step uses the same dtype
BASE=$WORK/antiberty-base
mkdir -p "$WORK"

# 1. the published weights, from PyPI (no model hub): the wheel ships pytorch_model.bin, config.json, vocab.txt
if [[ ! -f $BASE/model.safetensors ]]; then
  if [[ ! -d $WORK/wheel/antiberty ]]; then
    python3 -m pip download --no-deps --only-binary=:all: -d "$WORK/download" antiberty==0.1.3
    python3 -m zipfile -e "$WORK"/download/antiberty-0.1.3-py3-none-any.whl "$WORK/wheel"
  fi
  M=$WORK/wheel/antiberty/trained_models
  $ADJUST convert bert --weights "$M/AntiBERTy_md_smooth/pytorch_model.bin" --config "$M/AntiBERTy_md_smooth/config.json" \
      --vocab "$M/vocab.txt" --out "$BASE"
fi

# 2. exact trajectories after 8 real antibody prefixes (germline V-gene starts, scripts/antiberty_prefixes.txt)
$ADJUST rollouts --base "$BASE" --dtype "$DTYPE" --out "$WORK/rollouts" --prompts scripts/antiberty_prefixes.txt \
    --num-samples "$N" --gen-length "$GEN" --batch-size 64 --seed "$SEED" --quiet

# 3. the sampler (skipped once a sampler distilled for $STEPS steps is there: the resume state stays beside it,
#    so that --steps can be raised later; its config.json records the step it holds)
distilled=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("checkpoint_step", ""))' \
            "$BASE/sampler/config.json" 2>/dev/null || true)
[[ -f $BASE/sampler/model.safetensors && $distilled == "$STEPS" ]] || \
  $ADJUST distill --base "$BASE" --dtype "$DTYPE" --rollouts "$WORK/rollouts" --out "$BASE/sampler" --steps "$STEPS" \
      --eval-every 250 --cache-base-states \
      --max-unrolls "$MAX_UNROLLS" --entropy-windows "$ENTROPY_WINDOWS" --min-lr-ratio 0.05 --seed "$SEED" --quiet

# 4. joint KL to the true K-token joint on held-out states, K = 2, 4, 8: one report (json, md, png)
$ADJUST eval joint-kl --base "$BASE" --dtype "$DTYPE" --rollouts "$WORK/rollouts" -K 2,4,8 --num-states "$STATES" \
    --draws "$DRAWS" --seed 1 --out-dir "$RESULTS_DIR"

# 5. tokens/s side by side (one thread, batch 1 and 8)
$ADJUST bench --base "$BASE" --dtype "$DTYPE" --gen-length "$GEN" --ks 2,4 --repeats "$BENCH_REPEATS" \
    --threads 1 --json > "$RESULTS_DIR/bench.json.tmp" && mv "$RESULTS_DIR/bench.json.tmp" "$RESULTS_DIR/bench.json"
echo "antiberty: done ($WORK, $RESULTS_DIR)"
