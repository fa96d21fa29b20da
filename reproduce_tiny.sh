#!/usr/bin/env bash
# The paper's whole protocol in miniature, on CPU (about 20 minutes on 2 cores), on the synthetic grid world:
#   data -> stage 0: pre-train the tiny LLM on text alone (frozen afterwards, as Llama-2 in the paper) and the tiny
#           CLIP on image-caption pairs (the paper starts from a pre-trained CLIP too)
#        -> stage 1: alignment -> stage 2: a base model at n_l = BASE_NL
#        -> stage 3: one fine-tune per n_l on the same 10% of the data, with the question fused (VQQ) and without
#           it (VQ-ft) -> every fine-tune on the 4 synthetic benchmarks -> results.csv -> scaling_fit.py.
#     bash reproduce_tiny.sh
# The sizes below can be set from the environment (tests/test_reproduce_tiny.py runs a seconds-long version).
# Two processes run at once where the stages allow it, each on one thread: on 2 cores that is faster than one
# process on two threads, and much faster when other jobs share the cores.
set -euo pipefail
cd "$(dirname "$0")"

OUT=${TINY_OUT:-out/tiny-repro}             # data, checkpoints, predictions, logs
RESULTS=${TINY_RESULTS:-results/tiny}      # results.csv, fits.csv, fits_all_metrics.csv, scaling_fit.png, difference.png
NL=${TINY_NL:-"1 2 4 8 16 32 64"}          # the stage-3 sweep; n_s = min(n_l, 4)
BASE_NL=${TINY_BASE_NL:-64}                # stages 1 and 2 (the paper: 256 / 8)
N_TRAIN=${TINY_TRAIN:-2000}                # training conversations (stage 3 uses 10% of them)
N_BENCH=${TINY_BENCH:-150}                 # rows per benchmark
LM_STEPS=${TINY_LM_STEPS:-400}             # stage 0, the LLM
LM_BATCH=${TINY_LM_BATCH:-32}              # conversations per LLM step
CLIP_STEPS=${TINY_CLIP_STEPS:-600}         # stage 0, CLIP, 64 image-caption pairs per step
ALIGN_STEPS=${TINY_ALIGN_STEPS:-150}       # stage 1, 16 conversations per step
GEN_STEPS=${TINY_GEN_STEPS:-1500}          # stage 2, 16 conversations per step (12 epochs)
FT_STEPS=${TINY_FT_STEPS:-25}              # stage 3, 16 conversations per step (2 epochs of the 10%)
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 MPLBACKEND=Agg

D=$OUT/data
LOGS=$OUT/logs
if [ -e "$OUT" ]; then  # a rerun must not mix with (or be skipped for) the last run's checkpoints and predictions
  echo "$OUT exists: remove it or set TINY_OUT to a new folder"; exit 1
fi
mkdir -p "$LOGS" "$RESULTS"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed stage stops its partner too
SECONDS=0
progress() { echo "[$(printf '%4d' $SECONDS) s] $*"; }
run() {  # run LOG COMMAND...: output to LOG; on failure show its end and fail
  local log=$1; shift
  "$@" > "$log" 2>&1 || { echo "FAILED: $* (last lines of $log:)"; tail -n 20 "$log"; return 1; }
}
n_s_of() { echo $(( $1 < 4 ? $1 : 4 )); }
# config/tiny.py holds the tiny model and token space; CLIP and the frozen LLM are the ones stage 0 writes
TINY=(config/tiny.py --data_dir="$D" --clip_path="$D/clip-pretrained" --llama_path="$D/llama-lm" --log_interval=25)

progress "data: $N_TRAIN training conversations, 4 benchmarks x $N_BENCH rows"
run "$LOGS/prepare.log" $PYTHON data/synthetic/prepare.py --out_dir="$D" --n_train="$N_TRAIN" --n_val=$(( N_TRAIN / 10 )) --n_bench="$N_BENCH"

progress "stage 0: LLM on text ($LM_STEPS steps), at once with CLIP on images and captions ($CLIP_STEPS steps), then stage 1 (alignment, $ALIGN_STEPS steps)"
run "$LOGS/stage0_llm.log" $PYTHON data/synthetic/pretrain_llm.py --data_dir="$D" --llama_path="$D/llama" \
    --out_dir="$D/llama-lm" --max_iters="$LM_STEPS" --batch_size="$LM_BATCH" & stage0=$!
