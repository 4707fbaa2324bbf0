#!/usr/bin/env bash
# Prepared device run for the NEXT lent GPU (one card, <= 8 min wall): the shipped recipe, longer.
#   A. MSE continuation of the shipped twin with the shipped settings (gate 150, impulse pre-stage,
#      global estimator, log residual), batch 64 of 128 px, bf16, noise synthesised by worker processes;
#   B. the FP fine-tune and its MSE twin from A, side by side, same steps / seed / schedule.
# Step counts are calibrated in the run (rate x budget) so each cosine schedule completes.
#   python scripts/pack_corpus.py --data data/real/train --data Resources/TrainingData \
#       --thin pylinac_cbct=2 --out gpu/corpus.slices.npz        # here: the device has no readers
#   OUT=gpu_out bash scripts/gpu_chain.sh                         # there (carry gpu/)
# Dry run on the CPU (about 2 min; checks the flags and the chain, not the figures):
#   PATH=.venv/bin:$PATH OUT=/tmp/dry DEVICE=cpu BUDGET_A=5 BUDGET_B=5 CAL_STEPS=4 BANK=200 BATCH=4 PATCH=64 \
#       WORKERS=1 bash scripts/gpu_chain.sh
# BASE (default 24, the shipped width) must be at least the INIT net's; a wider BASE grows it in A
# (output unchanged, widen_resunet).
# Results in $OUT: base.pt, fp.pt, twin.pt (float16; they share the restoration net in
# fpdenoise_restoration.pt, which travels with them) and logs.tgz. Compare on the held-out set
# (benchmarks/quality.py, fpdenoise benchmark) before shipping; the FP term's lambda stays 0.08 (the
# shipped value under --residual-norm log; scripts/fp_lambda_probe.py --transfer-lambda).
# The 2026-11-27 run's models were worse alone than the CPU chain at low noise; what paid was souping its twin
# with the shipped twin, merging specialists and interpolating the mix fine-tunes (stages 30-32 of
# Resources/Models/README.md). Do the same with the next run's twin.pt.
set -uo pipefail
OUT=${OUT:-gpu_out}; DEVICE=${DEVICE:-cuda}; BUDGET_A=${BUDGET_A:-200}; BUDGET_B=${BUDGET_B:-150}
HARD_S=${HARD_S:-450}; CAL_STEPS=${CAL_STEPS:-300}; BANK=${BANK:-40000}; BATCH=${BATCH:-64}; PATCH=${PATCH:-128}
WORKERS=${WORKERS:-6}; LAM=${LAM:-0.08}; BASE=${BASE:-24}; PACK=${PACK:-gpu/corpus.slices.npz}; INIT=${INIT:-Resources/Models/fpdenoise_mse_twin.pt}
W=${WORK:-/tmp/fpd_chain}
source "$(dirname "$0")/gpu_common.sh"
run() {  # out steps bank lr seed init extra...
  local out=$1 steps=$2 bank=$3 lr=$4 seed=$5 init=$6; shift 6
  python3 -m FPDenoiseLib.cli train --data "$PACK" --arch resunet --stage denoiser --init "$init" --device "$DEVICE" \
    --amp bf16 --batch-size "$BATCH" --patch-size "$PATCH" --bank-size "$bank" --lr "$lr" --level-min 0 \
    --level-max 0.85 --zero-level-prob 0.1 --true-map-prob 0.2 --val-every 1000 --ckpt-every 1000 --seed "$seed" \
    --residual-gate 150 --impulse-filter --estimator-global --residual-norm log --base-channels "$BASE" \
    --workers "$WORKERS" --progress-lines \
    --steps "$steps" --noise $NOISE --out "$out" "$@" >"${out%.pt}.log" 2>&1
}

# calibration: A alone, then B's two runs side by side
run "$W/calA.pt" "$CAL_STEPS" 4000 3e-4 3 "$INIT" --loss mse
run "$W/calF.pt" "$CAL_STEPS" 4000 1e-4 6 "$INIT" --loss fp --lam "$LAM" & run "$W/calM.pt" "$CAL_STEPS" 4000 1e-4 6 "$INIT" --loss mse & wait
SA=$(steps_for "$(rate "$W/calA.log")" "$BUDGET_A"); SB=$(steps_for "$(rate "$W/calF.log")" "$BUDGET_B")
echo "A: $SA steps, B: $SB steps, t=$(elapsed)s" | tee -a "$W/env.log"

run "$W/base.pt" "$SA" "$BANK" 3e-4 3 "$INIT" --loss mse
run "$W/fp.pt" "$SB" "$BANK" 1e-4 6 "$W/base.pt" --loss fp --lam "$LAM" & PF=$!
run "$W/twin.pt" "$SB" "$BANK" 1e-4 6 "$W/base.pt" --loss mse & PM=$!
watch_deadline $PF $PM
export_results base fp twin
grep -h "VAL\|steps in" "$W"/base.log "$W"/fp.log "$W"/twin.log | tail -12
