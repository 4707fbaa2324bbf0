"""Choose the noise-map gain of trained denoisers on calibration images (never the held-out patients).

A blind denoiser reads its own noise estimate. If the estimate runs low (the shipped default reads 0.925x
the true sigma of 2 % Gaussian noise on CT), the net removes less noise than it could. The gain g scales
the estimated map the net reads (``ResUNet(map_gain=g)``; 1 = as trained; ``estimate_noise`` stays the
measurement). This script runs the 13-type benchmark grid on the calibration images once, with every
model at every candidate gain on the same noisy inputs, and picks for all the given models together (a
FP / MSE pair gets one gain, so the ablation still differs only in the loss) the gain with the highest
mean PSNR over the cells among those that lose no cell by more than ``--max-loss`` dB against gain 1.

    python scripts/calibrate_map_gain.py Resources/Models/fpdenoise_default.pt \\
        Resources/Models/fpdenoise_mse_twin.pt --data data/real/train --out runs/gain

It prints the table and the export command that writes the gain into each file
(``scripts/export_model.py SRC DST --shipped --map-gain G``). Exit status 0.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from FPDenoiseLib.benchmark import run_benchmark
from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint


def with_gain(src: str, gain: float, dst: Path) -> Path:
    """A self-contained copy of checkpoint ``src`` (restoration net inside) whose denoiser reads its map x ``gain``."""
    ck = load_checkpoint(src)
    cfg = dict(ck["models"]["denoiser"]["config"])
    if cfg.get("arch") != "resunet":
        raise SystemExit(f"{src}: the map gain needs a resunet denoiser (noise-map input)")
    cfg.pop("map_gain", None)
    if gain != 1.0:
        cfg["map_gain"] = float(gain)
    ck["models"]["denoiser"]["config"] = cfg
    models = {name: model_from_checkpoint(ck, name) for name in ck["models"]}
    return save_checkpoint(dst, models, normalization=ck["normalization"], training=dict(ck.get("training", {})))


def cell_means(rows: list[dict]) -> dict[str, dict[tuple[str, str], float]]:
    """method -> (noise, level) -> mean PSNR over the images."""
    acc: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[r["method"]][(r["noise"], r["level"])].append(float(r["psnr_db"]))
    return {m: {k: float(np.mean(v)) for k, v in cells.items()} for m, cells in acc.items()}


def choose(means: dict[str, dict], models: list[str], gains: list[float], max_loss: float) -> tuple[float, list]:
    """The gain to ship and a table row per gain: (gain, mean change, worst cell change, worst cell)."""
    table = []
    for g in gains:
        diffs = [(means[f"{m}@{g:g}"][k] - means[f"{m}@1"][k], m, k) for m in models for k in means[f"{m}@1"]]
        worst = min(diffs)
        table.append((g, float(np.mean([d for d, _, _ in diffs])), worst[0], f"{worst[1]} {worst[2][0]} {worst[2][1]}"))
    allowed = [row for row in table if row[2] >= -max_loss]
    return max(allowed, key=lambda row: row[1])[0], table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="checkpoints calibrated together (e.g. the FP model and its MSE twin)")
    ap.add_argument("--data", default="data/real/train", help="calibration images (not the held-out patients)")
    ap.add_argument("--gains", type=float, nargs="+", default=[1.0, 1.05, 1.1, 1.15])
    ap.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--max-images", type=int, default=3)
    ap.add_argument("--max-loss", type=float, default=0.1, help="dB a single cell may lose against gain 1")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True, help="folder for the benchmark run (results.csv)")
    args = ap.parse_args(argv)
    gains = sorted({1.0, *args.gains})
    if min(gains) <= 0:
        ap.error("gains must be > 0")
    names = [Path(m).stem for m in args.models]
    with tempfile.TemporaryDirectory() as tmp:
        specs = [f"{n}@{g:g}={with_gain(m, g, Path(tmp) / f'{n}_{g:g}.pt')}"
                 for n, m in zip(names, args.models) for g in gains]  # noqa: B905
        run_benchmark(args.data, args.out, model=args.models[0], baseline_models=specs,
                      methods=[s.split("=", 1)[0] for s in specs], levels=args.levels, max_images=args.max_images,
                      seed=args.seed, device="cpu", progress=False, figures=False, feature_scores=False)
    with open(Path(args.out) / "results.csv", newline="") as fh:
        means = cell_means(list(csv.DictReader(fh)))
    best, table = choose(means, names, gains, args.max_loss)
    print(f"{len(next(iter(means.values())))} cells x {len(names)} models on {args.data} (max {args.max_images} images)")
    print("| gain | mean change, dB | worst cell, dB | worst cell |\n| ---: | ---: | ---: | --- |")
    for g, mean, worst, where in table:
        print(f"| {g:g} | {mean:+.3f} | {worst:+.3f} | {where} |")
    print(f"chosen gain: {best:g} (highest mean with no cell below -{args.max_loss:g} dB)")
    for m in args.models:
        print(f"  python scripts/export_model.py {m} {m} --shipped --map-gain {best:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
