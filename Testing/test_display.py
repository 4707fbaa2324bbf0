"""The one display rule (FPDenoiseLib.display) on the real chest CT slice, and the feature-change map."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from FPDenoiseLib.display import (
    BACKGROUND_PERCENTILE,
    colorbar_rgba,
    colorbar_ticks,
    colour_table,
    feature_score_text,
    inferno_lut,
    render_rgba,
    saliency_window,
)
from FPDenoiseLib.inference import Denoiser, default_model_path
from FPDenoiseLib.io import read_image

REAL_SLICE = Path(__file__).resolve().parents[1] / "Resources" / "TestData" / "real_ct_lung1_slice.nrrd"


@pytest.fixture(scope="module")
def real_slice() -> np.ndarray:
    if not REAL_SLICE.is_file():
        pytest.skip("real test slice missing")
    return read_image(REAL_SLICE).array


@pytest.fixture(scope="module")
def model_path(tiny_checkpoint) -> Path:
    return default_model_path() if default_model_path().is_file() else tiny_checkpoint


def _body_and_air(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Body = largest filled component above -500 HU (lungs included); air = outside it, 5 px margin."""
    body = ndi.binary_fill_holes(ndi.binary_opening(hu > -500, iterations=2))
    lab, n = ndi.label(body)
    body = lab == 1 + int(np.argmax(ndi.sum(body, lab, range(1, n + 1))))
    return body, ndi.binary_erosion(~body, iterations=5)


def test_threshold_hides_air_keeps_body_on_real_slice(real_slice, model_path):
    if model_path != default_model_path():
        pytest.skip("needs the shipped model (a random net's saliency is not anatomical)")
    den = Denoiser(model_path, device="cpu")
    sal = den.saliency_array(real_slice, modality="CT")[0]
    hu = real_slice[0].astype(np.float32)
    body, air = _body_and_air(hu)
    w = saliency_window(sal)
    visible = sal > w.lo
    # Measured 96 % of the air hidden and 58 % of the body shown with the gradient_energy model.
    assert (~visible[air]).mean() > 0.9, (~visible[air]).mean()
    assert visible[body].mean() > 0.4, visible[body].mean()
    # The overlay is graded inside the body: visible pixels cover the ramp, not one colour.
    shade = w.normalise(sal[visible & body])
    assert np.quantile(shade, 0.25) < 0.3 < 0.5 < np.quantile(shade, 0.9)
    rgba = render_rgba(sal, w)
    assert (rgba[..., 3][air] == 0).mean() > 0.9 and (rgba[..., 3][visible] == 255).all()


def test_window_percentiles_monotone_and_degenerate_maps(real_slice):
    rng = np.random.default_rng(0)
    m = rng.gamma(0.5, size=(64, 64)).astype(np.float32)
    lows = [saliency_window(m, background_percentile=p).lo for p in (0, 30, 60, 90)]
    assert lows == sorted(lows) and lows[0] < lows[-1]
    w = saliency_window(m)
    assert w.lo == pytest.approx(np.percentile(m, BACKGROUND_PERCENTILE)) and w.hi == pytest.approx(np.percentile(m, 99.5))
    # Two maps share a window computed on both.
    w2 = saliency_window(m, 10 * m)
    assert w2.hi > w.hi
    # All-zero map (nothing changed): a valid window and nothing drawn.
    z = np.zeros((8, 8), np.float32)
    wz = saliency_window(z)
    assert wz.hi > wz.lo and (render_rgba(z, wz)[..., 3] == 0).all()
    with pytest.raises(ValueError):
        saliency_window(m, background_percentile=99.9)
    ticks = colorbar_ticks(w)
    assert ticks[0] == (0.0, pytest.approx(w.lo)) and ticks[-1] == (1.0, pytest.approx(w.hi))


def test_inferno_table_is_graded():
    lut = inferno_lut()
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    lum = lut.astype(float) @ np.array([0.2126, 0.7152, 0.0722])
    assert lum[0] < 5 and lum[-1] > 230
    assert (np.diff(lum) > -1.0).all(), "luminance must rise along the table"
    assert len(np.unique(lut, axis=0)) >= 250
    np.testing.assert_allclose(colour_table(1.0) * 255, lut, atol=1e-9)
    bar = colorbar_rgba(100, 5)
    assert bar.shape == (100, 5, 4) and bar[0, 0, :3].sum() > bar[-1, 0, :3].sum()  # high values on top
    assert feature_score_text(0.9314) == "feature score 0.931 (1.0 = every feature kept)"
    assert feature_score_text(None) == "feature score -"


def test_feature_change_is_abs_difference_of_signed_maps(real_slice, model_path):
    crop = real_slice[:, 200:264, 200:264]
    den = Denoiser(model_path, device="cpu")
    out, s_in, s_out, change = den.process(crop, modality="CT", feature_change=True)
    norm = den.normalizer(crop, "CT")
    g_in = den._map_stack(norm.forward(crop), den._gb_signed)
    g_out = den._map_stack(den.denoise_normalized(norm.forward(crop)), den._gb_signed)
    np.testing.assert_allclose(change, np.abs(g_out - g_in), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s_in, np.abs(g_in), rtol=1e-6, atol=1e-8)
    assert change.max() > 0
    # Against the clean image (benchmark / demo): identical images give an exactly zero map.
    assert not den.feature_change_array(crop, crop, modality="CT").any()
    # Strength 0 returns the input, so nothing changed: zero map, score 1.
    still = Denoiser(model_path, device="cpu", strength=0.0)
    res = still.run(replace(read_image(REAL_SLICE), array=crop))
    assert not res.feature_change.array.any() and res.fp_score == pytest.approx(1.0)
    np.testing.assert_array_equal(res.denoised.array, crop)
