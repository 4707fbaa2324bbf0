"""The default GB readout (``gradient_energy``) on a real chest CT slice with the shipped f.

Why these tests: the restoration net f is close to the identity, so a readout that explains
intensity (the legacy ``energy``) gives a map that is the image itself and a feature score that
cannot tell a noisy input from a denoised one. Each check below is also run on ``energy`` where it
must come out the other way, so the thresholds are shown to discriminate.
See ``docs/results/feature_study.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.filters import sobel

from FPDenoiseLib.losses import FPLoss
from FPDenoiseLib.metrics import feature_preservation
from FPDenoiseLib.models import GuidedReLU, UNet
from FPDenoiseLib.xai import DEFAULT_READOUT, READOUTS, guided_backprop

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "Resources/TestData/real_ct_lung1_slice.nrrd"
MODEL = ROOT / "Resources/Models/fpdenoise_default.pt"


@pytest.fixture(scope="module")
def ct_crop() -> np.ndarray:
    """Central 128x128 crop (mediastinum, vessels, lung) of the real slice, HU window -> [0, 1]."""
    import SimpleITK as sitk

    from FPDenoiseLib.intensity import Normalizer

    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(SLICE))).astype(np.float32)
    x = Normalizer.for_array(hu, modality="CT").forward(hu)
    return np.ascontiguousarray(x[192:320, 192:320])


@pytest.fixture(scope="module")
def f_shipped() -> torch.nn.Module:
    from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint

    f = model_from_checkpoint(load_checkpoint(MODEL), "restoration").eval()
    for p in f.parameters():
        p.requires_grad_(False)
    return f


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_default_readout_is_gradient_energy_and_energy_kept():
    assert DEFAULT_READOUT == "gradient_energy"
    assert {"energy", "gradient_energy"} <= set(READOUTS)
    with pytest.raises(ValueError, match="unknown GB readout"):
        guided_backprop(UNet(base_channels=4, residual=False), torch.rand(1, 1, 8, 8), readout="nope")
    with pytest.raises(ValueError, match="unknown GB readout"):
        FPLoss(UNet(base_channels=4, residual=False), readout="nope")


def test_gradient_energy_equals_hand_computation():
    """1x1-conv net: seed = D^T D f(y) (forward differences), then the guided rule per pixel."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 3, 1)
            self.act = GuidedReLU()
            self.c2 = torch.nn.Conv2d(3, 1, 1)

        def forward(self, x):
            return self.c2(self.act(self.c1(x)))

    net = Tiny()
    w1, b1 = np.array([1.0, -2.0, 0.5]), np.array([0.1, 0.3, -0.2])
    w2, b2 = np.array([0.7, 1.5, -1.0]), -0.05
    with torch.no_grad():
        net.c1.weight.copy_(torch.tensor(w1).view(3, 1, 1, 1))
        net.c1.bias.copy_(torch.tensor(b1))
        net.c2.weight.copy_(torch.tensor(w2).view(1, 3, 1, 1))
        net.c2.bias.fill_(b2)
    x = torch.tensor(np.random.default_rng(0).uniform(-1, 1, (1, 1, 5, 6)), dtype=torch.float32)
    gb = guided_backprop(net, x, readout="gradient_energy")[0, 0].numpy()

    xs = x[0, 0].numpy().astype(np.float64)
    pre = w1[:, None, None] * xs + b1[:, None, None]
    y = (w2[:, None, None] * np.maximum(pre, 0)).sum(0) + b2
    seed = np.zeros_like(y)
    dx, dy = np.diff(y, axis=1), np.diff(y, axis=0)
    seed[:, 1:] += dx
    seed[:, :-1] -= dx
    seed[1:, :] += dy
    seed[:-1, :] -= dy
    g_pre = np.maximum(w2[:, None, None] * seed, 0) * (pre > 0)
    np.testing.assert_allclose(gb, (w1[:, None, None] * g_pre).sum(0), rtol=1e-5, atol=1e-6)


def test_map_follows_edges_not_intensity(ct_crop, f_shipped):
    """(a) |GB| correlates with the Sobel gradient magnitude more than with intensity."""
    t = torch.from_numpy(ct_crop)[None, None]
    edges = sobel(ct_crop)
    gb = np.abs(guided_backprop(f_shipped, t)[0, 0].numpy())
    assert _corr(gb, edges) > _corr(gb, ct_crop) + 0.05
    legacy = np.abs(guided_backprop(f_shipped, t, readout="energy")[0, 0].numpy())
    assert _corr(legacy, ct_crop) > 0.9 > _corr(legacy, edges)  # the intensity map it replaces


