#!/usr/bin/env bash
# One command, GPU: the fast default model (resunet) and the paper-size U-Net (64-128-256-512,
# 4 Down / 4 Up), both as an MSE base + FP fine-tune + MSE twin, with bf16 autocast; DDP over all
# visible GPUs through torchrun. Needs the real corpus: python scripts/fetch_training_data.py
#   bash scripts/train_gpu.sh [OUT_DIR]            (default runs_gpu/)
# The shipped settings: log residual (lambda 0.08 belongs to it), and for resunet gate 150, the impulse
# pre-stage and the global-context estimator (Resources/Models/README.md). Every stage checkpoints; rerunning the script resumes where it stopped (--resume).
# --base-channels also sizes f, so this trains the base-16 net; the shipped denoiser was then grown to base 24
# (--init with --base-channels 24, stages 9-14 of Resources/Models/README.md; scripts/gpu_chain.sh continues it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs_gpu}
mkdir -p "$OUT"
NGPU=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
RUN=(torchrun --standalone --nproc_per_node "$NGPU" -m FPDenoiseLib.cli train)
DATA=(--data data/real/train --data Resources/TrainingData)
COMMON=(--amp bf16 --device cuda --batch-size 32 --patch-size 128 --level-min 0 --level-max 0.85
        --zero-level-prob 0.1 --val-every 1000 --ckpt-every 500 --seed 0 --resume --residual-norm log)
for ARCH in resunet unet; do
  if [ "$ARCH" = unet ]; then WIDTH=(--base-channels 64 --max-channels 512); else
    WIDTH=(--base-channels 16 --residual-gate 150 --impulse-filter --estimator-global --true-map-prob 0.2); fi
  "${RUN[@]}" "${DATA[@]}" "${COMMON[@]}" "${WIDTH[@]}" --arch "$ARCH" --stage both --loss mse \
    --steps 60000 --restoration-steps 5000 --bank-size 40000 --lr 6e-4 --out "$OUT/${ARCH}_base.pt"
  for LOSS in fp mse; do
    "${RUN[@]}" "${DATA[@]}" "${COMMON[@]}" "${WIDTH[@]}" --arch "$ARCH" --stage denoiser --loss "$LOSS" \
      --lam "${FP_LAMBDA:-0.08}" --init "$OUT/${ARCH}_base.pt" --steps 5000 --bank-size 8000 --lr 1e-4 \
      --out "$OUT/${ARCH}_${LOSS}_ft.pt"
  done
done
echo "done: $OUT/*_fp_ft.pt (ship with scripts/export_model.py --shipped) and the MSE twins $OUT/*_mse_ft.pt"
