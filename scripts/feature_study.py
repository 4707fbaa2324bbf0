#!/usr/bin/env python3
"""Which Guided-Backprop readout makes a useful feature map? Measured on real chest CT.

GB of the frozen restoration net ``f`` is ``dR(f, y)/dy`` with guided ReLUs; the readout ``R``
decides what the map shows. ``f`` is trained clean -> clean (close to the identity), so the old
energy readout ``0.5*||f(y)||^2`` gives ``GB ~ J^T f(y) ~ y``: an intensity image. This script
compares candidate readouts on clean slices of pyradiomics' ``lung1_image.nrrd`` (lung2 is held out
for the benchmark) and writes ``docs/results/feature_study.md``.

For every candidate it reports:
  * Pearson corr. of |GB(clean)| with the clean intensity (want low), with the Sobel gradient
    magnitude (want high) and with a Frangi vesselness map;
  * per noise, the feature score ``corr(GB(clean), GB(method output))`` (signed maps, as
    ``metrics.feature_preservation``) of noisy input, mean 3x3, NL-means, BM3D (median 3x3 for
    salt & pepper) and the shipped denoiser, the Spearman rank correlation of those scores with
    SSIM across methods, and the gap ``score(best method) - score(noisy input)``;
  * the time of one GB map on a 512x512 slice (1 thread);
  * for every candidate, whether d/dtheta ||GB(D_theta(noisy)) - GB(clean)||^2 is non-zero and
    finite for a tiny denoiser (the linear readout ``sum f(y)`` must give exactly 0).

Data: download the pyradiomics 2.2.0 sdist (``pip download --no-deps --no-binary :all:
pyradiomics==2.2.0``) and pass the tarball or the extracted ``lung1_image.nrrd`` as ``--data``.

Usage:
    python scripts/feature_study.py --data /tmp/featstudy/pyradiomics-2.2.0.tar.gz
    python scripts/feature_study.py --data lung1_image.nrrd --slices 6 --crop 256 --out docs/results/feature_study.md
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from FPDenoiseLib.intensity import Normalizer  # noqa: E402
from FPDenoiseLib.metrics import feature_preservation, ssim  # noqa: E402
from FPDenoiseLib.models import UNet  # noqa: E402
from FPDenoiseLib.noise import add_noise  # noqa: E402
from FPDenoiseLib.xai import guided_mode  # noqa: E402

Readout = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- candidate readouts
def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(round(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    xp = F.pad(x, (r, r, r, r), mode="reflect")
    xp = F.conv2d(xp, k.view(1, 1, 1, -1))
    return F.conv2d(xp, k.view(1, 1, -1, 1))


def r_energy(f, y):
    return 0.5 * f(y).pow(2).sum()


def r_linear(f, y):
    return f(y).sum()


def r_grad_energy(f, y):
    o = f(y)
    dx = o[..., :, 1:] - o[..., :, :-1]
    dy = o[..., 1:, :] - o[..., :-1, :]
    return 0.5 * (dx.pow(2).sum() + dy.pow(2).sum())


def _r_highpass(sigma):
    def r(f, y):
        o = f(y)
        return 0.5 * (o - _gauss_blur(o, sigma)).pow(2).sum()

    return r


def _hooked(module_of: Callable[[torch.nn.Module], torch.nn.Module]) -> Readout:
    def r(f, y):
        store = []
        h = module_of(f).register_forward_hook(lambda _m, _i, out: store.append(out))
        try:
            f(y)
        finally:
            h.remove()
        return 0.5 * store[0].pow(2).sum()

    return r


CANDIDATES: dict[str, tuple[str, Readout]] = {
    "A energy": ("0.5*||f(y)||^2 (current)", r_energy),
    "B grad": ("0.5*||grad f(y)||^2, forward differences", r_grad_energy),
    "B hp1": ("0.5*||f - G_1*f||^2 (Gaussian high-pass, sigma 1 px)", _r_highpass(1.0)),
    "B hp2": ("0.5*||f - G_2*f||^2 (Gaussian high-pass, sigma 2 px)", _r_highpass(2.0)),
    "C bottleneck": ("0.5*||h||^2, h = deepest encoder level (1/16 res.)", _hooked(lambda f: f.downs[-1])),
    "C dec1/2": ("0.5*||h||^2, h = decoder level at 1/2 res.", _hooked(lambda f: f.ups[-2])),
    "C dec1": ("0.5*||h||^2, h = last decoder level (full res., before the 1x1 head)", _hooked(lambda f: f.ups[-1])),
}


def gb(f: torch.nn.Module, x: torch.Tensor, readout: Readout, create_graph: bool = False) -> torch.Tensor:
    with guided_mode(f), torch.enable_grad():
        xi = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(readout(f, xi), xi, create_graph=create_graph)
    return g if create_graph else g.detach()


def gb_np(f, imgs: list[np.ndarray], readout: Readout, batch: int = 3) -> list[np.ndarray]:
    out = []
    for i in range(0, len(imgs), batch):
        t = torch.from_numpy(np.stack(imgs[i : i + batch]).astype(np.float32))[:, None]
        out.extend(gb(f, t, readout)[:, 0].numpy().astype(np.float64))
    return out


# ----------------------------------------------------------------------------- data and methods
def load_lung1(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    if path.suffix == ".gz" or tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("data/lung1_image.nrrd"))
            data = tar.extractfile(member).read()
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "lung1_image.nrrd"
            p.write_bytes(data)
            return sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def method_outputs(noisy: np.ndarray, noise: str, denoiser: torch.nn.Module) -> dict[str, np.ndarray]:
    from bm3d import bm3d
    from skimage.restoration import denoise_nl_means, estimate_sigma

    sig = float(estimate_sigma(noisy))
    outs = {
        "noisy": noisy,
        "mean3": ndimage.uniform_filter(noisy, 3, mode="reflect"),
        "nlm": denoise_nl_means(noisy, h=0.8 * sig, sigma=sig, fast_mode=True, patch_size=5, patch_distance=6),
    }
    if noise == "s&p 0.5":
        outs["median3"] = ndimage.median_filter(noisy, 3, mode="reflect")
    else:
        outs["bm3d"] = np.asarray(bm3d(noisy, sigma_psd=max(sig, 1e-4)), dtype=np.float32)
    with torch.no_grad():
        outs["denoiser"] = denoiser(torch.from_numpy(noisy.astype(np.float32))[None, None])[0, 0].numpy()
    return {k: np.asarray(v, dtype=np.float32) for k, v in outs.items()}


def make_noisy(clean: np.ndarray, noise: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rng_ = float(clean.max() - clean.min())
    if noise == "gauss 2%":
        return (clean + 0.02 * rng_ * rng.standard_normal(clean.shape)).astype(np.float32)
    if noise == "gauss 5%":
        return (clean + 0.05 * rng_ * rng.standard_normal(clean.shape)).astype(np.float32)
    if noise == "s&p 0.5":
        return add_noise(clean, "salt_pepper", level=0.5, seed=seed).astype(np.float32)
    if noise == "poisson 0.5":
        return add_noise(clean, "poisson", level=0.5, seed=seed).astype(np.float32)
    raise ValueError(noise)


NOISES = ("gauss 2%", "gauss 5%", "s&p 0.5", "poisson 0.5")


# ----------------------------------------------------------------------------- gradient check
def fp_weight_grad(f: torch.nn.Module, readout: Readout) -> float:
    """sum |d/dtheta mean((GB(D(noisy)) - GB(clean))^2)| for a tiny residual U-Net D."""
    torch.manual_seed(0)
    d = UNet(base_channels=4, depth=2)
    torch.nn.init.normal_(d.head.weight, std=0.05)
    clean = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    for p in f.parameters():
        p.requires_grad_(False)
    fp = (gb(f, d(noisy), readout, create_graph=True) - gb(f, clean, readout)).pow(2).mean()
    grads = torch.autograd.grad(fp, list(d.parameters()), allow_unused=True)
    return float(sum(g.abs().sum() for g in grads if g is not None))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="pyradiomics-2.2.0.tar.gz or lung1_image.nrrd")
    ap.add_argument("--model", type=Path, default=ROOT / "Resources/Models/fpdenoise_default.pt")
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--crop", type=int, default=256, help="central crop size (0 = full 512x512 slice)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/feature_study.md")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--figure", type=Path, default=None, help="also write a PNG of |GB| for FIGURE_CANDIDATES (slice z=27)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    vol = load_lung1(args.data)
    norm = Normalizer.for_array(vol, modality="CT")
    z_idx = np.linspace(4, vol.shape[0] - 5, args.slices).round().astype(int)
    slices = []
    for z in z_idx:
        s = norm.forward(vol[z])
        if args.crop:
            h, w = s.shape
            c = args.crop
            s = s[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
        slices.append(np.ascontiguousarray(s, dtype=np.float32))
    ckpt = load_checkpoint(args.model)
    f = model_from_checkpoint(ckpt, "restoration").eval()
    for p in f.parameters():
        p.requires_grad_(False)
    den = model_from_checkpoint(ckpt, "denoiser").eval()
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    print(f"lung1 {vol.shape}, slices z={list(z_idx)}, crop={args.crop or 'none'}, candidates={names}", flush=True)

    # method outputs, SSIM: shared by all candidates
    from skimage.filters import frangi, sobel

    outputs: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in NOISES}
    ssims: dict[str, dict[str, list[float]]] = {n: {} for n in NOISES}
    for i, clean in enumerate(slices):
        dr = float(clean.max() - clean.min())
        for j, noise in enumerate(NOISES):
            outs = method_outputs(make_noisy(clean, noise, seed=100 * i + j), noise, den)
            outputs[noise].append(outs)
            for m, o in outs.items():
                ssims[noise].setdefault(m, []).append(ssim(clean, o, data_range=dr))
    print(f"method outputs done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    sob = [sobel(s) for s in slices]
    fra = [frangi(s, sigmas=(1, 2, 3), black_ridges=False) for s in slices]
    full = norm.forward(vol[z_idx[len(z_idx) // 2]])[None, None].copy()
    full_t = torch.from_numpy(full)

    base_int_sobel = float(np.mean([pearson(a, b) for a, b in zip(slices, sob)]))
    print(f"baseline corr(intensity, Sobel) = {base_int_sobel:+.2f}")
    rows = []
    per_noise: dict[str, dict[str, dict[str, float]]] = {}  # cand -> noise -> method -> mean score
    for name in names:
        desc, readout = CANDIDATES[name]
        gb(f, full_t[..., :64, :64], readout)  # warm-up
        t0 = time.perf_counter()
        gb(f, full_t, readout)
        t_gb = time.perf_counter() - t0
        gclean = gb_np(f, slices, readout)
        c_int = np.mean([pearson(np.abs(g), s) for g, s in zip(gclean, slices)])
        c_grad = np.mean([pearson(np.abs(g), s) for g, s in zip(gclean, sob)])
        c_fra = np.mean([pearson(np.abs(g), s) for g, s in zip(gclean, fra)])
        scores: dict[str, dict[str, float]] = {}
        for noise in NOISES:
            acc: dict[str, list[float]] = {}
            for i, outs in enumerate(outputs[noise]):
                ms = list(outs)
                gbs = gb_np(f, [outs[m] for m in ms], readout)
                for m, g in zip(ms, gbs):
                    acc.setdefault(m, []).append(feature_preservation(gclean[i], g))
            scores[noise] = {m: float(np.mean(v)) for m, v in acc.items()}
        per_noise[name] = scores
        rho = {}
        gap = {}
        for noise in NOISES:
            ms = list(scores[noise])
            fs = [scores[noise][m] for m in ms]
            ss = [float(np.mean(ssims[noise][m])) for m in ms]
            rho[noise] = float(stats.spearmanr(fs, ss)[0])
            gap[noise] = max(fs) - scores[noise]["noisy"]
        g_fp = fp_weight_grad(f, readout)
        rows.append(
            dict(name=name, desc=desc, c_int=c_int, c_grad=c_grad, c_fra=c_fra, rho=rho, gap=gap, t=t_gb, g=g_fp)
        )
        print(
            f"{name:13s} |GB|~I {c_int:+.2f}  ~|grad| {c_grad:+.2f}  ~frangi {c_fra:+.2f}  "
            + " ".join(f"[{n}: rho {rho[n]:+.2f} gap {gap[n]:+.3f}]" for n in NOISES)
            + f"  t512 {t_gb:.2f}s  dFP/dtheta {g_fp:.3g}  ({time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
    from FPDenoiseLib.xai import READOUTS, guided_backprop

    t = torch.from_numpy(slices[0])[None, None]
    for lib_name, cand in (("energy", "A energy"), ("gradient_energy", "B grad")):
        same = torch.allclose(guided_backprop(f, t, readout=lib_name), gb(f, t, CANDIDATES[cand][1]))
        print(f"xai.READOUTS[{lib_name!r}] == candidate {cand!r}: {same}")
    assert set(READOUTS) >= {"energy", "gradient_energy"}
    g_lin = fp_weight_grad(f, r_linear)
    print(f"linear readout sum f(y): dFP/dtheta = {g_lin!r}")

    if args.figure:
        write_figure(args.figure, norm.forward(vol[27]), f, FIGURE_CANDIDATES, args.crop or 512)
    write_markdown(args, z_idx, rows, per_noise, ssims, g_lin, base_int_sobel, time.perf_counter() - t_start)
    return 0


FIGURE_CANDIDATES = ["A energy", "B grad", "B hp1", "C bottleneck"]


def write_figure(path: Path, s: np.ndarray, f, names: list[str], crop: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = s.shape
    s = np.ascontiguousarray(s[(h - crop) // 2 : (h - crop) // 2 + crop, (w - crop) // 2 : (w - crop) // 2 + crop])
    fig, ax = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 4))
    ax[0].imshow(s, cmap="gray")
    ax[0].set_title("clean (lung1 z=27)")
    for a, n in zip(ax[1:], names):
        g = np.abs(gb_np(f, [s], CANDIDATES[n][1])[0])
        a.imshow(g, cmap="inferno", vmax=np.percentile(g, 99.5))
        a.set_title(f"|GB| {n}")
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=45)
    plt.close(fig)
    print(f"wrote {path}")


MARKER = "<!-- generated below by scripts/feature_study.py; edit above this line only -->"


def write_markdown(args, z_idx, rows, per_noise, ssims, g_lin, base_int_sobel, elapsed) -> None:
    buf = io.StringIO()
    w = buf.write
    # Keep the hand-written conclusion above the marker; everything below it is regenerated.
    head = args.out.read_text().split(MARKER)[0] if args.out.exists() else "# GB readout study\n\n"
    w(head + MARKER + "\n\n")
    w("## Setup\n\n")
    w(
        f"pyradiomics 2.2.0 `lung1_image.nrrd` (chest CT, 512x512x48), slices z = {', '.join(map(str, z_idx))}, "
        f"HU window -1024..3071 -> [0, 1], {'central ' + str(args.crop) + 'x' + str(args.crop) + ' crops' if args.crop else 'full slices'}. "
        f"f = restoration net of `{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}`. "
        f"Scores are means over the slices; Spearman rho is computed across the methods' mean scores vs mean SSIM. "
        f"Gap = best method's feature score - noisy input's. GB time: one 512x512 slice, {args.threads} thread(s), "
        f"on a shared 2-core machine. dFP/dtheta = sum |d/dtheta mean((GB(D(noisy)) - GB(clean))^2)| for a tiny "
        f"U-Net D on a 32x32 patch. Run time {elapsed / 60:.1f} min.\n\n"
    )
    w("## Candidates\n\n")
    w(
        "| readout | corr(\\|GB\\|, intensity) | corr(\\|GB\\|, Sobel) | corr(\\|GB\\|, Frangi) | "
        + " | ".join(f"rho {n}" for n in NOISES)
        + " | "
        + " | ".join(f"gap {n}" for n in NOISES)
        + " | GB 512² (s) | dFP/dθ |\n"
    )
    w("|" + "---|" * (6 + 2 * len(NOISES)) + "\n")
    for r in rows:
        w(
            f"| **{r['name']}**: {r['desc'].replace('|', chr(92) + '|')} | {r['c_int']:+.2f} | {r['c_grad']:+.2f} | {r['c_fra']:+.2f} | "
            + " | ".join(f"{r['rho'][n]:+.2f}" for n in NOISES)
            + " | "
            + " | ".join(f"{r['gap'][n]:+.3f}" for n in NOISES)
            + f" | {r['t']:.2f} | {r['g']:.3g} |\n"
        )
    w(f"\nFor reference, corr(intensity, Sobel magnitude) of the clean slices themselves = {base_int_sobel:+.2f}.\n")
    w(f"\nLinear readout `f(y).sum()`: dFP/dθ = {g_lin!r} (piecewise-constant GB, exactly zero).\n\n")
    w("## Per-noise feature scores (mean over slices)\n\n")
    for noise in NOISES:
        ms = list(ssims[noise])
        w(f"### {noise}\n\n| readout | " + " | ".join(ms) + " |\n|" + "---|" * (len(ms) + 1) + "\n")
        w("| *SSIM* | " + " | ".join(f"*{np.mean(ssims[noise][m]):.3f}*" for m in ms) + " |\n")
        for name, sc in per_noise.items():
            w(f"| {name} | " + " | ".join(f"{sc[noise][m]:.3f}" for m in ms) + " |\n")
        w("\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(buf.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
