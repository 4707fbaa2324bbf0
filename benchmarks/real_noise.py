"""Real scanner noise: how much of a CT scanner's own noise each method removes (no clean reference).

The held-out benchmark (``quality.py``) adds white noise to nearly noise-free slices. Real CT noise
is different: it is spatially correlated by the reconstruction kernel (grain of a few pixels). This
check runs on native chest CTs that carry their scanner's noise (``data/real/realnoise``: RIDER Lung
CT 1.25 mm, LIDC-IDRI-0001 2.5 mm, LCTSC 3 mm; fetched by ``scripts/fetch_training_data.py``, never
trained on) and uses adjacent slices ``z`` and ``z + 1``, whose noise is independent while their
anatomy nearly matches:

- ``noise_sd``: std of ``(D(y_z) - D(y_z+1)) / sqrt(2)`` inside homogeneous soft tissue (HU units).
  For the untouched input this is the scanner noise plus the small anatomical change between slices;
  lower = more noise removed.
- ``n2n_rmse``: RMSE of ``D(y_z)`` against the *noisy* neighbour ``y_z+1`` inside the body (HU). The
  neighbour's noise is independent of ``D(y_z)``, so this ranks methods like an RMSE against the
  truth plus a constant (noise-to-noise); a filter that erases anatomy pays for it here.

Methods: the noisy input, ours and the MSE twin (blind), the shipped CT scanner-noise model
and white-noise CT models (``ct_texture``, ``gaussian_ct``, when they sit beside ``--model``), ``auto`` (with
the shipped default: the model
``--model auto`` picks for each volume), NL-means, median 5x5, wavelet and BM3D
(non-commercial licence: benchmark only), the filters with their sigma estimated from the slice, as a
user would run them.

Run (about 3 min on 2 CPU cores with BM3D; ``--extra NAME=CKPT`` adds a checkpoint to the comparison):
    python benchmarks/real_noise.py --data data/real/realnoise --out docs/results/real_noise
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from FPDenoiseLib import baselines
from FPDenoiseLib.inference import Denoiser, companion_models, default_model_path, shipped_name
from FPDenoiseLib.intensity import Normalizer
from FPDenoiseLib.io import atomic_path, find_images, read_image


def volumes(data: str) -> dict[str, np.ndarray]:
    """Every volume of two or more slices under ``data`` (HU, float32), by file name without extension."""
    out = {}
    for path in sorted(find_images(Path(data))):
        vol = np.asarray(read_image(path).array, dtype=np.float32)
        if vol.ndim == 3 and len(vol) >= 2:
            out[Path(path).name.split(".")[0]] = vol
    return out


def slice_pairs(vols: dict[str, np.ndarray], per_volume: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``per_volume`` evenly spaced adjacent-slice pairs of every volume."""
    out = []
    for name, vol in vols.items():
        zs = np.unique(np.linspace(0, len(vol) - 2, per_volume + 2).round().astype(int)[1:-1])
        out += [(f"{name}[{int(z)}]", vol[z], vol[z + 1]) for z in zs]
    return out


