"""Make a shippable copy of a trained checkpoint: drop the resume state, store weights as float16.

    python scripts/export_model.py TRAINED.pt Resources/Models/fpdenoise_default.pt

float16 halves the file; weights are converted back to float32 on load. The content hash is
recomputed for the new file and the training record (incl. validation history) is kept.
``--map-fit`` and ``--residual-gate`` set what owns no weights: the denoiser's noise map fitted to
the local intensity (``FPDenoiseLib.models.fit_noise_map``) and the gate of its correction,
``tanh(gate * map)`` (larger: full correction at lower noise); ``--map-gain`` the scale of the estimated
noise map the net reads (a calibration: ``scripts/calibrate_map_gain.py``). ``--restoration-file NAME`` stores the
restoration net f once, in the restoration-only checkpoint NAME next to DST, and DST refers to it by
hash: the shipped models share one f (the FP feature), so it need not travel in each. An existing NAME
is reused only if it holds the same f. ``--shipped`` sets all three as the shipped models have them
(:data:`SHIPPED`); an explicit ``--residual-gate`` still wins.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from FPDenoiseLib.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    state_hash,
)

#: the weightless settings of the shipped models (stage 28 on; Resources/Models/README.md) and the
#: file of their shared restoration net
SHIPPED = {"map_fit": True, "residual_gate": 200.0, "restoration_file": "fpdenoise_restoration.pt"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--map-fit", action="store_true", help="resunet: fit the noise map to the local intensity")
    ap.add_argument("--residual-gate", type=float, default=None, help="resunet: the gate of the correction")
    ap.add_argument("--map-gain", type=float, default=None,
                    help="resunet: scale of the estimated noise map the net reads (1 = as trained; "
                         "scripts/calibrate_map_gain.py chooses it)")
    ap.add_argument("--restoration-file", default=None, metavar="NAME",
                    help="store f once in NAME next to DST (shared by the models exported with it)")
    ap.add_argument("--shipped", action="store_true",
                    help=f"the shipped models' settings: --map-fit --residual-gate {SHIPPED['residual_gate']:g} "
                         f"--restoration-file {SHIPPED['restoration_file']}")
    args = ap.parse_args()
    if args.shipped:
        args.map_fit = args.map_fit or SHIPPED["map_fit"]
        if args.residual_gate is None:
            args.residual_gate = SHIPPED["residual_gate"]
        if args.restoration_file is None:
            args.restoration_file = SHIPPED["restoration_file"]
    ck = load_checkpoint(args.src)
    cfg = ck["models"].get("denoiser", {}).get("config", {})  # a restoration-only checkpoint has none
    if (args.map_fit or args.residual_gate is not None or args.map_gain is not None) and cfg.get("arch") != "resunet":
        ap.error("--map-fit, --residual-gate and --map-gain need a resunet denoiser")
    if args.map_gain is not None:
        if not args.map_gain > 0:
            ap.error(f"--map-gain must be > 0, got {args.map_gain}")
        cfg.pop("map_gain", None)
        if args.map_gain != 1.0:  # 1 is the default: not stored, as in a freshly trained checkpoint
            cfg["map_gain"] = float(args.map_gain)
    if args.map_fit:
        cfg["map_fit"] = True
    if args.residual_gate is not None:
        if not args.residual_gate > 0:
            ap.error(f"--residual-gate must be > 0, got {args.residual_gate}")
        cfg["residual_gate"] = float(args.residual_gate)
    models = {name: model_from_checkpoint(ck, name) for name in ck["models"]}
    training = dict(ck.get("training", {}))
    training["exported_from"] = {"sha256": ck["sha256"], "dtype": args.dtype, "map_fit": args.map_fit,
                                 "residual_gate": cfg.get("residual_gate"), "map_gain": cfg.get("map_gain", 1.0)}
    dtype = torch.float16 if args.dtype == "float16" else None
    ref = None
    if args.restoration_file:
        if "restoration" not in models:
            ap.error(f"{args.src} has no restoration net to share")
        ref = share_restoration(Path(args.dst).parent / args.restoration_file, models.pop("restoration"),
                                ck["normalization"], dtype)
    path = save_checkpoint(args.dst, models, normalization=ck["normalization"], training=training, dtype=dtype,
                           restoration_ref=ref)
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


def share_restoration(fpath: Path, f: torch.nn.Module, normalization: dict, dtype: torch.dtype | None) -> dict:
    """Write f as a restoration-only checkpoint at ``fpath`` (or reuse the file there if it holds the
    same f at this dtype) and return the reference a model file stores instead of f."""
    # its content depends on f alone, so every model exported with this f names the same file and hash
    new = make_checkpoint({"restoration": f}, normalization=normalization,
                          training={"role": "restoration net f shared by the shipped models"}, dtype=dtype)
    if fpath.exists():
        old = load_checkpoint(fpath)
        if state_hash(old["models"].get("restoration")) != state_hash(new["models"]["restoration"]):
            raise SystemExit(f"{fpath} holds another restoration net; the models that share it must have one f "
                             "(remove it only if every model that refers to it is exported again)")
        return {"file": fpath.name, "sha256": old["sha256"]}
    atomic_torch_save(new, fpath)
    print(f"{fpath}: {fpath.stat().st_size / 1e6:.2f} MB (shared restoration net f)")
    return {"file": fpath.name, "sha256": new["sha256"]}


if __name__ == "__main__":
    main()