def test_fp_gradient_reaches_denoiser(f_shipped):
    """(b) d FP / d theta is non-zero and finite through the shipped f with the default readout."""
    torch.manual_seed(0)
    d = UNet(base_channels=4, depth=2)
    torch.nn.init.normal_(d.head.weight, std=0.05)
    clean = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    loss = FPLoss(f_shipped, lam=1.0)
    assert loss.readout == DEFAULT_READOUT
    _, parts = loss(d(noisy), noisy, clean)
    fp = (guided_backprop(f_shipped, d(noisy), create_graph=True) - loss.gb_clean(clean)).pow(2).mean()
    grads = torch.autograd.grad(fp, list(d.parameters()), allow_unused=True)
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert parts["fp"] > 0 and np.isfinite(total) and total > 0


def test_linear_readout_gives_exactly_zero_fp_gradient(f_shipped):
    """(c) sum f(y) as readout: GB piecewise constant in y -> FP gradient exactly 0.0; guided mode
    is switched off again afterwards."""
    torch.manual_seed(0)
    d = UNet(base_channels=4, depth=2)
    torch.nn.init.normal_(d.head.weight, std=0.05)
    noisy = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    gb = guided_backprop(f_shipped, d(noisy), create_graph=True, readout=lambda out: out.sum())
    grads = torch.autograd.grad(gb.pow(2).mean(), list(d.parameters()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) == 0.0
    assert not any(m.guided for m in f_shipped.modules() if isinstance(m, GuidedReLU))


def test_feature_score_separates_noisy_from_filtered(ct_crop, f_shipped):
    """(d) Gaussian noise, sigma 5 % of the range: a 3x3 mean filter's feature score beats the
    noisy input's by a clear margin, and by far more than with the legacy energy readout."""
    rng = np.random.default_rng(0)
    noisy = (ct_crop + 0.05 * np.ptp(ct_crop) * rng.standard_normal(ct_crop.shape)).astype(np.float32)
    filtered = ndimage.uniform_filter(noisy, 3).astype(np.float32)
    t = torch.from_numpy(np.stack([ct_crop, noisy, filtered]))[:, None]

    def gap(readout: str) -> float:
        g = guided_backprop(f_shipped, t, readout=readout)[:, 0].numpy()
        return feature_preservation(g[0], g[2]) - feature_preservation(g[0], g[1])

    new, old = gap("gradient_energy"), gap("energy")
    # why the default changed: the energy readout's maps are mostly intensity, so noise barely moves
    # its score (0.011 with the first shipped f, 0.033 with the real-data f; gradient_energy ~2x)
    assert new > 0.04 and new > 1.5 * old, (new, old)


def test_step_edge_outshines_flat_region(f_shipped):
    """Issue 11: on a synthetic step edge beside flat regions, |GB| at the edge is >= 5x the flat
    regions' (160x measured with the shipped f); the legacy energy readout (an intensity map) is not."""
    x = np.full((64, 64), 0.2, np.float32)
    x[:, 32:] = 0.6  # vertical step between columns 31 and 32

    def edge_over_flat(readout: str) -> float:
        g = np.abs(guided_backprop(f_shipped, torch.from_numpy(x)[None, None], readout=readout)[0, 0].numpy())
        edge = g[8:56, 30:34].mean()
        flat = max(g[8:56, 8:24].mean(), g[8:56, 42:56].mean())  # dark side and bright side
        return float(edge / flat)

    assert edge_over_flat("gradient_energy") >= 5.0
    assert edge_over_flat("energy") < 5.0  # the check discriminates: an intensity map fails it


def test_feature_score_ranks_noisy_nlmeans_clean_on_real_slice(f_shipped):
    """Issue 11: whole real slice, Gaussian noise sigma = 5 % of the normalised range (205 HU):
    feature score noisy < NL-means < clean, and the clean image against itself is exactly 1.0.
    Measured: noisy 0.41, NL-means 0.85."""
    import SimpleITK as sitk

    from FPDenoiseLib.baselines import denoise
    from FPDenoiseLib.intensity import Normalizer

    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(SLICE))).astype(np.float32)
    clean = Normalizer.for_array(hu, modality="CT").forward(hu).astype(np.float32)
    assert clean.shape == (512, 512)
    noisy = (clean + 0.05 * np.random.default_rng(0).standard_normal(clean.shape)).astype(np.float32)
    nlm = denoise("nlmeans", noisy, sigma=0.05).astype(np.float32)
    g = guided_backprop(f_shipped, torch.from_numpy(np.stack([clean, noisy, nlm]))[:, None])[:, 0].numpy()
    s_noisy, s_nlm, s_clean = (feature_preservation(g[0], g[i]) for i in (1, 2, 0))
    assert s_clean == 1.0
    assert s_noisy + 0.1 < s_nlm < s_clean, (s_noisy, s_nlm)