def masks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(homogeneous soft tissue, body) from the smoothed mean of the two slices."""
    m = ndimage.median_filter(0.5 * (a + b), size=7)
    soft = ndimage.binary_erosion((m > -100) & (m < 200), iterations=3)
    body = ndimage.binary_erosion(m > -500, iterations=2)
    return soft, body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/real/realnoise")
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--twin", default=None, help="MSE-only twin (default: the shipped twin beside --model)")
    p.add_argument("--per-volume", type=int, default=4)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--extra", action="append", default=[], metavar="NAME=CKPT",
                   help="another checkpoint to compare (repeatable), e.g. an experiment not shipped")
    p.add_argument("--no-bm3d", action="store_true")
    p.add_argument("--figure-pair", default=None, metavar="PAIR",
                   help='write figure.png of this pair, e.g. "rider_lung_ct[118]" (default: the middle pair of the last volume)')
    p.add_argument("--out", default="docs/results/real_noise")
    args = p.parse_args(argv)

    nets = {"ours": Denoiser(args.model, device="cpu", strength=args.strength)}
    beside = companion_models(args.model)  # the shipped twin and CT scanner-noise model (made for this case)
    if args.twin:
        beside["mse_twin"] = Path(args.twin)
    for name, path in beside.items():
        if path.exists():
            nets[name] = Denoiser(path, device="cpu", strength=args.strength)
    for spec in args.extra:
        name, _, ckpt = spec.rpartition("=")
        if not name or not Path(ckpt).is_file():
            print(f"error: --extra wants NAME=CKPT with an existing checkpoint, got {spec!r}", file=sys.stderr)
            return 2
        nets[name] = Denoiser(ckpt, device="cpu", strength=args.strength)
    classical = ["nlmeans", "median", "wavelet"] + ([] if args.no_bm3d else ["bm3d"])
    vols = volumes(args.data)
    pairs = slice_pairs(vols, args.per_volume)
    if not pairs:
        print(f"error: no CT volumes under {args.data} (run scripts/fetch_training_data.py)", file=sys.stderr)
        return 2
    picks = auto_picks(vols, nets) if Path(args.model).resolve() == default_model_path().resolve() else {}
    policy = nets["ours"].policy
    rows = []
    last = [n for n, _, _ in pairs if n.split("[")[0] == pairs[-1][0].split("[")[0]]
    fig_pair = args.figure_pair or last[len(last) // 2]
    fig_outs: dict[str, np.ndarray] = {}
    for name, a, b in pairs:
        norm = Normalizer.for_array(np.stack([a, b]), modality="CT", policy=policy)
        xa, xb = norm.forward(a), norm.forward(b)
        soft, body = masks(a, b)
        outs = {"noisy": (a, b, 0.0)}
        for m, den in nets.items():
            t0 = time.perf_counter()
            ya, yb = (norm.inverse(den.denoise_normalized(x)) for x in (xa, xb))
            outs[m] = (ya, yb, (time.perf_counter() - t0) / 2)
        for m in classical:
            t0 = time.perf_counter()
            ya, yb = (norm.inverse(baselines.denoise(m, x)) for x in (xa, xb))
            outs[m] = (ya, yb, (time.perf_counter() - t0) / 2)
        if picks:  # the product's automatic choice: the picked model's own outputs
            outs["auto"] = outs[picks[name.split("[")[0]]]
        if name == fig_pair:
            fig_outs = {m: v[0] for m, v in outs.items()}
        for m, (ya, yb, sec) in outs.items():
            rows.append({
                "pair": name, "method": m,
                "noise_sd": float(((ya - yb) / np.sqrt(2))[soft].std()),
                "n2n_rmse": float(np.sqrt(np.mean((ya - b)[body] ** 2))),
                "seconds": sec,
            })
        print(f"{name:28s} " + " ".join(f"{r['method']}={r['noise_sd']:.1f}/{r['n2n_rmse']:.1f}"
                                        for r in rows[-len(outs):]), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "real_noise.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if fig_outs:
        figure(fig_outs, fig_pair, out / "figure.png")
    md = render(rows, args, pairs, picks)
    with atomic_path(out / "real_noise.md") as tmp:
        Path(tmp).write_text(md)
    print(md)
    return 0


def auto_picks(vols: dict[str, np.ndarray], nets: dict) -> dict[str, str]:
    """Per volume, the method that ``--model auto`` runs on it ("ours", "ct_texture" or "gaussian_ct"; {} without
    the CT models)."""
    if not {"ct_texture", "gaussian_ct"} <= set(nets):
        return {}
    auto = Denoiser("auto", device="cpu")
    picks = {}
    for name, vol in vols.items():
        chosen = auto.choose(vol, modality="CT")[0]
        picks[name] = "ours" if chosen.model is auto.model else shipped_name(chosen.checkpoint_path)
    return picks


def figure(outs: dict[str, np.ndarray], title: str, path: Path) -> None:
    """The central 40 % of one slice for every method, soft-tissue window (-160..240 HU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = next(iter(outs.values())).shape
    crop = (slice(int(0.3 * h), int(0.7 * h)), slice(int(0.3 * w), int(0.7 * w)))
    fig, ax = plt.subplots(1, len(outs), figsize=(4 * len(outs), 4.4))
    for a, (m, y) in zip(np.atleast_1d(ax), outs.items()):
        a.imshow(y[crop], cmap="gray", vmin=-160, vmax=240)
        a.set_title(m)
        a.axis("off")
    fig.suptitle(f"{title}: real scanner noise, soft-tissue window")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=60)
    plt.close(fig)


def render(rows: list[dict], args: argparse.Namespace, pairs: list, picks: dict | None = None) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    vols = list(dict.fromkeys(r["pair"].split("[")[0] for r in rows))
    lines = [f"# Real scanner noise ({len(pairs)} adjacent-slice pairs from {', '.join(vols)})", "",
             f"Model `{Path(args.model).name}`, strength {args.strength}. noise SD: std of the difference of the two",
             "denoised neighbours / sqrt 2 in homogeneous soft tissue (HU, lower = more noise removed); n2n RMSE:",
             "RMSE against the noisy neighbour slice in the body (HU; lower = closer to the anatomy). Per volume,",
             "then the share of the input's noise SD left. `figure.png`: one slice, every method.",
             *([f"Also compared (not shipped): {', '.join(args.extra)}."] if args.extra else []),
             *([f"auto: what `--model auto` runs on each volume ({', '.join(f'{v}: {m}' for v, m in picks.items())})."]
               if picks else []), "",
             "| method | " + " | ".join(f"{v} noise SD / n2n RMSE" for v in vols) + " | noise left (mean) | s / slice |",
             "| --- | " + " | ".join("---:" for _ in vols) + " | ---: | ---: |"]
    base = {v: np.mean([r["noise_sd"] for r in rows if r["method"] == "noisy" and r["pair"].startswith(v + "[")])
            for v in vols}
    for m in methods:
        cells, left = [], []
        for v in vols:
            rs = [r for r in rows if r["method"] == m and r["pair"].startswith(v + "[")]
            sd, n2n = np.mean([r["noise_sd"] for r in rs]), np.mean([r["n2n_rmse"] for r in rs])
            cells.append(f"{sd:.1f} / {n2n:.1f}")
            left.append(sd / base[v])
        sec = np.mean([r["seconds"] for r in rows if r["method"] == m])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * np.mean(left):.0f} % | {sec:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
