#!/usr/bin/env bash
# The paper's whole protocol in miniature, on CPU, on the synthetic grid world (data/synthetic/prepare.py), each stage
# checked before the next one runs:
#   data -> stage 0: pre-train the tiny LLM to answer from the scene told where the vision slots go (frozen
#           afterwards, as Llama-2 in the paper) and the tiny CLIP on images and their scenes in words
#           GATE 1: the LLM reads its context (greedy exact match on cell and row questions with the scene as one
#           compound position per cell >= GATE_LLM %, and GATE_GAP points above the same questions without it)
#        -> stage 1: the paper's contrastive alignment, then the fused model alone learns to carry what a question
#           asks for (train_align.py --objective=answers: the EOS output classifies the short answers, at every n_l
#           of the sweep; the contrastive loss cannot teach one-word answers, results/tiny/README.md)
#        -> stage 2: a base model at n_l = BASE_NL, the image's 16 tokens
#           GATE 2: the model reads its images (SYNTH_VQA's cell questions with the right images >= GATE_GAP points
#           above the same model shown other rows' images, evaluate.py --image_ablation=shuffle)
#        -> stage 2 of the question-blind compressors (pool, resampler): the same steps and conversations
#        -> stage 3: one fine-tune per n_l on the same 10% of the data, with the question fused (VQQ) and without
#           it (VQ-ft), and of each compressor -> every fine-tune on the 2 synthetic benchmarks, VQQ also with
#           shuffled images -> results.csv -> scaling_fit.py -> the paper's two findings checked against targets.
#     bash reproduce_tiny.sh                      # seed 0 -> results/tiny
#     TINY_SEED=1 bash reproduce_tiny.sh          # seed 1 -> results/tiny-seed1
# TINY_SEED sets the data, stage 0, the initialisations and the data order. The sizes below can be set from the
# environment (tests/test_reproduce_tiny.py runs a seconds-long version with the gates off). Two processes run at
# once where the stages allow it, each on one thread: on 2 cores that is faster than one process on two threads.
set -euo pipefail
cd "$(dirname "$0")"

SEED=${TINY_SEED:-0}
SUFFIX=$([ "$SEED" = 0 ] || echo "-seed$SEED")
OUT=${TINY_OUT:-out/tiny-repro$SUFFIX}      # data, checkpoints, predictions, logs
RESULTS=${TINY_RESULTS:-results/tiny$SUFFIX}  # results.csv, fits.csv, fits_all_metrics.csv, targets.txt, figures
NL=${TINY_NL:-"1 2 4 8 16"}               # the stage-3 sweep, 1 to the image's 16 tokens; n_s = min(n_l, 4)
BASE_NL=${TINY_BASE_NL:-16}                # stages 1 and 2 (the paper: 256 / 8)
N_TRAIN=${TINY_TRAIN:-10000}               # training conversations (stage 3 uses 10% of them)
N_BENCH=${TINY_BENCH:-150}                 # rows per benchmark
LM_STEPS=${TINY_LM_STEPS:-1000}            # stage 0, the LLM, LM_BATCH fresh conversations per step
LM_BATCH=${TINY_LM_BATCH:-64}
CLIP_STEPS=${TINY_CLIP_STEPS:-300}         # stage 0, CLIP, 64 fresh image-text pairs per step
ALIGN_STEPS=${TINY_ALIGN_STEPS:-100}       # stage 1, contrastive, 16 conversations per step
ANSWER_STEPS=${TINY_ANSWER_STEPS:-3000}    # stage 1, then objective=answers, 16 conversations per step
GEN_STEPS=${TINY_GEN_STEPS:-1500}          # stage 2, 2 x GEN_BATCH conversations per step, for each compressor
GEN_BATCH=${TINY_GEN_BATCH:-16}
FT_STEPS=${TINY_FT_STEPS:-150}             # stage 3, 16 conversations per step
FT_LR=${TINY_FT_LR:-3e-4}                  # stage 3; stage 2's 1e-3 undid a base's reading in 100 (earlier world)
GATE_LLM=${TINY_GATE_LLM:-90}              # gate 1: % exact match with the scene as compound positions
GATE_GAP=${TINY_GATE_GAP:-20}              # gates 1 and 2: points above the blind / shuffled-image baseline
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
gate() {  # gate NAME MEASURED MINIMUM: print the measurement; stop the run when it falls short
  if $PYTHON -c "import sys; sys.exit(not float('$2') >= float('$3'))"; then
    progress "GATE $1: $2 >= $3, passed"
  else
    progress "GATE $1: $2 < $3, FAILED: the next stage would learn nothing from this one"; exit 1
  fi
}
n_s_of() { echo $(( $1 < 4 ? $1 : 4 )); }
# config/tiny.py holds the tiny model and token space; CLIP and the frozen LLM are the ones stage 0 writes. The
# miniature's images are 112 px: the global view alone (num_crops 0) shows every cell at the ViT's resolution.
TINY=(config/tiny.py --data_dir="$D" --clip_path="$D/clip-pretrained" --llama_path="$D/llama-lm" --num_crops=0
      --log_interval=50 --seed="$SEED")
