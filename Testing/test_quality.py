"""The shipped default model on a real CT slice: identity at strength 0 and on clean input, a
calibrated noise-level estimate, and better than NL-means at Gaussian 5 % (seeded, with margin).

The slice (``Resources/TestData/real_ct_lung1_slice.nrrd``) is real chest CT from the training
patient; the held-out benchmark (``benchmarks/quality.py``) is the model's actual judge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from FPDenoiseLib import baselines
from FPDenoiseLib.errors import InputError
from FPDenoiseLib.inference import Denoiser, default_model_path, resources_dir
from FPDenoiseLib.intensity import Normalizer
from FPDenoiseLib.io import read_image
from FPDenoiseLib.metrics import psnr
from FPDenoiseLib.models import ResUNet

SLICE = resources_dir() / "TestData" / "real_ct_lung1_slice.nrrd"


@pytest.fixture(scope="module")
def real_slice() -> np.ndarray:
    return np.asarray(read_image(SLICE).array, dtype=np.float32).squeeze()


@pytest.fixture(scope="module")
def shipped() -> Denoiser:
    return Denoiser(device="cpu")


def test_shipped_default_is_the_noise_aware_model(shipped):
    assert isinstance(shipped.model, ResUNet)
    # what a user needs for each shipped model: its file plus the restoration net f it refers to
    for model in sorted(default_model_path().parent.glob("fpdenoise_*.pt")):
        ref = torch.load(model, weights_only=True).get("restoration_ref")
        size = model.stat().st_size + (model.with_name(ref["file"]).stat().st_size if ref else 0)
        assert size <= 10 * 2**20, (model.name, size)


def test_strength_zero_is_exact_identity(shipped, real_slice):
    den = Denoiser(device="cpu", strength=0.0)
    noisy = real_slice + np.random.default_rng(0).normal(0, 80, real_slice.shape).astype(np.float32)
    out = den.denoise_array(noisy, modality="CT")
    assert np.array_equal(out, noisy)
    # the network itself, not only the Denoiser wrapper
    x = torch.rand(1, 1, 40, 56)
    assert torch.equal(shipped.model(x, strength=0.0), x)


def test_strength_scales_the_correction(real_slice):
    noisy = real_slice + np.random.default_rng(1).normal(0, 100, real_slice.shape).astype(np.float32)
    change = []
    for s in (0.5, 1.0, 1.5):
        out = Denoiser(device="cpu", strength=s).denoise_array(noisy, modality="CT")
        change.append(float(np.abs(out - noisy).mean()))
    assert change[0] < change[1] < change[2], change
    assert change[0] < 0.75 * change[1], f"'Low' (0.5) is not visibly lighter than 1: {change}"


def test_clean_real_slice_is_left_alone(shipped, real_slice):
    out = shipped.denoise_array(real_slice, modality="CT")
    rng = float(real_slice.max() - real_slice.min())
    assert psnr(real_slice, out, data_range=rng) >= 50.0
    body = real_slice > -500
    assert abs(float((out - real_slice)[body].mean())) <= 2.0


@pytest.mark.parametrize("pct", [1, 2, 5, 10])
def test_noise_level_estimate_within_20_percent(shipped, real_slice, pct):
    norm = Normalizer.for_array(real_slice, modality="CT")
    x = norm.forward(real_slice)
    sigma = pct / 100 * float(x.max() - x.min())
    noisy = x + np.random.default_rng(pct).normal(0, sigma, x.shape).astype(np.float32)
    est = shipped.noise_map_normalized(noisy)
    body = real_slice > -500
    ratio = float(np.median(est[body])) / sigma
    assert 0.8 <= ratio <= 1.2, f"estimated/true sigma = {ratio:.3f} at {pct} %"


def test_beats_nlmeans_at_gaussian_5_percent(shipped, real_slice):
    norm = Normalizer.for_array(real_slice, modality="CT")
    x = norm.forward(real_slice)
    rng = float(x.max() - x.min())
    noisy = x + np.random.default_rng(5).normal(0, 0.05 * rng, x.shape).astype(np.float32)
    ours = psnr(x, shipped.denoise_normalized(noisy), data_range=rng)
    nlm = psnr(x, baselines.denoise("nlmeans", noisy), data_range=rng)
    assert ours >= nlm + 0.5, f"ours {ours:.2f} dB vs NL-means {nlm:.2f} dB"


def test_ensemble_matches_single_pass_closely(shipped, real_slice):
    x = Normalizer.for_array(real_slice, modality="CT").forward(real_slice)[:128, :160]
    noisy = x + np.random.default_rng(2).normal(0, 0.02, x.shape).astype(np.float32)
    single = shipped.denoise_normalized(noisy)
    ens = Denoiser(device="cpu", ensemble=8).denoise_normalized(noisy)
    assert ens.shape == single.shape and not np.array_equal(ens, single)
    assert float(np.abs(ens - single).mean()) < 0.25 * float(np.abs(single - noisy).mean())


def test_bad_strength_and_ensemble_are_refused():
    from FPDenoiseLib.errors import InputError

    with pytest.raises(InputError, match="strength"):
        Denoiser(device="cpu", strength=-1)
    with pytest.raises(InputError, match="ensemble"):
        Denoiser(device="cpu", ensemble=3)


def test_twin_is_shipped_beside_the_default():
    twin = Path(default_model_path()).with_name("fpdenoise_mse_twin.pt")
    assert twin.exists()
    den = Denoiser(twin, device="cpu")
    assert den.ckpt["training"]["loss"] == "mse"
    assert den.ckpt["models"]["denoiser"]["config"] == Denoiser(device="cpu").ckpt["models"]["denoiser"]["config"]


def test_impulse_pre_stage_removes_salt_and_pepper_and_leaves_anatomy(real_slice):
    """The switching median replaces isolated pixels at the image's extremes and nothing else."""
    from FPDenoiseLib.models import impulse_mask, replace_impulses
    from FPDenoiseLib.noise import add_noise

    x = Normalizer.for_array(real_slice, modality="CT").forward(real_slice)
    rng = float(x.max() - x.min())
    t = torch.from_numpy(x)[None, None]
    assert not impulse_mask(t).any()  # a clean real slice: nothing flagged
    # saturated metal (a cluster at the image maximum) and one brightest pixel are anatomy
    metal = t.clone()
    metal[..., 200:206, 200:206] = float(t.max()) + 0.5
    metal[..., 300, 300] = float(t.max()) + 0.5
    assert not impulse_mask(metal).any()
    for level, floor in ((0.25, 45.0), (0.75, 34.0)):  # a 5x5 median gives 47 / 32 here
        noisy = add_noise(x, "salt_pepper", level=level, seed=3).astype(np.float32)
        mask = impulse_mask(torch.from_numpy(noisy)[None, None])
        out = replace_impulses(torch.from_numpy(noisy)[None, None], mask)[0, 0].numpy()
        changed = out != noisy
        assert np.asarray(mask[0, 0])[changed].mean() > 0.9  # mostly the first pass's finds
        # (almost) only corrupted pixels are replaced; the rest are air pixels at the min that the
        # noise surrounded with salt
        assert (noisy[changed] != x[changed]).mean() > 0.99
        assert psnr(x, out, data_range=rng) >= floor, level


