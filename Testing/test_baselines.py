"""Tests for FPDenoiseLib.baselines: contract (shape/dtype/no mutation/errors) and denoising sanity."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data, transform
from skimage.restoration import estimate_sigma

from FPDenoiseLib import baselines
from FPDenoiseLib.baselines import (
    BASELINE_PARAMS,
    BASELINES,
    apply_slicewise,
    denoise,
    estimate_noise_sigma,
    time_method,
)
from FPDenoiseLib.errors import InputError

EXPECTED_NAMES = (
    "bm3d", "nlmeans", "bilateral", "wavelet", "gaussian", "mean", "median", "wiener", "filter_combination",
)
# BM3D is ~1 s on 128x128 with 2 cores; it gets its own 64x64 test below.
FAST = [n for n in EXPECTED_NAMES if n != "bm3d"]


def _camera(size: int) -> np.ndarray:
    img = data.camera().astype(np.float64) / 255.0
    img = transform.resize(img, (size, size), anti_aliasing=True)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return _camera(128)


@pytest.fixture(scope="module")
def gauss_noisy(clean) -> np.ndarray:
    return (clean + np.random.default_rng(0).normal(0, 0.1, clean.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def salt_pepper(clean) -> np.ndarray:
    u = np.random.default_rng(1).random(clean.shape)
    out = clean.copy()
    out[u < 0.05] = 0.0
    out[u > 0.95] = 1.0
    return out


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


def test_registry_and_params():
    assert tuple(BASELINES) == EXPECTED_NAMES
    assert set(BASELINE_PARAMS) == set(BASELINES)
    assert all(isinstance(v, str) and len(v) > 20 for v in BASELINE_PARAMS.values())
    assert "0.8*sigma" in BASELINE_PARAMS["nlmeans"]
    assert "BayesShrink" in BASELINE_PARAMS["wavelet"]


@pytest.mark.parametrize("name", FAST)
def test_contract_and_reduces_gaussian_noise(name, clean, gauss_noisy):
    fn = BASELINES[name]
    before = gauss_noisy.copy()
    out = fn(gauss_noisy)
    np.testing.assert_array_equal(gauss_noisy, before)  # input untouched
    assert out.shape == gauss_noisy.shape and out.dtype == np.float32
    assert out is not gauss_noisy and not np.shares_memory(out, gauss_noisy)
    assert np.isfinite(out).all()
    noisy_mse = _mse(gauss_noisy, clean)
    assert _mse(out, clean) < 0.6 * noisy_mse, (name, _mse(out, clean), noisy_mse)
    # float64 and C/F-order inputs give the same result
    np.testing.assert_allclose(fn(np.asfortranarray(gauss_noisy.astype(np.float64))), out, atol=1e-5)


@pytest.mark.parametrize("name", ["nlmeans", "bilateral", "wavelet", "wiener"])
def test_sigma_none_uses_estimate_sigma(name, gauss_noisy):
    fn = BASELINES[name]
    s = float(estimate_sigma(gauss_noisy.astype(np.float64)))
    assert s == pytest.approx(0.1, rel=0.15)
    np.testing.assert_array_equal(fn(gauss_noisy), fn(gauss_noisy, sigma=s))
    # and sigma is really used: a much larger sigma smooths more
    assert np.std(fn(gauss_noisy, sigma=0.5)) < np.std(fn(gauss_noisy, sigma=0.02))


def test_estimate_noise_sigma(gauss_noisy, clean):
    assert estimate_noise_sigma(gauss_noisy) == pytest.approx(0.1, rel=0.15)
    assert estimate_noise_sigma(np.full((32, 32), 0.3)) == baselines.SIGMA_FLOOR


def test_median_wins_on_salt_and_pepper(clean, salt_pepper):
    noisy = _mse(salt_pepper, clean)
    med = _mse(BASELINES["median"](salt_pepper), clean)
    gau = _mse(BASELINES["gaussian"](salt_pepper), clean)
    assert med < 0.2 * noisy
    assert med < gau


def test_filter_combination_is_the_sequential_chain(gauss_noisy):
    from scipy import ndimage

    x = gauss_noisy.astype(np.float64)
    expected = ndimage.gaussian_filter(ndimage.median_filter(ndimage.uniform_filter(x, 3), 3), 1.0)
    np.testing.assert_allclose(BASELINES["filter_combination"](gauss_noisy), expected, atol=1e-6)


def test_bm3d_runs_and_denoises():
    clean = _camera(64)
    noisy = (clean + np.random.default_rng(3).normal(0, 0.1, clean.shape)).astype(np.float32)
    before = noisy.copy()
    out = BASELINES["bm3d"](noisy, sigma=0.1)
    np.testing.assert_array_equal(noisy, before)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert _mse(out, clean) < 0.5 * _mse(noisy, clean)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_bad_input(name):
    fn = BASELINES[name]
    img = np.zeros((16, 16), np.float32)
    img[2, 2] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        fn(img)
    img[2, 2] = np.inf
    with pytest.raises(InputError, match="NaN or inf"):
        fn(img)
    with pytest.raises(InputError, match="2D"):
        fn(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(InputError, match="sigma"):
        fn(np.zeros((16, 16), np.float32), sigma=-0.1)


def test_apply_slicewise_and_denoise(gauss_noisy):
    vol = np.stack([gauss_noisy, gauss_noisy[::-1], gauss_noisy.T]).astype(np.float64)
    before = vol.copy()
    out = apply_slicewise(BASELINES["median"], vol)
    np.testing.assert_array_equal(vol, before)
    assert out.shape == vol.shape and out.dtype == np.float32
    for z in range(3):
        np.testing.assert_array_equal(out[z], BASELINES["median"](vol[z]))
    # per-slice sigma estimation: equals the 2D call on each slice
    out_w = denoise("wiener", vol)
    np.testing.assert_array_equal(out_w[1], BASELINES["wiener"](vol[1]))
    assert denoise("mean", gauss_noisy).shape == gauss_noisy.shape
    with pytest.raises(InputError, match="unknown"):
        denoise("dpir", gauss_noisy)
    with pytest.raises(InputError, match="2D .* or 3D"):
        apply_slicewise(BASELINES["mean"], np.zeros((2, 2, 8, 8)))


def test_time_method():
    calls = []

    def fn(image, **kw):
        calls.append(kw)
        return image

    t = time_method(fn, np.zeros((8, 8)), repeats=3, sigma=0.1)
    assert t >= 0 and len(calls) == 3 and calls[0] == {"sigma": 0.1}
    assert time_method(BASELINES["median"], np.zeros((64, 64), np.float32), repeats=1) > 0
    with pytest.raises(InputError, match="repeats"):
        time_method(fn, np.zeros((8, 8)), repeats=0)
