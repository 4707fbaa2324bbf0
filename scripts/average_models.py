"""Average the weights of several fine-tunes of one model (a "model soup").

    python scripts/average_models.py OUT.pt A.pt B.pt [C.pt ...] [--weights 0.5 0.25 0.25]

The denoisers are averaged; the restoration net f (the FP feature extractor) and the
normalisation are taken from the first checkpoint, and every f must be identical (the FP
feature is defined by one f). The training record of the first is kept with ``soup_of`` added.
Weights default to uniform and are normalised to sum 1.
"""

from __future__ import annotations

import argparse

from FPDenoiseLib.checkpoint import (
    average_models,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    state_hash,
)
from FPDenoiseLib.errors import CheckpointError


def _f_hash(net) -> str:
    """The restoration net's config and weights as loaded (float32): a shipped file stores f in float16,
    a training run that started from it holds the same f in float32."""
    return state_hash({"config": net.config, "weights": net.state_dict()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dst")
    ap.add_argument("src", nargs="+")
    ap.add_argument("--weights", type=float, nargs="+", help="one per SRC (default: uniform)")
    args = ap.parse_args()
    cks = [load_checkpoint(p) for p in args.src]
    models = {"denoiser": average_models(cks, "denoiser", weights=args.weights)}
    if "restoration" in cks[0]["models"]:
        f = model_from_checkpoint(cks[0], "restoration")
        ref = _f_hash(f)
        for p, c in zip(args.src[1:], cks[1:]):  # noqa: B905
            if "restoration" not in c["models"] or _f_hash(model_from_checkpoint(c, "restoration")) != ref:
                raise CheckpointError(f"{p}: its restoration net differs from {args.src[0]}'s")
        models["restoration"] = f
    training = {**cks[0].get("training", {}), "soup_of": [
        {"path": p, "sha256": c["sha256"], "weight": w}
        for p, c, w in zip(args.src, cks, args.weights or [1.0] * len(cks))  # noqa: B905
    ]}
    path = save_checkpoint(args.dst, models, normalization=cks[0]["normalization"], training=training)
    print(f"{path}: average of {len(cks)} denoisers")


if __name__ == "__main__":
    main()