def test_resunet_with_impulse_pre_stage_keeps_the_identities():
    net = ResUNet(channels=(4, 8, 8, 8), blocks=1, impulse_filter=True).eval()
    x = torch.rand(2, 1, 40, 56) * 0.5 + 0.25
    x[:, :, ::5, ::5] = 1.0  # 4 % salt
    with torch.no_grad():
        assert torch.equal(net(x, strength=0.0), x)  # strength 0: exact identity, impulses kept
        assert torch.equal(net(x, noise_map=torch.zeros_like(x)), net.remove_impulses(x))  # map 0: only the pre-stage
        assert not torch.equal(net.remove_impulses(x), x)
    from FPDenoiseLib.models import build_model

    old = dict(net.config)
    old.pop("impulse_filter")  # checkpoints from before the option build without it
    assert build_model(old).impulse_filter is False


def test_bf16_precision_matches_float32_where_the_cpu_has_bf16(shipped, real_slice, monkeypatch):
    """bfloat16 (the default where the CPU has it natively) gives float32's quality at Gaussian 2 %,
    the tightest case, because the layers that read the raw image stay float32: with them in bf16 too
    the net reads the rounding of the input as noise. A clean slice and strength 0 stay as they are;
    bf16 is refused where the CPU has no native bfloat16, and "auto" is float32 there."""
    from FPDenoiseLib import models
    from FPDenoiseLib.device import bf16_supported
    from FPDenoiseLib.errors import InputError

    with pytest.raises(InputError, match="precision"):
        Denoiser(device="cpu", precision="fp16")
    if not bf16_supported(torch.device("cpu")):
        assert shipped.precision == "fp32"
        with pytest.raises(InputError, match="bf16"):
            Denoiser(device="cpu", precision="bf16")
        pytest.skip("this CPU has no native bfloat16: only the refusal and the float32 default are testable here")
    assert shipped.precision == "bf16"  # "auto", the default
    exact = Denoiser(device="cpu", precision="fp32")
    rng = float(real_slice.max() - real_slice.min())
    noisy = real_slice + np.random.default_rng(5).normal(0, 0.02 * rng, real_slice.shape).astype(np.float32)
    p32 = psnr(real_slice, exact.denoise_array(noisy, modality="CT"), data_range=rng)
    p16 = psnr(real_slice, shipped.denoise_array(noisy, modality="CT"), data_range=rng)
    assert abs(p16 - p32) <= 0.01 and p16 > psnr(real_slice, noisy, data_range=rng) + 8, (p16, p32)
    monkeypatch.setattr(models, "float32_layer", lambda layer, x: layer(x))  # everything in bf16
    p_all = psnr(real_slice, Denoiser(device="cpu", precision="bf16").denoise_array(noisy, modality="CT"),
                 data_range=rng)
    assert p_all < p16 - 0.02, (p_all, p16)  # measured: -0.05 dB
    monkeypatch.undo()
    assert psnr(real_slice, shipped.denoise_array(real_slice, modality="CT"), data_range=rng) >= 50.0
    zero = Denoiser(device="cpu", strength=0.0)
    assert np.array_equal(zero.denoise_array(noisy, modality="CT"), noisy)


