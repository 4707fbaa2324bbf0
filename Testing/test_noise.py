"""Tests of the 14 noise/artifact models (the paper's 13 + CT noise texture): contract (shape, dtype, purity, seeds, errors) and the
statistical/physical signature of each model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from FPDenoiseLib.errors import InputError
from FPDenoiseLib.noise import (
    DEFAULT_LEVEL,
    NOISE_NAMES,
    NOISES,
    PAPER_NOISE_NAMES,
    ChemicalShiftArtifact,
    CTCorrelatedNoise,
    GaussianNoise,
    MagneticFieldInhomogeneity,
    MixNoise,
    MotionArtifact,
    NoiseModel,
    NoncentralChiNoise,
    PoissonNoise,
    RicianNoise,
    SaltPepperNoise,
    SpeckleNoise,
    StructuredNoise,
    SusceptibilityArtifact,
    ThermalNoise,
    WrapAroundArtifact,
    add_noise,
)

DETERMINISTIC = {"wrap_around"}  # no random component: output depends only on parameters


def phantom(shape=(64, 64)) -> np.ndarray:
    """Smooth-ish phantom in [0, 1] with an ellipse, a bright 'fat' ring and a small lesion, zero border."""
    h, w = shape[-2:]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    r = np.sqrt(((y - cy) / (0.38 * h)) ** 2 + ((x - cx) / (0.3 * w)) ** 2)
    img = np.where(r < 1.0, 0.45, 0.0).astype(np.float32)
    img[(r > 0.85) & (r < 1.0)] = 0.8  # fat-like rim
    img[(np.hypot(y - cy - 5, x - cx + 4) < 4)] = 0.6
    if len(shape) == 3:
        img = (
            np.repeat(img[None], shape[0], axis=0)
            * np.linspace(0.8, 1.0, shape[0], dtype=np.float32)[:, None, None]
        )
    return img


# --------------------------------------------------------------------------- registry / contract
def test_registry_has_the_paper_13_in_order_then_ct_noise():
    assert len(NOISE_NAMES) == 14 and len(set(NOISE_NAMES)) == 14
    assert tuple(NOISES) == NOISE_NAMES and PAPER_NOISE_NAMES == NOISE_NAMES[:13]
    assert NOISE_NAMES[0] == "gaussian" and PAPER_NOISE_NAMES[-1] == "susceptibility"
    assert NOISE_NAMES[-1] == "ct_correlated"
    for name, cls in NOISES.items():
        assert issubclass(cls, NoiseModel) and cls.name == name
        assert cls.__doc__ and "Level" in cls.__doc__ and ">>>" in cls.__doc__
    assert DEFAULT_LEVEL == 0.5


def test_add_noise_unknown_name_lists_valid_names():
    with pytest.raises(InputError) as ei:
        add_noise(phantom(), "banana")
    msg = str(ei.value)
    assert "banana" in msg and all(n in msg for n in NOISE_NAMES) and "\n" not in msg


@pytest.mark.parametrize("name", NOISE_NAMES)
@pytest.mark.parametrize("shape", [(48, 40), (3, 40, 36)])
def test_contract_shape_dtype_purity_seed(name, shape):
    img = phantom(shape).astype(np.float64)
    before = img.copy()
    a = add_noise(img, name, level=0.6, seed=7)
    assert a.shape == img.shape and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(img, before)  # input untouched
    assert a is not img and not np.shares_memory(a, img)
    b = add_noise(img, name, level=0.6, seed=7)
    np.testing.assert_array_equal(a, b)  # reproducible
    assert np.abs(a - img).max() > 1e-3  # it does corrupt at this level
    others = [add_noise(img, name, level=0.6, seed=s) for s in (8, 9, 10)]
    if name in DETERMINISTIC:
        assert all(np.array_equal(a, c) for c in others)
    elif name == "chemical_shift":  # only the readout polarity is random: 2 outcomes
        assert any(not np.array_equal(a, c) for c in others)
    else:
        assert all(not np.array_equal(a, c) for c in others)


def test_generator_seed_and_repeated_calls():
    img = phantom()
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(GaussianNoise(seed=g1)(img), GaussianNoise(seed=g2)(img))
    m = GaussianNoise(seed=1)
    assert not np.array_equal(m(img), m(img))  # the stream advances between calls


@pytest.mark.parametrize("name", NOISE_NAMES)
def test_bad_inputs_raise_input_error(name):
    model = NOISES[name]()
    bad = [
        np.zeros(5),
        np.float32(1.0),
        np.zeros((2, 2, 2, 2)),
        np.zeros((0, 4)),
        np.array([[1.0, np.nan]]),
        np.array([[1.0, np.inf]]),
        np.array([["a", "b"]]),
    ]
    for arr in bad:
        with pytest.raises(InputError):
            model(arr)
    for lv in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(InputError):
            NOISES[name].from_level(lv)


def test_bad_parameters_raise_input_error():
    with pytest.raises(InputError):
        GaussianNoise(sigma=-1)
    with pytest.raises(InputError):
        PoissonNoise(photons=0)
    with pytest.raises(InputError):
        NoncentralChiNoise(coils=1)
    with pytest.raises(InputError):
        SaltPepperNoise(amount=1.5)
    with pytest.raises(InputError):
        StructuredNoise(period_px=1)
    with pytest.raises(InputError):
        WrapAroundArtifact(fov_fraction=0)
    with pytest.raises(InputError):
        MotionArtifact(axis=0)
    with pytest.raises(InputError):
        GaussianNoise(seed="abc")
    with pytest.raises(InputError):
        ChemicalShiftArtifact(band=(0.9, 0.1))


@pytest.mark.parametrize("name", NOISE_NAMES)
def test_level_monotonic_and_default(name):
    img = phantom((64, 64))
    # mean squared corruption averaged over a few seeds (motion's k-space timing is random per draw)
    e = {
        lv: float(np.mean([np.mean((add_noise(img, name, level=lv, seed=s) - img) ** 2) for s in range(4)]))
        for lv in (0.0, 0.2, 0.8)
    }
    assert e[0.8] > e[0.2] > e[0.0] - 1e-9, e
    # level 0.5 == the documented class defaults
    m = NOISES[name].from_level(0.5)
    defaults = NOISES[name]()
    for k, v in m.params.items():
        assert v == pytest.approx(defaults.params[k]), k


def test_mix_noise_deterministic_and_covers_types():
    img = phantom((32, 32))
    mix_a, mix_b = MixNoise(seed=5), MixNoise(seed=5)
    seen = set()
    for _ in range(40):
        (na, nm, lv), (nb, nm2, lv2) = mix_a(img), mix_b(img)
        np.testing.assert_array_equal(na, nb)
        assert nm == nm2 and lv == lv2 and 0.1 <= lv <= 1.0 and nm in NOISE_NAMES
        assert na.shape == img.shape and na.dtype == np.float32
        seen.add(nm)
    assert len(seen) >= 10
    other = [MixNoise(seed=6)(img)[1:] for _ in range(1)] + [MixNoise(seed=7)(img)[1:]]
    assert any(o != MixNoise(seed=5)(img)[1:] for o in other)
    sub = MixNoise(names=["gaussian", "rician"], level_range=(0.3, 0.4), seed=0)
    assert all(sub(img)[1] in {"gaussian", "rician"} for _ in range(5))
    with pytest.raises(InputError):
        MixNoise(names=["nope"])
    with pytest.raises(InputError):
        MixNoise(level_range=(0.5, 0.2))


# --------------------------------------------------------------------------- physics
def test_gaussian_std_matches_sigma():
    img = np.full((256, 256), 0.5, np.float32)
    for sigma in (0.02, 0.1):
        n = GaussianNoise(sigma=sigma, seed=0)(img) - img
        assert n.std() == pytest.approx(sigma, rel=0.02) and abs(n.mean()) < 3 * sigma / 256


def test_poisson_variance_tracks_mean_over_photons():
    i0 = 50.0
    means = np.array([0.1, 0.3, 0.6, 1.0], np.float32)
    img = np.repeat(means, 64 * 64).reshape(4 * 64, 64)  # four flat patches
    out = PoissonNoise(photons=i0, seed=0)(img).reshape(4, -1)
    var, mean = out.var(axis=1), out.mean(axis=1)
    np.testing.assert_allclose(mean, means, atol=0.01)
    slope, intercept = np.polyfit(mean, var, 1)
    assert slope == pytest.approx(1 / i0, rel=0.1) and abs(intercept) < 0.002
    # negative values: untouched (rate clipped at 0)
    neg = np.full((8, 8), -0.2, np.float32)
    np.testing.assert_array_equal(PoissonNoise(photons=i0, seed=0)(neg), neg)
    # lower dose -> more noise
    flat = np.full((64, 64), 0.5, np.float32)
    assert PoissonNoise(photons=10, seed=1)(flat).var() > 3 * PoissonNoise(photons=100, seed=1)(flat).var()


def test_speckle_variance_proportional_to_mean_squared():
    sigma = 0.2
    means = np.array([0.2, 0.5, 1.0], np.float32)
    img = np.repeat(means, 64 * 64).reshape(3 * 64, 64)
    out = SpeckleNoise(sigma=sigma, seed=0)(img).reshape(3, -1)
    ratio = out.var(axis=1) / means**2
    np.testing.assert_allclose(ratio, sigma**2, rtol=0.1)


def test_salt_pepper_fraction_and_values():
    img = np.full((200, 200), 0.5, np.float32)
    out = SaltPepperNoise(amount=0.1, salt_ratio=0.3, seed=0)(img)
    changed = out != 0.5
    assert changed.mean() == pytest.approx(0.1, abs=0.005)
    assert set(np.unique(out[changed])) <= {0.0, 1.0}
    assert (out == 1.0).sum() / changed.sum() == pytest.approx(0.3, abs=0.03)


def test_rician_bias_at_zero_and_unbiased_at_high_snr():
    sigma = 0.05
    zero = np.zeros((128, 128), np.float32)
    out0 = RicianNoise(sigma=sigma, seed=0)(zero)
    assert out0.min() >= 0
    assert out0.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.03)
    high = np.full((128, 128), 1.0, np.float32)
    outh = RicianNoise(sigma=sigma, seed=0)(high)
    assert outh.mean() == pytest.approx(1.0 + sigma**2 / 2, abs=0.003) and outh.std() == pytest.approx(
        sigma, rel=0.05
    )


def test_noncentral_chi_background_mean_grows_with_coils():
    sigma = 0.03
    zero = np.zeros((128, 128), np.float32)
    means = []
    for coils in (2, 4, 8):
        m = NoncentralChiNoise(sigma=sigma, coils=coils, seed=0)(zero).mean()
        expected = sigma * math.sqrt(2) * math.exp(math.lgamma(coils + 0.5) - math.lgamma(coils))
        assert m == pytest.approx(expected, rel=0.03)
        means.append(m)
    assert means[0] < means[1] < means[2]
    # rician is the 1-coil special case: chi background mean > rayleigh mean
    assert means[0] > RicianNoise(sigma=sigma, seed=0)(zero).mean()


def test_structured_spectral_peak_at_period():
    img = phantom((64, 128))
    out = StructuredNoise(amplitude=0.05, period_px=16, angle_deg=0, banding=0, seed=0)(img)
    spec = np.abs(np.fft.rfft(out - img, axis=1)).mean(axis=0)
    assert int(np.argmax(spec)) == 128 // 16
    assert (out - img).std() == pytest.approx(0.05 / math.sqrt(2), rel=0.05)
    # banding alone: constant along each row, piecewise constant in blocks of band_width rows
    band = StructuredNoise(amplitude=0.0, banding=0.05, band_width_px=8, seed=0)(img) - img
    np.testing.assert_allclose(band, band[:, :1] * np.ones((1, 128)), atol=1e-6)
    np.testing.assert_allclose(band[:8, 0], band[0, 0], atol=1e-6)
    # 3D: same in-plane pattern on every slice
    vol = phantom((3, 64, 64))
    d = StructuredNoise(seed=2)(vol) - vol
    np.testing.assert_allclose(d[0], d[2], atol=1e-6)


def test_ct_correlated_std_spectrum_and_slice_independence():
    n = CTCorrelatedNoise(sigma=0.02, cutoff=0.3, seed=0)(np.zeros((4, 256, 256)))
    assert abs(n.std() - 0.02) < 0.001 and abs(n.mean()) < 0.001
    # radial power: none at DC, a mid-band peak, nothing above the cutoff (white noise would be flat)
    ps = np.mean(np.abs(np.fft.fft2(n, axes=(-2, -1))) ** 2, axis=0)
    f = np.hypot(np.fft.fftfreq(256)[:, None], np.fft.fftfreq(256)[None, :])
    band = [ps[(f >= lo) & (f < lo + 0.05)].mean() for lo in (0.0, 0.1, 0.3, 0.4)]
    assert band[1] > 1.3 * band[0] and band[1] > 1e6 * band[3] and ps[0, 0] < 1e-6 * band[1]
    # neighbouring pixels are correlated (grain), neighbouring slices are not
    r_px = np.corrcoef(n[:, :, :-1].ravel(), n[:, :, 1:].ravel())[0, 1]
    r_z = np.corrcoef(n[:-1].ravel(), n[1:].ravel())[0, 1]
    assert r_px > 0.3 and abs(r_z) < 0.02
    # a sharper kernel (higher cutoff) gives a finer grain
    sharp = CTCorrelatedNoise(sigma=0.02, cutoff=0.6, seed=0)(np.zeros((256, 256)))
    assert np.corrcoef(sharp[:, :-1].ravel(), sharp[:, 1:].ravel())[0, 1] < r_px
    with pytest.raises(InputError):
        CTCorrelatedNoise(cutoff=0.0)
    with pytest.raises(InputError):
        CTCorrelatedNoise(cutoff=0.9)
    assert "ct_correlated" not in PAPER_NOISE_NAMES


def test_thermal_image_domain_std_matches_sigma():
    img = np.full((128, 128), 1.0, np.float32)
    for sigma in (0.02, 0.06):
        n = ThermalNoise(sigma=sigma, seed=0)(img) - img
        assert n.std() == pytest.approx(sigma, rel=0.05)
    # magnitude: background becomes Rayleigh with mean sigma*sqrt(pi/2)
    bg = ThermalNoise(sigma=0.04, seed=0)(np.zeros((128, 128), np.float32))
    assert bg.mean() == pytest.approx(0.04 * math.sqrt(math.pi / 2), rel=0.05)


@pytest.mark.parametrize("shape", [(64, 64), (16, 32, 32)])
def test_magnetic_field_smooth_and_multiplicative(shape):
    img1 = phantom(shape) + 0.1
    img2 = np.full(shape, 0.7, np.float32)
    f1 = MagneticFieldInhomogeneity(strength=0.4, seed=3)(img1) / img1
    f2 = MagneticFieldInhomogeneity(strength=0.4, seed=3)(img2) / img2
    np.testing.assert_allclose(f1, f2, rtol=1e-5)  # field independent of the image
    logf = np.log(f2)
    assert np.abs(logf).max() == pytest.approx(0.4, rel=1e-3)
    for ax in range(len(shape)):
        if shape[ax] > 2:
            assert np.abs(np.diff(logf, n=2, axis=ax)).max() < 0.02  # smooth
    assert f2.std() > 0.02  # and not flat


def test_wrap_around_folds_edge_content_to_the_other_edge():
    n = 50
    img = np.zeros((n, 20), np.float32)
    img[45:48, 5:10] = 1.0  # object near the bottom edge
    out = WrapAroundArtifact(fov_fraction=0.8)(img)  # period M = 40
    np.testing.assert_allclose(out[5:8, 5:10], 1.0)  # appears 40 rows up, near the top edge
    np.testing.assert_allclose(out[45:48, 5:10], 1.0)
    # periodisation: out[j] == sum over p = j mod M of img[p]; hence out is M-periodic where defined
    m = 40
    rnd = np.random.default_rng(0).random((n, 7)).astype(np.float32)
    w = WrapAroundArtifact(fov_fraction=0.8)(rnd)
    expect = np.stack([rnd[j % m :: m].sum(0) for j in range(n)])
    np.testing.assert_allclose(w, expect, rtol=1e-5)
    np.testing.assert_allclose(w[:10], w[m : m + 10], rtol=1e-5)
    # fov 1.0 = no artifact; axis=-1 folds columns instead
    np.testing.assert_array_equal(WrapAroundArtifact(fov_fraction=1.0)(rnd), rnd)
    col = WrapAroundArtifact(fov_fraction=0.8, axis=-1)(img.T.copy())
    np.testing.assert_allclose(col, out.T)


def test_motion_keeps_energy_and_changes_kspace_lines():
    img = phantom((64, 64))
    out = MotionArtifact(degrees=6, translation_px=5, num_transforms=2, seed=4)(img)
    e_in, e_out = float((img**2).sum()), float((out**2).sum())
    assert e_out == pytest.approx(e_in, rel=0.1)
    k_in = np.fft.fft2(img, norm="ortho")
    k_out = np.fft.fft2(out, norm="ortho")
    line_diff = np.abs(k_out - k_in).sum(axis=1)  # per phase-encode line (rows)
    assert (line_diff > 1e-3 * np.abs(k_in).sum(axis=1).max()).sum() >= 3
    assert np.abs(out - img).max() > 0.05
    # the k-space centre keeps the original pose: low-frequency content close to the original
    assert abs(k_out[0, 0] - k_in[0, 0]) < 0.1 * abs(k_in[0, 0])
    # no motion -> identity (magnitude of a non-negative image)
    np.testing.assert_allclose(MotionArtifact(degrees=0, translation_px=0, seed=0)(img), img, atol=1e-5)


def test_chemical_shift_moves_only_band_pixels_by_the_shift():
    img = phantom((64, 64))
    band = (0.75, 0.85)  # the 0.8 'fat' rim only
    shift, frac = 3, 0.7
    out = ChemicalShiftArtifact(shift_px=shift, band=band, fraction=frac, direction=1)(img)
    mask = (img >= band[0]) & (img <= band[1])
    moved_mask = np.zeros_like(mask)
    moved_mask[:, shift:] = mask[:, :-shift]
    changed = np.abs(out - img) > 1e-6
    assert changed.any() and not (changed & ~(mask | moved_mask)).any()
    fat = np.where(mask, img, 0) * frac
    replica = np.zeros_like(fat)
    replica[:, shift:] = fat[:, :-shift]
    np.testing.assert_allclose(out, img - fat + replica, atol=1e-6)
    assert out.sum() == pytest.approx(img.sum(), rel=1e-5)  # signal displaced, not created
    # opposite readout polarity shifts the other way; random polarity depends on the seed
    left = ChemicalShiftArtifact(shift_px=shift, band=band, fraction=frac, direction=-1)(img)
    assert not np.allclose(left, out)
    dirs = {ChemicalShiftArtifact(shift_px=shift, band=band, seed=s)(img).tobytes() for s in range(8)}
    assert len(dirs) == 2


def test_susceptibility_local_with_signal_drop():
    img = np.full((96, 96), 0.6, np.float32)
    img[::8] = 0.3  # a grid: the readout (x) displacement shows on the vertical lines
    img[:, ::6] = 0.9
    c = (40.0, 50.0)
    model = SusceptibilityArtifact(max_shift_px=4, dropout=0.8, radius=0.08, center=c, seed=0)
    out = model(img)
    r0 = 0.08 * 96
    y, x = np.mgrid[0:96, 0:96]
    r = np.hypot(y - c[0], x - c[1])
    far = r > 4 * r0 + 1
    np.testing.assert_array_equal(out[far], img[far])  # far from the dipole: unchanged
    assert np.abs(out - img)[r < 2 * r0].max() > 0.1  # distorted near it
    near = r < 0.5 * r0
    assert out[near].mean() < 0.5 * img[near].mean()  # signal drop-out at the centre
    # geometric distortion (not just attenuation): with dropout=0 the stripes still move
    warp = SusceptibilityArtifact(max_shift_px=4, dropout=0.0, center=c)(img)
    assert np.abs(warp - img)[r < 2 * r0].max() > 0.1
    # random centre depends on the seed; 3D works and stays local in z
    vol = np.repeat(img[None], 40, axis=0)
    v = SusceptibilityArtifact(radius=0.04, center=(20.0, 40.0, 50.0))(vol)  # support 4R = 15.4 voxels
    np.testing.assert_array_equal(v[:4], vol[:4])
    np.testing.assert_array_equal(v[-4:], vol[-4:])
    assert np.abs(v[20] - vol[20]).max() > 0.1
    centres = {
        tuple(np.argwhere(SusceptibilityArtifact(seed=s)(img) != img).mean(0).round()) for s in range(3)
    }
    assert len(centres) == 3


def test_pointwise_speed_on_a_large_volume():
    vol = np.random.default_rng(0).random((40, 256, 256), dtype=np.float32)  # 2.6 M voxels
    import time

    for name in ("gaussian", "poisson", "rician", "salt_pepper", "magnetic_field"):
        t = time.perf_counter()
        add_noise(vol, name, seed=0)
        assert time.perf_counter() - t < 5.0, name


def test_docstring_examples_run():
    import doctest

    import FPDenoiseLib.noise as mod

    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 13 and res.failed == 0
