#!/usr/bin/env bash
# Prepared device run (one GPU, <= 8 min wall): continue the shipped resunet on the real corpus with
# GPU-sized batches, as several variants side by side (the net is small; one process leaves the
# GPU idle): the MSE twin and FP fine-tunes at two lambdas share ONE recipe (same steps, seed,
# noise, schedule), plus one MSE variant that feeds the estimated map more often.
#   python scripts/pack_corpus.py --data data/real/train --data Resources/TrainingData \
#       --thin pylinac_cbct=2 --out gpu/corpus.slices.npz        # here: the device has no readers
#   OUT=gpu_out bash scripts/gpu_session.sh                       # there
# A 300-step calibration of all variants at once measures the slowest rate; the step count is
# then rate x BUDGET_S, so the cosine schedule completes inside the budget. A watchdog exports
# whatever checkpoint exists if the deadline passes anyway. Results: float16 copies in $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}; DEVICE=${DEVICE:-cuda}; BUDGET_S=${BUDGET_S:-300}; HARD_S=${HARD_S:-450}
CAL_STEPS=${CAL_STEPS:-300}; BANK=${BANK:-40000}; BATCH=${BATCH:-64}; PATCH=${PATCH:-128}; WORKERS=${WORKERS:-3}
PACK=${PACK:-gpu/corpus.slices.npz}; INIT=${INIT:-Resources/Models/fpdenoise_mse_twin.pt}
W=${WORK:-/tmp/fpd_gpu}
source "$(dirname "$0")/gpu_common.sh"
# name | extra flags
VARIANTS=("mse|--loss mse" "fp1e-4|--loss fp --lam 0.0001" "fp3e-5|--loss fp --lam 0.00003"
          "mse_tmp02|--loss mse --true-map-prob 0.2")
common() {  # $1 steps, $2 bank
  echo --data "$PACK" --arch resunet --stage denoiser --init "$INIT" --device "$DEVICE" --amp bf16 \
    --batch-size "$BATCH" --patch-size "$PATCH" --bank-size "$2" --lr 5e-4 --level-min 0 --level-max 0.85 \
    --zero-level-prob 0.1 --val-every 1000 --ckpt-every 1000 --seed 2 --workers "$WORKERS" --progress-lines --steps "$1" --noise $NOISE
}

# 1. calibration: all variants at once, as in the real run; the slowest sets the step count
NAMES=()
for v in "${VARIANTS[@]}"; do n=${v%%|*}; f=${v#*|}; NAMES+=("$n")
  python3 -m FPDenoiseLib.cli train $(common "$CAL_STEPS" 4000) $f --out "$W/cal_$n.pt" >"$W/cal_$n.log" 2>&1 &
done; wait
RATE=$(for n in "${NAMES[@]}"; do rate "$W/cal_$n.log"; done | sort -g | head -1)
STEPS=$(steps_for "$RATE" "$BUDGET_S")
echo "calibration: slowest variant $RATE steps/s -> $STEPS steps (budget ${BUDGET_S}s), t=$(elapsed)s" | tee -a "$W/env.log"

# 2. the run
PIDS=()
for v in "${VARIANTS[@]}"; do n=${v%%|*}; f=${v#*|}
  python3 -m FPDenoiseLib.cli train $(common "$STEPS" "$BANK") $f --out "$W/$n.pt" >"$W/$n.log" 2>&1 &
  PIDS+=($!)
done
watch_deadline "${PIDS[@]}"

# 3. shippable float16 copies (partial checkpoints too) and the logs
export_results "${NAMES[@]}"
for n in "${NAMES[@]}"; do grep -hE "VAL|denoiser:|Error|error" "$W/$n.log" | tail -3; done
