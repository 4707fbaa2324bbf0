"""Size the FP term against the residual term for a trained denoiser (to choose lambda).

    python scripts/fp_lambda_probe.py CKPT --data data/real/train

Prints the mean residual loss and the mean relative FP error (the FP term before lambda, as in
``FPDenoiseLib.losses.FPLoss``) of the checkpoint's denoiser on freshly noised clean patches, and
the lambda at which the FP term would be 5 % / 20 % / 50 % of the residual term.

``--transfer-lambda L`` carries a lambda chosen for the plain residual (``residual_norm="mean"``)
over to ``residual_norm="log"``: on the same batches it measures the norm of each term's gradient
with respect to the denoiser's weights, and prints the lambda that gives the FP term the same share
of the gradient under the log residual as ``L`` gives it under the mean one.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint
from FPDenoiseLib.losses import FPLoss
from FPDenoiseLib.training import TrainConfig, _noise_fn, build_bank
from FPDenoiseLib.xai import DEFAULT_READOUT, guided_backprop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--readout", default=DEFAULT_READOUT)
    ap.add_argument("--transfer-lambda", type=float, default=None,
                    help="lambda under residual_norm=mean to carry over to residual_norm=log")
    args = ap.parse_args()
    ck = load_checkpoint(args.ckpt)
    D, f = model_from_checkpoint(ck, "denoiser"), model_from_checkpoint(ck, "restoration")
    cfg = TrainConfig(data=args.data, bank_size=args.patches, patch_size=96, val_size=1)
    bank, _, _ = build_bank(cfg)
    clean = torch.from_numpy(bank)
    gb_clean = torch.cat([guided_backprop(f, clean[i : i + 32], readout=args.readout) for i in range(0, len(clean), 32)])
    scale = float(gb_clean.pow(2).mean())
    noisy = torch.from_numpy(_noise_fn(["mix"], (0.0, 0.85))(bank, np.random.default_rng(123)))
    loss = FPLoss(f, lam=1.0, gb_scale=scale, readout=args.readout)
    res, fp, fp_in = [], [], []
    for i in range(0, len(clean), 32):
        sl = slice(i, i + 32)
        with torch.no_grad():
            den = D(noisy[sl])
        _, parts = loss(den, noisy[sl], clean[sl], gb_clean[sl])
        _, parts_in = loss(noisy[sl], noisy[sl], clean[sl], gb_clean[sl])
        res.append(parts["residual"])
        fp.append(parts["fp"])
        fp_in.append(parts_in["fp"])
    r, p = float(np.mean(res)), float(np.mean(fp))
    print(f"readout={args.readout} residual={r:.3e} fp(denoised)={p:.3e} fp(noisy input)={np.mean(fp_in):.3e}")
    for share in (0.05, 0.2, 0.5):
        print(f"  lambda for FP = {share:.0%} of residual: {share * r / p:.2e}")
    if args.transfer_lambda is not None:
        params = [q for q in D.parameters() if q.requires_grad]

        def grad_norm(t: torch.Tensor) -> float:
            gs = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
            return float(torch.sqrt(sum((g.pow(2).sum() for g in gs if g is not None), torch.tensor(0.0))))

        ratios: dict[str, list[float]] = {"mean": [], "log": []}
        fp_loss = FPLoss(f, lam=1.0, gb_scale=scale, readout=args.readout)
        for i in range(0, len(clean), 32):
            sl = slice(i, i + 32)
            den = D(noisy[sl])
            total, _ = fp_loss(den, noisy[sl], clean[sl], gb_clean[sl])
            res_mean = FPLoss(None, mode="mse")(den, noisy[sl], clean[sl])[0]
            g_fp = grad_norm(total - res_mean)  # the FP term alone (it does not depend on the residual norm)
            for norm in ratios:
                res = FPLoss(None, mode="mse", residual_norm=norm)(den, noisy[sl], clean[sl])[0]
                ratios[norm].append(g_fp / max(grad_norm(res), 1e-30))
        rm, rl = float(np.mean(ratios["mean"])), float(np.mean(ratios["log"]))
        lam = args.transfer_lambda * rm / rl
        print(f"|grad FP| / |grad residual|: mean {rm:.3e}, log {rl:.3e}; lambda {args.transfer_lambda:.2e} "
              f"(mean) -> {lam:.2e} (log)")


if __name__ == "__main__":
    main()
