"""Check the issue's lambda rule with a validation set large enough to decide it.

    python scripts/lambda_rule.py FP.pt TWIN.pt [--patches 512] [--seeds 3]

The rule: the FP run's validation PSNR may be at most 0.05 dB under its MSE twin's (same recipe, same
start, only ``--loss``/``--lam`` differ). Training validates on 16 patches, where one clean (capped
100 dB) or very noisy patch moves the mean by tenths of a dB; this rebuilds the validation set from
FP.pt's stored training config (the same held-back slices: every 8th), with ``--patches`` patches,
noises both models identically with ``--seeds`` seeds, and prints the paired mean difference with a
bootstrap 95 % CI. Noise-free patches are left out of the difference (both models sit at the 100 dB
cap or not, which says nothing about lambda). Exit status 0 when the rule holds, 1 when it does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint
from FPDenoiseLib.training import TrainConfig, _noise_fn, build_bank, validation_scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp")
    ap.add_argument("twin")
    ap.add_argument("--patches", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=0.05, help="allowed drop, dB (the issue's rule: 0.05)")
    ap.add_argument("--data", action="append", help="default: the FP run's own --data")
    args = ap.parse_args(argv)
    ck = load_checkpoint(args.fp)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    stored = {k: v for k, v in ck["training"].items() if k in known}
    cfg = TrainConfig(**{**stored, "data": args.data or stored["data"], "val_size": args.patches, "bank_size": 1})
    _, val, _ = build_bank(cfg)
    noise = _noise_fn(cfg.noises, tuple(cfg.level_range))
    models = {name: model_from_checkpoint(load_checkpoint(p), "denoiser").float() for name, p in
              (("fp", args.fp), ("twin", args.twin))}
    cpu = torch.device("cpu")
    diffs, means = [], {"fp": [], "twin": []}
    for s in range(args.seeds):
        scores = {n: validation_scores(m, val, noise, cfg.seed + 1000 * s, cpu) for n, m in models.items()}
        noisy = scores["fp"]["psnr_noisy"] < 100.0
        for n in means:
            means[n].append(scores[n]["psnr"][noisy])
        diffs.append(scores["fp"]["psnr"][noisy] - scores["twin"]["psnr"][noisy])
    d = np.concatenate(diffs)
    boot = np.random.default_rng(0).choice(d, size=(2000, d.size)).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    fp_m, tw_m = (float(np.concatenate(means[n]).mean()) for n in ("fp", "twin"))
    ok = d.mean() >= -args.tolerance
    print(f"{d.size} noisy validation patches ({args.patches} x {args.seeds} seeds, {cfg.patch_size}+ px): "
          f"FP {fp_m:.3f} dB, twin {tw_m:.3f} dB, FP - twin {d.mean():+.3f} dB (95 % CI {lo:+.3f}..{hi:+.3f}); "
          f"rule (>= -{args.tolerance}) {'holds' if ok else 'FAILS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