run "$LOGS/stage0_clip.log" $PYTHON data/synthetic/pretrain_clip.py --data_dir="$D" --out_dir="$D/clip-pretrained" \
    --max_iters="$CLIP_STEPS"
grep "^step $CLIP_STEPS/" "$LOGS/stage0_clip.log"
# stage 1 reads only the LLM's tokenizer, which stage 0 copies unchanged
run "$LOGS/stage1_align.log" $PYTHON train_align.py "${TINY[@]}" --llama_path="$D/llama" --out_dir="$OUT/align" \
    --n_l="$BASE_NL" --n_s="$(n_s_of "$BASE_NL")" --max_iters="$ALIGN_STEPS"
grep "^step $ALIGN_STEPS/" "$LOGS/stage1_align.log"
wait $stage0
grep "val answer loss" "$LOGS/stage0_llm.log"

progress "stage 2 (base model, n_l=$BASE_NL, $GEN_STEPS steps, 2 processes)"
# torchrun: 2 ranks x 8 conversations = the same steps as one process with batch 8 x 2 accumulation (config/tiny.py)
run "$LOGS/stage2_gen.log" $PYTHON -m torch.distributed.run --standalone --nproc_per_node=2 train_gen.py "${TINY[@]}" \
    --out_dir="$OUT/gen" --init_from="$OUT/align/ckpt.safetensors" --n_l="$BASE_NL" --n_s="$(n_s_of "$BASE_NL")" \
    --max_iters="$GEN_STEPS" --batch_size=8 --grad_accum=1
grep "^step $GEN_STEPS/" "$LOGS/stage2_gen.log"

sweep() {  # sweep VARIANT DROP_QUESTION: stage 3 for every n_l, then all of them on the benchmarks
  local variant=$1 drop=$2 ckpts=() n
  for n in $NL; do
    run "$LOGS/stage3_${variant}_nl$n.log" $PYTHON train_gen.py "${TINY[@]}" --out_dir="$OUT/ft-$variant-$n" \
        --init_from="$OUT/gen/ckpt.safetensors" --data_fraction=0.1 --max_iters="$FT_STEPS" \
        --n_l="$n" --n_s="$(n_s_of "$n")" --drop_question="$drop"
    progress "  stage 3 $variant n_l=$n: $(grep "^step $FT_STEPS/" "$LOGS/stage3_${variant}_nl$n.log" | cut -d'|' -f2)"
    ckpts+=("$OUT/ft-$variant-$n")
  done
  run "$LOGS/eval_$variant.log" $PYTHON evaluate.py --ckpt="$(IFS=,; echo "${ckpts[*]}")" \
      --benchmarks=SYNTH_YORN,SYNTH_MCQ,SYNTH_VQA,SYNTH_CAPTION --bench_dir="$D/bench" --out_dir="$OUT/eval-$variant"
  progress "  evaluated $variant: $(tail -n 1 "$LOGS/eval_$variant.log")"
}
progress "stage 3 (n_l in $NL, 10% of the data, $FT_STEPS steps each) and evaluation: VQQ and VQ-ft at once"
sweep VQQ False & vqq=$!
sweep VQ-ft True & vqft=$!
wait $vqq
wait $vqft

progress "results and scaling fit -> $RESULTS"
{ cat "$OUT/eval-VQQ/results.csv"; tail -n +2 "$OUT/eval-VQ-ft/results.csv"; } > "$RESULTS/results.csv"
# zero scores cannot enter a log-space fit: they are skipped and listed in the log
run "$LOGS/scaling_fit.log" $PYTHON scaling_fit.py "$RESULTS/results.csv" --variants=VQQ,VQ-ft --out_dir="$RESULTS" \
    --skip_bad=True
cat "$LOGS/scaling_fit.log"
# every metric, the question types (category:*) too: which kinds of question gain from more tokens
run "$LOGS/scaling_fit_all.log" $PYTHON scaling_fit.py "$RESULTS/results.csv" --variants=VQQ,VQ-ft --metrics=all \
    --skip_bad=True --out_dir="$OUT/fit-all-metrics"
cp "$OUT/fit-all-metrics/fits.csv" "$RESULTS/fits_all_metrics.csv"
progress "done"
