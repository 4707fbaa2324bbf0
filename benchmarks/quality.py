"""Denoising quality on held-out real CT: the figures behind the README's summary.

Cases (each on the same held-out slices; patients never used for training):

- ``clean``: the clean slice itself (noise level 0). The shipped model must leave it alone:
  PSNR(ours(clean), clean) >= 50 dB and mean HU shift inside the body <= 2 HU.
- ``gauss2`` / ``gauss5``: white Gaussian noise, sigma = 2 % / 5 % of the slice's HU range.
- ``poisson200``: photon-counting noise, 200 photons at the slice's full scale
  (``y = Poisson(200 * (x - min) / range) / 200 * range + min``).
- ``ctcorr``: a CT scanner's noise texture (``ct_correlated`` at level 0.5: white noise shaped by the
  filtered-back-projection NPS, in the CT window's units), the case the CT scanner-noise model is for.

Methods: the noisy input, ours (single pass and ``--ensemble`` flips/rotations), the MSE-only
twin, the CT scanner-noise model (``ct_texture``) and the white-noise CT model (``gaussian_ct``; each when it
sits beside ``--model``), ``auto``
(with the shipped default: the model ``--model auto`` picks for each noisy slice, the GUIs' starting choice;
``auto_x8``: the same choice with ``--ensemble``), BM3D (true sigma for Gaussian, estimated otherwise; non-commercial licence: benchmark
only), NL-means, median 5x5 and wavelet (baselines of ``FPDenoiseLib.baselines``; the filters'
sigma is estimated from the noisy slice, as a user would run them). PSNR/SSIM in HU with
``data_range`` = the clean slice's HU range; 95 % CI over slices (Student t).

Run (about 10 min on 2 CPU cores with BM3D on 7 slices):
    python benchmarks/quality.py --data data/real/heldout --out docs/results/quality
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from FPDenoiseLib import baselines
from FPDenoiseLib.inference import Denoiser, companion_models, default_model_path, shipped_name
from FPDenoiseLib.intensity import Normalizer
from FPDenoiseLib.io import atomic_path, find_images, read_image
from FPDenoiseLib.metrics import mean_ci95, psnr, ssim

CASES = ("clean", "gauss2", "gauss5", "poisson200", "ctcorr")  # append only: a case's index seeds its noise


def held_out_slices(data: str, per_volume: int) -> list[tuple[str, np.ndarray]]:
    """``per_volume`` evenly spaced axial slices (HU, float32) of every CT volume under ``data``."""
    out = []
    for path in sorted(find_images(Path(data))):
        img = read_image(path)
        vol = np.asarray(img.array, dtype=np.float32)
        vol = vol[None] if vol.ndim == 2 else vol
        idx = np.unique(np.linspace(0, len(vol) - 1, min(per_volume, len(vol)) + 2).round().astype(int)[1:-1])
        idx = idx if len(idx) else np.array([0])
        out += [(f"{Path(path).stem}[{int(z)}]", vol[int(z)]) for z in idx]
    return out


def corrupt(clean: np.ndarray, case: str, seed: int) -> tuple[np.ndarray, float | None]:
    """Noisy slice in HU and the true noise sigma (HU) where one exists."""
    rng = np.random.default_rng(seed)
    lo, hi = float(clean.min()), float(clean.max())
    rng_hu = hi - lo
    if case == "clean":
        return clean.copy(), 0.0
    if case in ("gauss2", "gauss5"):
        sigma = (0.02 if case == "gauss2" else 0.05) * rng_hu
        return (clean + rng.normal(0.0, sigma, clean.shape)).astype(np.float32), sigma
    if case == "poisson200":
        lam = 200.0 * (clean - lo) / rng_hu
        return (rng.poisson(lam) / 200.0 * rng_hu + lo).astype(np.float32), None
    if case == "ctcorr":
        from FPDenoiseLib.noise import add_noise

        norm = Normalizer.for_array(clean, modality="CT")
        return norm.inverse(add_noise(norm.forward(clean), "ct_correlated", level=0.5, seed=rng)), None
    raise ValueError(case)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/real/heldout")
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--twin", default=None, help="MSE-only twin checkpoint (default: the shipped twin if present)")
    p.add_argument("--per-volume", type=int, default=6)
    p.add_argument("--ensemble", type=int, default=8)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--no-bm3d", action="store_true")
    p.add_argument("--out", default="docs/results/quality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-classical", default=None, metavar="CSV",
                   help="take the classical methods' rows from an earlier quality.csv of the same slices and seed "
                        "(they do not depend on the model; BM3D is the slow part). Their seconds are that run's.")
    args = p.parse_args(argv)

    beside = companion_models(args.model)  # the shipped twin and CT scanner-noise model
    if args.twin:
        beside["mse_twin"] = Path(args.twin)
    ours = Denoiser(args.model, device="cpu")
    ours_ens = Denoiser(args.model, device="cpu", ensemble=args.ensemble)
    nets = {"ours": ours, f"ours_x{args.ensemble}": ours_ens}
    for name, path in beside.items():
        if path.exists():
            nets[name] = Denoiser(path, device="cpu")
    # the product's automatic choice (the GUIs' starting model): per slice, the default or a CT model
    with_auto = ({"ct_texture", "gaussian_ct"} <= set(nets)
                 and Path(args.model).resolve() == default_model_path().resolve())
    auto = ours.as_auto() if with_auto else None
    classical = ["nlmeans", "median", "wavelet"] + ([] if args.no_bm3d else ["bm3d"])
    reused: dict[tuple[str, str, str], dict] = {}
    if args.reuse_classical:
        with open(args.reuse_classical, newline="") as fh:
            for r in csv.DictReader(fh):
                if r["method"] in classical:
                    reused[(r["slice"], r["case"], r["method"])] = {
                        k: (v if k in ("slice", "case", "method") else float(v)) for k, v in r.items()}
    slices = held_out_slices(args.data, args.per_volume)
    print(f"{len(slices)} held-out slices from {args.data}; methods: noisy, {', '.join(nets)}, {', '.join(classical)}",
          file=sys.stderr)
    rows = []
    for si, (name, clean) in enumerate(slices):
        norm = Normalizer.for_array(clean, modality="CT", policy=ours.policy)
        body = clean > -500
        rng_hu = float(clean.max() - clean.min())
        for case in args.cases:
            # seeded by the case's place in CASES, not in --cases: a subset run draws the same noise
            # (and --reuse-classical rows stay valid for it)
            noisy, sigma = corrupt(clean, case, seed=args.seed * 1000 + si * 10 + CASES.index(case))
            xn = norm.forward(noisy)
            first = len(rows)
            outs: dict[str, tuple[np.ndarray, float]] = {"noisy": (noisy, 0.0)}
            for m, den in nets.items():
                t0 = time.perf_counter()
                y = den.denoise_normalized(xn)
                outs[m] = (norm.inverse(y), time.perf_counter() - t0)
            if auto is not None:
                t0 = time.perf_counter()
                chosen = auto.choose(noisy, modality="CT")[0]
                t_choose = time.perf_counter() - t0
                picked = "ours" if chosen.model is auto.model else shipped_name(chosen.checkpoint_path)
                outs["auto"] = (outs[picked][0], outs[picked][1] + t_choose)
                # the same choice with --ensemble (the GUIs' "Best" quality): its model, N passes
                ens = f"ours_x{args.ensemble}"
                if picked == "ours":
                    outs[f"auto_x{args.ensemble}"] = (outs[ens][0], outs[ens][1] + t_choose)
                else:
                    chosen = copy.copy(chosen)  # shares the nets
                    chosen.ensemble = args.ensemble
                    t0 = time.perf_counter()
                    y = norm.inverse(chosen.denoise_normalized(xn))
                    outs[f"auto_x{args.ensemble}"] = (y, time.perf_counter() - t0 + t_choose)
            if case != "clean":
                sig_n = None if sigma is None else sigma / (norm.hi - norm.lo)
                for m in classical:
                    if (name, case, m) in reused:
                        continue
                    t0 = time.perf_counter()
                    y = baselines.denoise(m, xn, sigma=sig_n if m == "bm3d" else None)
                    outs[m] = (norm.inverse(y), time.perf_counter() - t0)
            for m, (y, sec) in outs.items():
                rows.append({
                    "slice": name, "case": case, "method": m,
                    "psnr": min(psnr(clean, y, data_range=rng_hu), 100.0),
                    "ssim": ssim(clean, y, data_range=rng_hu),
                    "hu_shift_body": float((y - clean)[body].mean()) if body.any() else 0.0,
                    "rmse_hu": float(np.sqrt(np.mean((y - clean) ** 2))),
                    "seconds": sec,
                })
            rows += [reused[(name, case, m)] for m in classical if case != "clean" and (name, case, m) in reused]
            best = max(rows[first:], key=lambda r: r["psnr"])
            print(f"{name:28s} {case:10s} " + " ".join(f"{r['method']}={r['psnr']:.2f}" for r in rows[first:])
                  + f"  best={best['method']}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "quality.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = render(rows, args, slices, ours.precision)
    with atomic_path(out / "quality.md") as tmp:
        Path(tmp).write_text(md)
    with atomic_path(out / "run.json") as tmp:
        Path(tmp).write_text(json.dumps({"model": args.model, "twin": str(beside["mse_twin"]) if "mse_twin" in nets else None,
                                         "data": args.data, "slices": [s for s, _ in slices], "seed": args.seed,
                                         "classical_rows_from": args.reuse_classical, "precision": ours.precision},
                                        indent=1))
    print(md)
    return 0


def render(rows: list[dict], args: argparse.Namespace, slices: list, precision: str) -> str:
    """The markdown tables; ``precision``: what --precision auto (the default) resolved to here."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"# Quality on held-out real CT ({len(slices)} slices: {', '.join(s for s, _ in slices)})", "",
             "PSNR in dB (HU, data range = clean slice range), mean and 95 % CI over slices; "
             "`benchmarks/quality.py` " + " ".join(sys.argv[1:]) + f"; learned models in {precision} "
             "(the default precision on this CPU)", ""]
    for metric, fmt in (("psnr", "{:.2f}"), ("ssim", "{:.4f}")):
        lines += [f"## {metric.upper()}", "", "| case | " + " | ".join(methods) + " |",
                  "| --- |" + " ---: |" * len(methods)]
        for case in args.cases:
            cells = []
            for m in methods:
                v = [r[metric] for r in rows if r["case"] == case and r["method"] == m]
                if not v:
                    cells.append("—")
                    continue
                mean, lo, hi = mean_ci95(v)
                cells.append(fmt.format(mean) + f" ± {fmt.format((hi - lo) / 2)}" if len(v) > 1 else fmt.format(mean))
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        lines.append("")
    clean = [r for r in rows if r["case"] == "clean" and r["method"] != "noisy"]
    if clean:
        lines += ["## Clean input (level 0)", "", "| method | min PSNR (dB) | max abs mean HU shift in body | max RMSE (HU) |",
                  "| --- | ---: | ---: | ---: |"]
        for m in dict.fromkeys(r["method"] for r in clean):
            rr = [r for r in clean if r["method"] == m]
            lines.append(f"| {m} | {min(r['psnr'] for r in rr):.2f} | {max(abs(r['hu_shift_body']) for r in rr):.2f} | "
                         f"{max(r['rmse_hu'] for r in rr):.1f} |")
        lines.append("")
    lines += ["## Seconds per slice (this run, 2 CPU cores)", "", "| method | median s |", "| --- | ---: |"]
    for m in methods:
        if m == "noisy":
            continue
        v = [r["seconds"] for r in rows if r["method"] == m and r["case"] != "clean"]
        if v:
            lines.append(f"| {m} | {float(np.median(v)):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
