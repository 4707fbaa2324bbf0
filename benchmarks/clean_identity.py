"""Clean images through the models, per modality, on patients never trained on; and the noise estimate.

A shipped model must leave a clean image alone (PSNR against itself >= 50 dB, no mean shift) on every
held-out slice, whatever the modality. For each ``--model``:

- ``CT``: the held-out CT slices of ``benchmarks/quality.py`` (``--ct``: pyradiomics lung2 and the J2K head);
- ``MR``: the held-out brain MRs (``--mr``: the ICBM152 2009a T1 template and dipy's T1 slice, fetched by
  ``scripts/fetch_training_data.py`` into ``data/real/heldout_mr``; the only training MR is pyradiomics
  brain1 / brain2), slices drawn as ``fpdenoise benchmark --max-images 8 --seed 0`` draws them;
- the noise map's median in the object, on the clean MR slices (normalised units: what made the denoiser act);
- ``sigma ratio``: the estimated / true sigma of white Gaussian noise at 0.5-10 % of the range on the
  committed lung1 test slice (a training patient; ``Testing/test_quality.py`` asks 0.8-1.2 at 1-10 %), since
  an estimator that reads clean anatomy as clean can read faint noise as clean too.

PSNR is in the image's own units with the slice's range; values above 100 dB print as 100 (identical).

    python benchmarks/clean_identity.py Resources/Models/fpdenoise_default.pt Resources/Models/fpdenoise_mse_twin.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import held_out_slices  # noqa: E402

from FPDenoiseLib.benchmark import load_benchmark_images  # noqa: E402
from FPDenoiseLib.inference import Denoiser  # noqa: E402
from FPDenoiseLib.intensity import Normalizer  # noqa: E402
from FPDenoiseLib.io import read_image  # noqa: E402
from FPDenoiseLib.metrics import psnr  # noqa: E402

TEST_SLICE = Path(__file__).resolve().parents[1] / "Resources/TestData/real_ct_lung1_slice.nrrd"
PCTS = (0.5, 1, 2, 5, 10)


def clean_row(d: Denoiser, slices: list[tuple[str, np.ndarray]], modality: str) -> tuple[list[float], list[float]]:
    """PSNR (capped at 100) and mean shift in the object (% of the slice's range) of each clean slice."""
    ps, shifts = [], []
    for _, x in slices:
        r = float(x.max() - x.min())
        y = d.denoise_array(x.copy(), modality=modality)
        ps.append(min(psnr(x, y, data_range=r), 100.0))
        body = x > (-500 if modality == "CT" else x.min() + 0.1 * r)
        shifts.append(100 * float((y - x)[body].mean()) / r)
    return ps, shifts


def sigma_ratios(d: Denoiser) -> list[float]:
    real = read_image(TEST_SLICE).array[0].astype(np.float32)
    x = Normalizer.for_array(real, modality="CT").forward(real)
    body = real > -500
    out = []
    for pct in PCTS:
        sigma = pct / 100 * float(x.max() - x.min())
        noisy = x + np.random.default_rng(int(pct * 10)).normal(0, sigma, x.shape).astype(np.float32)
        out.append(float(np.median(d.noise_map_normalized(noisy)[body])) / sigma)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--ct", default="data/real/heldout")
    p.add_argument("--mr", default="data/real/heldout_mr")
    p.add_argument("--per-volume", type=int, default=6, help="CT slices per volume (quality.py's default)")
    args = p.parse_args(argv)
    ct = held_out_slices(args.ct, args.per_volume)
    mr_imgs = load_benchmark_images(args.mr, max_images=8, seed=0)
    mr = [(f"{Path(b.source).stem}[{b.index}]", b.normalizer.inverse(b.clean).astype(np.float32)) for b in mr_imgs]
    print(f"{len(ct)} CT slices from {args.ct}; {len(mr)} MR slices from {args.mr}: {', '.join(n for n, _ in mr)}")
    print("| model | CT clean dB min / mean | CT shift % | MR clean dB min / mean | MR shift % | MR map median "
          "(max) | sigma ratio at " + " / ".join(f"{q:g}" for q in PCTS) + " % |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        d = Denoiser(model, device="cpu")
        cp, cs = clean_row(d, ct, "CT")
        mp, ms = clean_row(d, mr, "MR")
        maps = [float(np.median(d.noise_map_normalized(b.clean[None])[0][b.clean > 0.1])) for b in mr_imgs]
        print(f"| {Path(model).name} | {min(cp):.1f} / {np.mean(cp):.1f} | {max(cs, key=abs):+.3f} | "
              f"{min(mp):.1f} / {np.mean(mp):.1f} | {max(ms, key=abs):+.3f} | {np.median(maps):.4f} ({max(maps):.4f}) | "
              + " / ".join(f"{v:.2f}" for v in sigma_ratios(d)) + " |", flush=True)
        print(f"  MR per slice: {', '.join(f'{n} {v:.1f}' for (n, _), v in zip(mr, mp))}", flush=True)  # noqa: B905
    return 0


if __name__ == "__main__":
    sys.exit(main())
