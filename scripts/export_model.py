"""Make a shippable copy of a trained checkpoint: drop the resume state, store weights as float16.

    python scripts/export_model.py TRAINED.pt Resources/Models/fpdenoise_default.pt

float16 halves the file; weights are converted back to float32 on load. The content hash is
recomputed for the new file and the training record (incl. validation history) is kept.
"""

from __future__ import annotations

import argparse

import torch

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args()
    ck = load_checkpoint(args.src)
    models = {name: model_from_checkpoint(ck, name) for name in ck["models"]}
    training = dict(ck.get("training", {}))
    training["exported_from"] = {"sha256": ck["sha256"], "dtype": args.dtype}
    dtype = torch.float16 if args.dtype == "float16" else None
    path = save_checkpoint(args.dst, models, normalization=ck["normalization"], training=training, dtype=dtype)
    print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
