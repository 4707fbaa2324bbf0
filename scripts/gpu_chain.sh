#!/usr/bin/env bash
# Prepared device run for the NEXT lent GPU (one card): the whole recipe of the shipped pair (stages 29-32 of
# Resources/Models/README.md) in one call, so the session gets a candidate pair to compare. Wall time about
# 7.5 min on an H100, 8 at most (120 + 55 + 100 s of training, the rest start-up, calibration, banks, merges
# and exports; the FP / MSE pair is stopped at 450 s): give the device call timeout_s 540; a call cut short
# still returns base.pt and soup.pt once they exist.
#   A. MSE continuation of INIT (the shipped twin) with the shipped settings (gate 150, impulse pre-stage,
#      global estimator, log residual), batch 64 of 128 px, bf16, noise synthesised by worker processes;
#   S. soup0 = INIT : A 1:1 (A alone when BASE grows the net), then its Gaussian and Poisson specialists side
#      by side, merged soup = soup0 : G : P 2:1:1 (stage 30: the low-noise Gaussian / Poisson gain);
#   B. the FP fine-tune and its MSE twin of the soup on the whole mix, side by side, same steps / seed /
#      schedule (stage 31: they bring back the magnitude-noise types);
#   I. each of them interpolated 0.7 : 0.3 with the soup (stage 32), exported as shipped.
# Step counts are calibrated in the run (rate x budget) so each cosine schedule completes.
#   python scripts/pack_corpus.py --data data/real/train --data Resources/TrainingData \
#       --thin pylinac_cbct=2 --out gpu/corpus.slices.npz        # here: the device has no readers
#   OUT=gpu_out bash scripts/gpu_chain.sh                         # there: run(carry=["gpu"])
# Dry run on the CPU (about 2 min; checks the flags and the chain, not the figures; Testing/test_gpu_scripts.py):
#   PATH=.venv/bin:$PATH OUT=/tmp/dry DEVICE=cpu BUDGET_A=5 BUDGET_S=5 BUDGET_B=5 CAL_STEPS=4 BANK=200 BATCH=4 \
#       PATCH=64 WORKERS=1 bash scripts/gpu_chain.sh
# BASE (default 24, the shipped width) must be at least the INIT net's; a wider BASE grows it in A
# (widen_resunet: output unchanged, or within 5e-4 where INIT has attention, as the shipped pair has; its
# heads of 24 channels stay, so BASE must keep the attention levels at multiples of 24: 30 or 36, not 32).
# A 2000-step CPU test of the width (Gaussian specialists of the shipped twin, base 24 against 32,
# 2026-11-28) gave 45.43 against 45.41 dB at 2 %: a wider net needs the GPU's steps. Forward cost on 2 cores
# (benchmarks/speed.py --widths 30 36, alternating): base 30 with attention at 1 2 3 1.53x the shipped net in
# bf16 (102 ms, over the 100 ms target), base 36 1.94x; so BASE=24 unless the target moves.
# ATTN="2 3" adds the self-attention layers to every run (grown from INIT with its output unchanged; soup0
# averages INIT as the same net with zero layers). On the CPU (2026-11-28, third) this chain with them and
# MIX=0.8 gave a pair above the shipped one on clean / 2 % / 5 % / Poisson; on the device: ATTN="2 3" MIX=0.8.
# The shipped pair has them now; ATTN="1 2 3" adds window attention at level 1 to it the same way (its own
# layers kept). Level 1 costs 1.19x in bf16 and 1.17x in float32 (alternating timings, benchmarks/speed.py
# --widths, section 4b; an earlier non-alternating reading said nothing) and, in a CPU distillation of the
# white-noise CT model into the default (2026-11-28, sixth), gave +0.05 dB at 2 % over the same run without
# it; level 0 would cost 1.7x (121 ms).
# Results in $OUT (float16; they share the restoration net in fpdenoise_restoration.pt, which travels with
# them): default.pt and mse_twin.pt (the candidate pair, exported as shipped), fp.pt, twin.pt, soup.pt,
# base.pt and logs.tgz. Compare on the held-out set (benchmarks/quality.py, fpdenoise benchmark) before
# shipping; the FP term's lambda stays 0.08 (the shipped value under --residual-norm log;
# scripts/fp_lambda_probe.py --transfer-lambda).
set -uo pipefail
OUT=${OUT:-gpu_out}; DEVICE=${DEVICE:-cuda}; BUDGET_A=${BUDGET_A:-120}; BUDGET_S=${BUDGET_S:-55}
BUDGET_B=${BUDGET_B:-100}; HARD_S=${HARD_S:-450}; CAL_STEPS=${CAL_STEPS:-200}; BANK=${BANK:-40000}
BATCH=${BATCH:-64}; PATCH=${PATCH:-128}; WORKERS=${WORKERS:-6}; LAM=${LAM:-0.08}; BASE=${BASE:-24}
PACK=${PACK:-gpu/corpus.slices.npz}; INIT=${INIT:-Resources/Models/fpdenoise_mse_twin.pt}; MIX=${MIX:-0.7}
W=${WORK:-/tmp/fpd_chain}
source "$(dirname "$0")/gpu_common.sh"
run() {  # out steps bank lr seed init extra... (extra flags come last: a later --noise / --level-max wins)
  local out=$1 steps=$2 bank=$3 lr=$4 seed=$5 init=$6; shift 6
  python3 -m FPDenoiseLib.cli train --data "$PACK" --arch resunet --stage denoiser --init "$init" --device "$DEVICE" \
    --amp bf16 --batch-size "$BATCH" --patch-size "$PATCH" --bank-size "$bank" --lr "$lr" --level-min 0 \
    --level-max 0.85 --zero-level-prob 0.1 --true-map-prob 0.2 --val-every 1000 --ckpt-every 1000 --seed "$seed" \
    --residual-gate 150 --impulse-filter --estimator-global --residual-norm log --base-channels "$BASE" \
    --workers "$WORKERS" --progress-lines ${ATTN:+--attention $ATTN} \
    --steps "$steps" --noise $NOISE --out "$out" "$@" >"${out%.pt}.log" 2>&1
}
avg() {  # on failure: export what there is, stop
  python3 scripts/average_models.py "$@" >>"$W/env.log" 2>&1 && return
  echo "average failed: $*" | tee -a "$W/env.log"; export_results base G P soup fp twin; exit 1
}
GAUSS=(--loss mse --noise gaussian --level-max 0.5)  # sigma up to the grid's 0.5 level (stage 22)