# a fresh bridge at std 1e-3 (the paper's default) let stage 2 settle on a constant soft prompt at this scale
GEN=(--bridge_init_std=0.02)
score() {  # score RESULTS_CSV VARIANT BENCHMARK METRIC N_L: one number of an evaluate.py results.csv
  $PYTHON -c "import csv, sys; print(next(r['score'] for r in csv.DictReader(open(sys.argv[1])) if
    (r['variant'], r['benchmark'], r['metric'], r['n_l']) == tuple(sys.argv[2:])))" "$@"
}

progress "data (seed $SEED): $N_TRAIN training conversations, 2 benchmarks x $N_BENCH rows"
run "$LOGS/prepare.log" $PYTHON data/synthetic/prepare.py --out_dir="$D" --n_train="$N_TRAIN" --n_val=$(( N_TRAIN / 50 )) \
    --n_bench="$N_BENCH" --seed="$SEED"

progress "stage 0: LLM ($LM_STEPS steps), at once with CLIP ($CLIP_STEPS steps), then stage 1 ($ALIGN_STEPS + $ANSWER_STEPS steps)"
run "$LOGS/stage0_llm.log" $PYTHON data/synthetic/pretrain_llm.py --data_dir="$D" --llama_path="$D/llama" \
    --out_dir="$D/llama-lm" --max_iters="$LM_STEPS" --batch_size="$LM_BATCH" --seed="$SEED" & stage0=$!
run "$LOGS/stage0_clip.log" $PYTHON data/synthetic/pretrain_clip.py --data_dir="$D" --out_dir="$D/clip-pretrained" \
    --max_iters="$CLIP_STEPS" --seed="$SEED"
grep "^step $CLIP_STEPS/" "$LOGS/stage0_clip.log"
# stage 1 reads only the LLM's tokenizer, which stage 0 copies unchanged. The contrastive part trains the vision tower
# too, and shapes its tokens so that a cell can be picked out (from stage 0's CLIP alone the answers objective stayed
# at chance for 3000 steps); the answers part's classes are the 7 cell answers (a row's or the grid's answer repeats a
# few times at most)
run "$LOGS/stage1_align.log" $PYTHON train_align.py "${TINY[@]}" --llama_path="$D/llama" --out_dir="$OUT/align-contrastive" \
    --n_l="$BASE_NL" --n_s="$(n_s_of "$BASE_NL")" --max_iters="$ALIGN_STEPS"
grep "^step $ALIGN_STEPS/" "$LOGS/stage1_align.log"
run "$LOGS/stage1_answers.log" $PYTHON train_align.py "${TINY[@]}" --llama_path="$D/llama" --out_dir="$OUT/align" \
    --init_from="$OUT/align-contrastive/ckpt.safetensors" --n_l="$BASE_NL" --n_s="$(n_s_of "$BASE_NL")" \
    --max_iters="$ANSWER_STEPS" --log_interval=500 --objective=answers --answer_min_count=10 \
    --n_l_mix="($(echo $NL | tr ' ' ','),)" --val_file=val.jsonl --eval_interval=1000
grep "^step $ANSWER_STEPS " "$LOGS/stage1_answers.log"  # the validation loss (chance: ln 7 = 1.95)
wait $stage0
grep "^exact match" "$LOGS/stage0_llm.log"
gate_score() {  # gate_score FORM: % of cell and row questions answered right with the scene told in FORM
  tail -n 1 "$LOGS/stage0_llm.log" | $PYTHON -c "import json, sys; print(100 * json.load(sys.stdin)['$1_scene']['lookups'])"
}
with=$(gate_score compound)
without=$(gate_score none)
gate "1a, the LLM answers cell and row questions from the scene, one compound position a cell (% exact match)" \
    "$with" "$GATE_LLM"
gate "1b, ... and not from the answers' prior (points above the same questions without the scene)" \
    "$($PYTHON -c "print($with - $without)")" "$GATE_GAP"

progress "stage 2 (base model, n_l=$BASE_NL, $GEN_STEPS steps, 2 processes)"
run "$LOGS/stage2_gen.log" $PYTHON -m torch.distributed.run --standalone --nproc_per_node=2 train_gen.py "${TINY[@]}" "${GEN[@]}" \
    --out_dir="$OUT/gen" --init_from="$OUT/align/ckpt.safetensors" --n_l="$BASE_NL" --n_s="$(n_s_of "$BASE_NL")" \
    --max_iters="$GEN_STEPS" --batch_size="$GEN_BATCH" --grad_accum=1
grep "^step $GEN_STEPS/" "$LOGS/stage2_gen.log"
for ablation in "" shuffle; do
  run "$LOGS/gate2_$ablation.log" $PYTHON evaluate.py --ckpt="$OUT/gen" --benchmarks=SYNTH_VQA --bench_dir="$D/bench" \
      --out_dir="$OUT/eval-gen" --variant=base --image_ablation="$ablation"
