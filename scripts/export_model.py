"""Make a shippable copy of a trained checkpoint: drop the resume state, store weights as float16.

    python scripts/export_model.py TRAINED.pt Resources/Models/fpdenoise_default.pt

float16 halves the file; weights are converted back to float32 on load. The content hash is
recomputed for the new file and the training record (incl. validation history) is kept.
``--map-fit`` and ``--residual-gate`` set what owns no weights: the denoiser's noise map fitted to
the local intensity (``FPDenoiseLib.models.fit_noise_map``) and the gate of its correction,
``tanh(gate * map)`` (larger: full correction at lower noise). ``--shipped`` sets both as the shipped
models have them (:data:`SHIPPED`); an explicit ``--residual-gate`` still wins.
"""

from __future__ import annotations

import argparse

import torch

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

#: the weightless settings of the shipped pair (stage 28 on; Resources/Models/README.md)
SHIPPED = {"map_fit": True, "residual_gate": 200.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--map-fit", action="store_true", help="resunet: fit the noise map to the local intensity")
    ap.add_argument("--residual-gate", type=float, default=None, help="resunet: the gate of the correction")
    ap.add_argument("--shipped", action="store_true",
                    help=f"the shipped models' settings: --map-fit --residual-gate {SHIPPED['residual_gate']:g}")
    args = ap.parse_args()
    if args.shipped:
        args.map_fit = args.map_fit or SHIPPED["map_fit"]
        if args.residual_gate is None:
            args.residual_gate = SHIPPED["residual_gate"]
    ck = load_checkpoint(args.src)
    cfg = ck["models"].get("denoiser", {}).get("config", {})  # a restoration-only checkpoint has none
    if (args.map_fit or args.residual_gate is not None) and cfg.get("arch") != "resunet":
        ap.error("--map-fit and --residual-gate need a resunet denoiser")
    if args.map_fit:
        cfg["map_fit"] = True
    if args.residual_gate is not None:
        if not args.residual_gate > 0:
            ap.error(f"--residual-gate must be > 0, got {args.residual_gate}")
        cfg["residual_gate"] = float(args.residual_gate)
    models = {name: model_from_checkpoint(ck, name) for name in ck["models"]}
    training = dict(ck.get("training", {}))
    training["exported_from"] = {"sha256": ck["sha256"], "dtype": args.dtype, "map_fit": args.map_fit,
                                 "residual_gate": cfg.get("residual_gate")}
    dtype = torch.float16 if args.dtype == "float16" else None
    path = save_checkpoint(args.dst, models, normalization=ck["normalization"], training=training, dtype=dtype)
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