def test_auto_precision_is_float32_where_bf16_would_be_emulated(monkeypatch):
    """An x86 CPU without bf16 instructions (AVX512 Skylake / Cascade Lake, which oneDNN still calls
    bf16-capable, or AVX2 only) runs float32 by default and refuses an explicit bf16."""
    import platform

    from FPDenoiseLib.errors import InputError

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the instruction check is for x86 CPUs")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert Denoiser(device="cpu").precision == "fp32"
    with pytest.raises(InputError, match="no native bfloat16"):
        Denoiser(device="cpu", precision="bf16")


@pytest.fixture(scope="module")
def ct_texture() -> Denoiser:
    return Denoiser("ct_texture", device="cpu")


def test_ct_texture_model_leaves_a_clean_slice_alone(ct_texture, real_slice):
    out = ct_texture.denoise_array(real_slice, modality="CT")
    assert psnr(real_slice, out, data_range=float(real_slice.max() - real_slice.min())) >= 50.0
    assert abs(float((out - real_slice)[real_slice > -500].mean())) <= 2.0
    assert np.array_equal(Denoiser("ct_texture", device="cpu", strength=0.0).denoise_array(real_slice, modality="CT"),
                          real_slice)


def test_ct_texture_model_removes_correlated_ct_noise(ct_texture, shipped, real_slice):
    """A scanner's kernel-correlated noise (ct_correlated, level 0.5): the CT model beats the default model,
    the median filter and the filter chain (the best classical methods on it) by a margin."""
    from FPDenoiseLib.noise import add_noise

    x = Normalizer.for_array(real_slice, modality="CT").forward(real_slice)
    rng = float(x.max() - x.min())
    noisy = add_noise(x, "ct_correlated", level=0.5, seed=11).astype(np.float32)
    score = {name: psnr(x, den.denoise_normalized(noisy), data_range=rng)
             for name, den in (("ct_texture", ct_texture), ("default", shipped))}
    for name in ("median", "filter_combination"):
        score[name] = psnr(x, baselines.denoise(name, noisy), data_range=rng)
    best_other = max(v for k, v in score.items() if k != "ct_texture")
    assert score["ct_texture"] >= best_other + 1.5, score