# calibration: A alone, then B's two runs side by side (the specialists run at the MSE side-by-side rate)
run "$W/calA.pt" "$CAL_STEPS" 4000 3e-4 3 "$INIT" --loss mse
run "$W/calF.pt" "$CAL_STEPS" 4000 1e-4 6 "$INIT" --loss fp --lam "$LAM" & run "$W/calM.pt" "$CAL_STEPS" 4000 1e-4 6 "$INIT" --loss mse & wait
SA=$(steps_for "$(rate "$W/calA.log")" "$BUDGET_A"); SS=$(steps_for "$(rate "$W/calM.log")" "$BUDGET_S")
SB=$(steps_for "$(rate "$W/calF.log")" "$BUDGET_B")
echo "A: $SA steps, specialists: $SS, B: $SB steps, t=$(elapsed)s" | tee -a "$W/env.log"

run "$W/base.pt" "$SA" "$BANK" 3e-4 3 "$INIT" --loss mse
[ -f "$W/base.pt" ] || { echo "A failed"; export_results; exit 1; }
export_results base >/dev/null  # what a timed-out call still brings back
# soup0: INIT and A 1:1 (stage 30's t50); a grown A has no INIT of its width to average with
init_base=$(python3 -c "from FPDenoiseLib.checkpoint import load_checkpoint as L; print(L('$INIT')['models']['denoiser']['config']['channels'][0])")
if [ "$init_base" = "$BASE" ]; then avg "$W/soup0.pt" "$W/base.pt" "$INIT"; else cp "$W/base.pt" "$W/soup0.pt"; fi
run "$W/G.pt" "$SS" "$BANK" 2e-4 32 "$W/soup0.pt" "${GAUSS[@]}" & PG=$!
run "$W/P.pt" "$SS" "$BANK" 2e-4 32 "$W/soup0.pt" --loss mse --noise poisson & PP=$!
wait $PG $PP
avg "$W/soup.pt" "$W/soup0.pt" "$W/G.pt" "$W/P.pt" --weights 0.5 0.25 0.25
export_results base soup >/dev/null

run "$W/fp.pt" "$SB" "$BANK" 1e-4 33 "$W/soup.pt" --loss fp --lam "$LAM" & PF=$!
run "$W/twin.pt" "$SB" "$BANK" 1e-4 33 "$W/soup.pt" --loss mse & PM=$!
watch_deadline $PF $PM
# the pair: each fine-tune interpolated with the soup it started from (weight-space ensembling)
for n in fp twin; do
  [ -f "$W/$n.pt" ] && avg "$W/${n}_mix.pt" "$W/$n.pt" "$W/soup.pt" --weights "$MIX" "$(python3 -c "print(1 - $MIX)")"
done
[ -f "$W/fp_mix.pt" ] && cp "$W/fp_mix.pt" "$W/default.pt"
[ -f "$W/twin_mix.pt" ] && cp "$W/twin_mix.pt" "$W/mse_twin.pt"
export_results default mse_twin fp twin soup base
grep -h "VAL\|steps in" "$W"/base.log "$W"/G.log "$W"/P.log "$W"/fp.log "$W"/twin.log | tail -15