done
right=$(score "$OUT/eval-gen/results.csv" base SYNTH_VQA category:cell "$BASE_NL")
shuffled=$(score "$OUT/eval-gen/results.csv" base-shuffled SYNTH_VQA category:cell "$BASE_NL")
progress "stage 2 on SYNTH_VQA's cell questions: $right with the right images, $shuffled with shuffled ones"
gate "2, the model reads its images (points above shuffled images, SYNTH_VQA cell questions)" \
    "$($PYTHON -c "print($right - $shuffled)")" "$GATE_GAP"

# pool and resampler are question-blind; each trains its own stage 2 from stage 1's vision tower (its compressor and
# bridge fresh) with the fused base's steps and conversations per step, both at once, one process each
progress "stage 2 of pool and resampler ($GEN_STEPS steps each, at once)"
pids=()
for compressor in pool resampler; do
  run "$LOGS/stage2_$compressor.log" $PYTHON train_gen.py "${TINY[@]}" "${GEN[@]}" --compressor=$compressor \
      --out_dir="$OUT/gen-$compressor" --init_from="$OUT/align/ckpt.safetensors" --n_l="$BASE_NL" \
      --n_s="$(n_s_of "$BASE_NL")" --max_iters="$GEN_STEPS" --batch_size=$(( 2 * GEN_BATCH )) --grad_accum=1 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for compressor in pool resampler; do
  progress "  stage 2 $compressor: $(grep "^step $GEN_STEPS/" "$LOGS/stage2_$compressor.log" | cut -d'|' -f2)"
done

BENCHMARKS=SYNTH_VQA,SYNTH_CAPTION
sweep() {  # sweep VARIANT BASE TRAIN_ARG [IMAGE_ABLATION...]: stage 3 for every n_l from BASE, then all on the benchmarks
  local variant=$1 base=$2 train_arg=$3 ckpts=() n ablation
  shift 3
  for n in $NL; do
    run "$LOGS/stage3_${variant}_nl$n.log" $PYTHON train_gen.py "${TINY[@]}" "${GEN[@]}" --out_dir="$OUT/ft-$variant-$n" \
        --init_from="$base/ckpt.safetensors" --data_fraction=0.1 --max_iters="$FT_STEPS" --lr="$FT_LR" \
        --n_l="$n" --n_s="$(n_s_of "$n")" "$train_arg"
    progress "  stage 3 $variant n_l=$n: $(grep "^step $FT_STEPS/" "$LOGS/stage3_${variant}_nl$n.log" | cut -d'|' -f2)"
    ckpts+=("$OUT/ft-$variant-$n")
  done
  for ablation in "" "$@"; do
    run "$LOGS/eval_$variant$ablation.log" $PYTHON evaluate.py --ckpt="$(IFS=,; echo "${ckpts[*]}")" \
        --benchmarks=$BENCHMARKS --bench_dir="$D/bench" --out_dir="$OUT/eval-$variant" --image_ablation="$ablation"
    progress "  evaluated $variant ${ablation:+($ablation images)}: $(tail -n 1 "$LOGS/eval_$variant$ablation.log")"
  done
}
progress "stage 3 (n_l in $NL, 10% of the data, $FT_STEPS steps each) and evaluation: two sweeps at a time"
{ sweep VQQ "$OUT/gen" --drop_question=False shuffle && sweep pool "$OUT/gen-pool" --compressor=pool; } & first=$!
{ sweep VQ-ft "$OUT/gen" --drop_question=True && sweep resampler "$OUT/gen-resampler" --compressor=resampler; } & second=$!
wait $first
wait $second

progress "results and scaling fit -> $RESULTS"
{ cat "$OUT/eval-VQQ/results.csv"; for v in VQ-ft pool resampler; do tail -n +2 "$OUT/eval-$v/results.csv"; done; } \
    > "$RESULTS/results.csv"
# zero scores cannot enter a log-space fit: they are skipped and listed in the log
run "$LOGS/scaling_fit.log" $PYTHON scaling_fit.py "$RESULTS/results.csv" --variants=VQQ,VQ-ft,VQQ-shuffled,pool,resampler \
    --out_dir="$RESULTS" --skip_bad=True
cat "$LOGS/scaling_fit.log"
# every metric, the question types (category:*) too: which kinds of question gain from more tokens
run "$LOGS/scaling_fit_all.log" $PYTHON scaling_fit.py "$RESULTS/results.csv" --variants=VQQ,VQ-ft,VQQ-shuffled,pool,resampler \
    --metrics=all --skip_bad=True --out_dir="$OUT/fit-all-metrics"
cp "$OUT/fit-all-metrics/fits.csv" "$RESULTS/fits_all_metrics.csv"
# finding 2's picture: VQQ minus VQ-ft at each n_l (scaling_fit.py draws it for exactly two variants)
run "$LOGS/scaling_fit_difference.log" $PYTHON scaling_fit.py "$RESULTS/results.csv" --variants=VQQ,VQ-ft \
    --skip_bad=True --out_dir="$OUT/fit-difference"
cp "$OUT/fit-difference/difference.png" "$RESULTS/difference.png"
$PYTHON data/synthetic/targets.py "$RESULTS" --nl="$NL" | tee "$RESULTS/targets.txt"
progress "done"