def test_strength_below_one_blends_the_full_correction(real_slice):
    """Below 1, strength s gives y + s (D(y) - y), for every shipped model: a control that works the same on
    white noise and on a CT scanner's correlated noise (the map is scaled only above 1)."""
    from FPDenoiseLib.noise import add_noise

    x = Normalizer.for_array(real_slice, modality="CT").forward(real_slice)[128:320, 96:352]
    noisy = add_noise(x, "ct_correlated", level=0.5, seed=4).astype(np.float32)
    for name in ("default", "ct_texture"):
        full = Denoiser(name, device="cpu").denoise_normalized(noisy) - noisy
        for s in (0.25, 0.5, 0.75):
            part = Denoiser(name, device="cpu", strength=s).denoise_normalized(noisy) - noisy
            assert np.allclose(part, s * full, atol=2e-5), (name, s, float(np.abs(part - s * full).max()))
        more = Denoiser(name, device="cpu", strength=1.5).denoise_normalized(noisy) - noisy
        assert not np.allclose(more, 1.5 * full, atol=1e-3)  # above 1 the map is scaled, not the correction


def test_a_noisy_ct_through_the_default_points_to_the_ct_model(shipped, ct_texture, real_slice):
    """Denoiser.model_hint: a CT with a scanner's kernel-correlated noise given to the default names the CT
    model; white noise of the same level (which the default removes), a clean CT, the CT model itself and
    other modalities get no hint."""
    from FPDenoiseLib.noise import add_noise

    x = Normalizer.for_array(real_slice, modality="CT").forward(real_slice)
    noisy_hu = Normalizer.for_array(real_slice, modality="CT").inverse(
        add_noise(x, "ct_correlated", level=0.5, seed=2).astype(np.float32))
    hint = shipped.model_hint(noisy_hu, modality="CT")
    assert hint and "--model ct_texture" in hint and "HU" in hint
    sd = float(np.std((noisy_hu - real_slice)[real_slice > -500]))
    white = real_slice + np.random.default_rng(2).normal(0.0, sd, real_slice.shape).astype(np.float32)
    assert shipped.model_hint(white, modality="CT") is None, sd  # white noise: the default removes it
    assert Denoiser("default", device="cpu", strength=0.3).model_hint(white, modality="CT") is None  # not the setting
    # "auto" runs the CT model exactly where the note would point to it, at the same strength
    auto = Denoiser("auto", device="cpu", strength=0.75)
    den, note = auto.choose(noisy_hu, modality="CT")
    assert den.checkpoint_path.name == "fpdenoise_ct_texture.pt" and den.strength == 0.75 and note.startswith("auto:")
    # the Python API's run() makes the same choice and names it
    from FPDenoiseLib.io import Image

    res = auto.run(Image(noisy_hu[None].astype(np.float32), modality="CT", is_2d=True), saliency=False)
    assert (res.model, res.note) == ("ct_texture", note)
    np.testing.assert_array_equal(res.denoised.array[0], den.denoise_array(noisy_hu, modality="CT"))
    for arr, modality in ((real_slice, "CT"), (noisy_hu, "MR")):
        kept, note = auto.choose(arr, modality=modality)
        assert _keeps_default(auto, kept) and kept.strength == 0.75 and note is None
    # white noise of that level: the white-noise CT model (test below), at the same strength
    den, note = auto.choose(white, modality="CT")
    assert den.checkpoint_path.name == "fpdenoise_gaussian_ct.pt" and den.strength == 0.75 and note.startswith("auto:")
    assert shipped.choose(noisy_hu, modality="CT") == (shipped, hint)  # other models: the note only
    assert shipped.model_hint(np.stack([real_slice, noisy_hu, real_slice]), modality="CT")  # the middle slice
    assert shipped.model_hint(real_slice, modality="CT") is None
    assert ct_texture.model_hint(noisy_hu, modality="CT") is None
    assert shipped.model_hint(noisy_hu, modality="MR") is None


