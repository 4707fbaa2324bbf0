# Shared by the prepared device runs (scripts/gpu_session.sh, scripts/gpu_chain.sh); source it after
# setting OUT, W (work folder) and the budget variables. The corpus travels as a slice pack
# (scripts/pack_corpus.py): the device has no image readers.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
# gpu/ is git-ignored (the pack is made from the fetched data, which stays out of the repository:
# Resources/TrainingData/README.md), so it reaches the device only when carried; check it can be read here
# (LZMA members need Python's lzma) before any device minute goes to training
python3 -c "import sys, numpy as np; np.load(sys.argv[1])['meta']" "$PACK" 2>/dev/null \
  || { echo "cannot read the slice pack $PACK here (make it with scripts/pack_corpus.py; carry gpu/)" >&2; exit 2; }
mkdir -p "$OUT" "$W"; T0=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the shipped mix since stage 15 (Gaussian 6x, Poisson 4x). The 2026-11-27 H100 run still had the 3x / 3x mix of
# stages 1-14 and came out 1 dB under the shipped twin at Gaussian 2 % (a likely cause, not isolated: stage 29)
# CT_NOISE=4 adds the CT scanner's noise texture (ct_correlated) at 4 of 25 draws (off by default: on the CPU it cost
# 0.07 dB (twin) and 0.35 dB (FP model) at Gaussian 2 %, Resources/Models/README.md "Session of 2026-11-27 (night)").
NOISE="gaussian gaussian gaussian gaussian gaussian gaussian poisson poisson poisson poisson speckle noncentral_chi
  rician salt_pepper structured thermal magnetic_field chemical_shift motion wrap_around susceptibility"
for _ in $(seq 1 "${CT_NOISE:-0}"); do NOISE="$NOISE ct_correlated"; done
(nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)") >"$W/env.log" 2>&1

rate() {  # steps/s of a finished training log
  python3 -c "import re,sys; m=re.search(r'denoiser: (\d+) steps in ([\d.]+)s', open(sys.argv[1]).read()); print(int(m.group(1))/float(m.group(2)) if m else 0)" "$1"
}
steps_for() {  # rate budget_s -> a step count (multiple of 100, >= 200) that fits the budget
  python3 -c "print(max(200, int(float('$1') * $2) // 100 * 100))"
}
elapsed() { echo $(( $(date +%s) - T0 )); }
watch_deadline() {  # pids...: wait for them until HARD_S has passed since the start, then stop them
  while [ "$(elapsed)" -lt "$HARD_S" ] && kill -0 "$@" 2>/dev/null; do sleep 2; done
  for p in "$@"; do kill -0 "$p" 2>/dev/null && { echo "deadline: stopping $p" | tee -a "$W/env.log"; kill "$p"; }; done
  wait
}
export_results() {  # names...: float16 copies of $W/NAME.pt (partial checkpoints too; the noise map fitted to the
  # intensity and the gate at 200, as shipped: stages 27-28 of Resources/Models/README.md) and the logs into $OUT
  for n in "$@"; do
    [ -f "$W/$n.pt" ] && python3 scripts/export_model.py "$W/$n.pt" "$OUT/$n.pt" --shipped >>"$W/env.log" 2>&1
  done
  echo "total $(elapsed)s" >>"$W/env.log"
  tar -C "$W" -czf "$OUT/logs.tgz" $(cd "$W" && ls ./*.log)
  cat "$W/env.log"
}
