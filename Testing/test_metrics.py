"""Tests for FPDenoiseLib.metrics: agreement with scikit-image, edge cases, CI maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from skimage import data, transform
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from FPDenoiseLib.errors import InputError
from FPDenoiseLib.metrics import feature_preservation, mean_ci95, psnr, ssim


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    img = data.camera().astype(np.float64) / 255.0
    return transform.resize(img, (64, 64), anti_aliasing=True).astype(np.float32)


def _noisy(img: np.ndarray, sd: float, seed: int = 0) -> np.ndarray:
    return (img + np.random.default_rng(seed).normal(0, sd, img.shape)).astype(np.float32)


def test_psnr_equals_skimage_and_hu_range(clean):
    noisy = _noisy(clean, 0.05)
    assert psnr(clean, noisy, data_range=1.0) == pytest.approx(
        peak_signal_noise_ratio(clean.astype(np.float64), noisy.astype(np.float64), data_range=1.0), rel=1e-12
    )
    # Original units (CT in HU): same numbers scaled, explicit range -> identical PSNR.
    ref_hu, test_hu = clean * 4095.0 - 1024.0, noisy * 4095.0 - 1024.0
    assert psnr(ref_hu, test_hu, data_range=4095.0) == pytest.approx(psnr(clean, noisy, data_range=1.0), rel=1e-6)
    # Direct formula cross-check.
    mse = np.mean((clean.astype(np.float64) - noisy) ** 2)
    assert psnr(clean, noisy, data_range=1.0) == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-12)


def test_psnr_identical_is_inf_and_decreases_with_noise(clean):
    assert psnr(clean, clean.copy(), data_range=1.0) == math.inf
    values = [psnr(clean, _noisy(clean, sd), data_range=1.0) for sd in (0.01, 0.03, 0.1, 0.3)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_ssim_2d_equals_skimage_and_3d_is_slice_mean(clean):
    noisy = _noisy(clean, 0.1)
    assert ssim(clean, noisy, data_range=1.0) == pytest.approx(
        structural_similarity(clean.astype(np.float64), noisy.astype(np.float64), data_range=1.0), rel=1e-12
    )
    assert ssim(clean, clean, data_range=1.0) == pytest.approx(1.0)
    assert ssim(clean, noisy, data_range=1.0) < ssim(clean, _noisy(clean, 0.02), data_range=1.0) < 1.0
    vol_ref = np.stack([clean, clean[::-1], clean.T])
    vol_test = np.stack([_noisy(s, sd, i) for i, (s, sd) in enumerate(zip(vol_ref, (0.02, 0.1, 0.3)))])
    expected = np.mean(
        [structural_similarity(r.astype(np.float64), t.astype(np.float64), data_range=2.0) for r, t in zip(vol_ref, vol_test)]
    )
    assert ssim(vol_ref, vol_test, data_range=2.0) == pytest.approx(expected, rel=1e-12)


def test_metric_inputs_untouched(clean):
    a, b = clean.copy(), _noisy(clean, 0.1)
    a0, b0 = a.copy(), b.copy()
    psnr(a, b, data_range=1.0)
    ssim(a, b, data_range=1.0)
    feature_preservation(a, b)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_metric_input_errors(fn, clean):
    with pytest.raises(InputError, match="shape mismatch"):
        fn(clean, clean[:32], data_range=1.0)
    for bad in (0, -1.0, float("nan"), float("inf"), "wide"):
        with pytest.raises(InputError, match="data_range"):
            fn(clean, clean, data_range=bad)
    with pytest.raises(TypeError):
        fn(clean, clean)  # data_range is required, keyword-only
    nan_img = clean.copy()
    nan_img[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fn(clean, nan_img, data_range=1.0)
    with pytest.raises(InputError, match="2D or 3D"):
        fn(clean.ravel(), clean.ravel(), data_range=1.0)


def test_ssim_too_small():
    with pytest.raises(InputError, match="7x7"):
        ssim(np.zeros((5, 5)), np.zeros((5, 5)), data_range=1.0)


def test_feature_preservation():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(64, 64))
    assert feature_preservation(g, g) == pytest.approx(1.0)
    assert feature_preservation(g, 5 * g - 2) == pytest.approx(1.0)  # scale/offset free
    assert feature_preservation(g, -g) == pytest.approx(-1.0)
    assert abs(feature_preservation(g, rng.normal(size=(64, 64)))) < 0.05  # independent: ~0 (n=4096, sd ~0.016)
    partial = g + rng.normal(size=g.shape)  # half shared variance -> r = 1/sqrt(2)
    assert feature_preservation(g, partial) == pytest.approx(1 / np.sqrt(2), abs=0.03)
    assert feature_preservation(g, partial) == pytest.approx(np.corrcoef(g.ravel(), partial.ravel())[0, 1], rel=1e-10)
    # torch tensors (what xai.guided_backprop returns), with a (N, 1, H, W) shape
    t = torch.from_numpy(g).float().reshape(1, 1, 64, 64)
    assert feature_preservation(t, t * 2) == pytest.approx(1.0, abs=1e-6)
    # degenerate maps
    assert feature_preservation(np.zeros((8, 8)), np.zeros((8, 8))) == 1.0
    assert feature_preservation(np.zeros((8, 8)), g[:8, :8]) == 0.0
    with pytest.raises(InputError, match="shape mismatch"):
        feature_preservation(g, g[:32])
    with pytest.raises(InputError, match="NaN"):
        feature_preservation(g, np.full_like(g, np.nan))


def test_mean_ci95():
    m, lo, hi = mean_ci95([1.0, 2.0, 3.0])
    # by hand: sd = 1, sem = 1/sqrt(3), t(0.975, 2) = 4.302653
    assert m == 2.0
    assert hi - m == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    assert m - lo == pytest.approx(hi - m)
    vals = np.random.default_rng(2).normal(30.0, 2.0, size=50)
    m, lo, hi = mean_ci95(vals)
    ref_lo, ref_hi = stats.t.interval(0.95, len(vals) - 1, loc=vals.mean(), scale=stats.sem(vals))
    assert (m, lo, hi) == pytest.approx((vals.mean(), ref_lo, ref_hi), rel=1e-12)
    assert mean_ci95([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)
    m, lo, hi = mean_ci95([4.0])
    assert m == 4.0 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(InputError, match="at least one"):
        mean_ci95([])
    with pytest.raises(InputError, match="NaN or inf"):
        mean_ci95([1.0, math.inf])