def test_lambda_rule_script_tells_a_worse_fp_run_from_an_equal_one(tmp_path):
    """scripts/lambda_rule.py: the same net against itself holds the rule (difference exactly 0), a
    degraded copy as the FP run fails it (rc 1), and the same copy as the twin holds it."""
    import subprocess
    import sys

    from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    twin = resources_dir() / "Models" / "fpdenoise_mse_twin.pt"
    ck = load_checkpoint(twin)
    bad = model_from_checkpoint(ck, "denoiser").float()
    with torch.no_grad():
        for p in bad.parameters():
            p.mul_(0.9)
    save_checkpoint(tmp_path / "bad.pt", {"denoiser": bad}, normalization=ck["normalization"], training=ck["training"])
    script = Path(__file__).resolve().parents[1] / "scripts" / "lambda_rule.py"
    data = str(resources_dir() / "TrainingData")

    def rule(fp, tw):
        return subprocess.run([sys.executable, str(script), str(fp), str(tw), "--data", data, "--patches", "24",
                               "--seeds", "1"], capture_output=True, text=True)

    same = rule(twin, twin)
    assert same.returncode == 0 and "FP - twin +0.000 dB" in same.stdout, same.stdout + same.stderr
    worse = rule(tmp_path / "bad.pt", twin)
    assert worse.returncode == 1 and "FAILS" in worse.stdout, worse.stdout + worse.stderr
    better = rule(twin, tmp_path / "bad.pt")
    assert better.returncode == 0 and "holds" in better.stdout, better.stdout + better.stderr


@pytest.fixture(scope="module")
def auto() -> Denoiser:
    return Denoiser("auto", device="cpu")


def test_auto_sends_white_noise_ct_to_the_white_noise_model_and_nothing_else(auto, real_slice):
    """auto: a CT with white Gaussian noise goes through the white-noise CT model, which is better there than the
    default; signal-dependent (Poisson, speckle), magnitude (Rician, thermal) and structured noise, a clean CT and
    an MR with the same white noise stay with the default."""
    from FPDenoiseLib.inference import GAUSSIAN_CT_NAME
    from FPDenoiseLib.noise import add_noise

    rng = np.random.default_rng(7)
    span = float(real_slice.max() - real_slice.min())
    norm = Normalizer.for_array(real_slice, modality="CT")
    for pct in (2, 5):
        noisy = (real_slice + rng.normal(0, pct / 100 * span, real_slice.shape)).astype(np.float32)
        chosen, note = auto.choose(noisy, modality="CT")
        assert chosen.checkpoint_path.name == GAUSSIAN_CT_NAME and "white-noise CT model" in note, note
        default, note = auto.choose(noisy, modality="MR")
        assert _keeps_default(auto, default) and note is None
        ours = psnr(real_slice, default.denoise_array(noisy, modality="CT"), data_range=span)
        theirs = psnr(real_slice, chosen.denoise_array(noisy, modality="CT"), data_range=span)
        assert theirs > ours + 0.05, (pct, ours, theirs)
        # the auto denoiser itself runs its choice, as the command line does
        assert psnr(real_slice, auto.denoise_array(noisy, modality="CT"), data_range=span) == theirs
    for name in ("poisson", "speckle", "rician", "thermal", "structured"):
        noisy = norm.inverse(add_noise(norm.forward(real_slice), name, level=0.5, seed=3))
        default, note = auto.choose(noisy, modality="CT")
        assert _keeps_default(auto, default) and note is None, name
    # white noise past the white-noise model's training range (WHITE_NOISE_MAX_HU) stays with the default
    heavy = (real_slice + rng.normal(0, 0.15 * span, real_slice.shape)).astype(np.float32)
    default, note = auto.choose(heavy, modality="CT")
    assert _keeps_default(auto, default) and note is None
    np.testing.assert_array_equal(auto.denoise_array(heavy, modality="CT"), default.denoise_array(heavy, modality="CT"))
    default, note = auto.choose(real_slice, modality="CT")
    assert _keeps_default(auto, default) and note is None
    # the benchmark's auto column: the loaded default as auto, its nets shared; only the default chooses
    shared = default.as_auto()
    assert shared.auto and shared.model is auto.model and shared.label == auto.label
    with pytest.raises(InputError, match="only the shipped default"):
        chosen.as_auto()


def _keeps_default(auto, chosen) -> bool:
    """``chosen`` is ``auto``'s own model, fixed: it shares the nets and does not choose again."""
    return chosen is not auto and not chosen.auto and chosen.model is auto.model and chosen.label == chosen.name


def test_white_noise_ct_model_leaves_a_clean_slice_alone(real_slice):
    out = Denoiser("gaussian_ct", device="cpu").denoise_array(real_slice, modality="CT")
    assert psnr(real_slice, out, data_range=float(real_slice.max() - real_slice.min())) >= 50.0
