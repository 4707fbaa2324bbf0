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
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; DEVICE=${DEVICE:-cuda}; BUDGET_S=${BUDGET_S:-300}; HARD_S=${HARD_S:-450}
CAL_STEPS=${CAL_STEPS:-300}; BANK=${BANK:-40000}; BATCH=${BATCH:-64}; PATCH=${PATCH:-128}; WORKERS=${WORKERS:-3}
PACK=${PACK:-gpu/corpus.slices.npz}; INIT=${INIT:-Resources/Models/fpdenoise_mse_twin.pt}
W=${WORK:-/tmp/fpd_gpu}; mkdir -p "$OUT" "$W"; T0=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NOISE="gaussian gaussian gaussian poisson poisson poisson speckle noncentral_chi rician salt_pepper structured
  thermal magnetic_field chemical_shift motion wrap_around susceptibility"
# name | extra flags
VARIANTS=("mse|--loss mse" "fp1e-4|--loss fp --lam 0.0001" "fp3e-5|--loss fp --lam 0.00003"
          "mse_tmp02|--loss mse --true-map-prob 0.2")
common() {  # $1 steps, $2 bank
  echo --data "$PACK" --arch resunet --stage denoiser --init "$INIT" --device "$DEVICE" --amp bf16 \
    --batch-size "$BATCH" --patch-size "$PATCH" --bank-size "$2" --lr 5e-4 --level-min 0 --level-max 0.85 \
    --zero-level-prob 0.1 --val-every 1000 --ckpt-every 1000 --seed 2 --workers "$WORKERS" --progress-lines --steps "$1" --noise $NOISE
}
(nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)") 2>&1 | tee "$W/env.log"

# 1. calibration: all variants at once, as in the real run
for v in "${VARIANTS[@]}"; do n=${v%%|*}; f=${v#*|}
  python3 -m FPDenoiseLib.cli train $(common "$CAL_STEPS" 4000) $f --out "$W/cal_$n.pt" >"$W/cal_$n.log" 2>&1 &
done; wait
RATE=$(python3 - "$W" "$CAL_STEPS" <<'PY'
import re, sys, glob
rates = []
for p in glob.glob(f"{sys.argv[1]}/cal_*.log"):
    m = re.search(r"denoiser: (\d+) steps in ([\d.]+)s", open(p).read())
    rates.append(int(m.group(1)) / float(m.group(2)) if m else 0.0)
print(f"{min(rates) if rates else 0:.3f}")
PY
)
STEPS=$(python3 -c "print(max(200, int(float('$RATE') * $BUDGET_S) // 100 * 100))")
echo "calibration: slowest variant $RATE steps/s -> $STEPS steps (budget ${BUDGET_S}s), t=$(( $(date +%s) - T0 ))s" | tee -a "$W/env.log"

# 2. the run
PIDS=()
for v in "${VARIANTS[@]}"; do n=${v%%|*}; f=${v#*|}
  python3 -m FPDenoiseLib.cli train $(common "$STEPS" "$BANK") $f --out "$W/$n.pt" >"$W/$n.log" 2>&1 &
  PIDS+=($!)
done
while [ $(( $(date +%s) - T0 )) -lt "$HARD_S" ] && kill -0 "${PIDS[@]}" 2>/dev/null; do sleep 2; done
for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && { echo "deadline: stopping $p" | tee -a "$W/env.log"; kill "$p"; }; done
wait

# 3. shippable float16 copies (partial checkpoints too) and the logs
for v in "${VARIANTS[@]}"; do n=${v%%|*}
  [ -f "$W/$n.pt" ] && python3 scripts/export_model.py "$W/$n.pt" "$OUT/$n.pt" >>"$W/env.log" 2>&1
  grep -E "VAL|denoiser:|Error|error" "$W/$n.log" | tail -20 >"$W/$n.tail" 2>/dev/null
done
echo "total $(( $(date +%s) - T0 ))s" >>"$W/env.log"
tar -C "$W" -czf "$OUT/logs.tgz" $(cd "$W" && ls ./*.log ./*.tail 2>/dev/null)
cat "$W/env.log"; tail -n 3 "$W"/*.tail
