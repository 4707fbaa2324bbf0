"""Inference, training and CLI end to end on real files (tiny models, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import ct_phantom

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint
from FPDenoiseLib.cli import main
from FPDenoiseLib.errors import CheckpointError, InputError
from FPDenoiseLib.inference import Denoiser, default_model_path, sample_data_path
from FPDenoiseLib.io import read_image
from FPDenoiseLib.training import TrainConfig, train


def test_denoiser_keeps_shape_dtype_and_is_batch_invariant(tiny_checkpoint):
    vol = ct_phantom((5, 33, 41))
    before = vol.copy()
    a = Denoiser(tiny_checkpoint, device="cpu", batch_size=1).process(vol, modality="CT")
    b = Denoiser(tiny_checkpoint, device="cpu", batch_size=4).process(vol, modality="CT")
    assert np.array_equal(vol, before)
    den, s_in, s_out = a
    assert den.shape == vol.shape and den.dtype == np.int16
    assert s_in.shape == vol.shape and s_in.dtype == np.float32 and (s_in >= 0).all()
    assert not np.array_equal(den, vol)  # the model did something
    np.testing.assert_allclose(den, b[0], atol=1)
    np.testing.assert_allclose(s_out, b[2], rtol=1e-4, atol=1e-6)
    # 2D input and float input
    img2d = np.random.default_rng(0).random((30, 22)).astype(np.float32) * 4000
    out2d = Denoiser(tiny_checkpoint, device="cpu").denoise_array(img2d)
    assert out2d.shape == img2d.shape and out2d.dtype == np.float32


def test_denoiser_rejects_bad_arrays(tiny_checkpoint):
    den = Denoiser(tiny_checkpoint, device="cpu")
    bad = np.ones((4, 4, 4, 4), np.float32)
    with pytest.raises(InputError):
        den.denoise_array(bad)
    nan = np.ones((8, 8), np.float32)
    nan[2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        den.denoise_array(nan)


def test_run_keeps_geometry(tiny_checkpoint, ct_nrrd):
    img = read_image(ct_nrrd)
    res = Denoiser(tiny_checkpoint, device="cpu").run(img)
    for out in (res.denoised, res.saliency_input, res.saliency_output):
        assert out.spacing == img.spacing and out.origin == img.origin and out.direction == img.direction
        assert out.array.shape == img.array.shape
    assert res.denoised.array.dtype == img.array.dtype and res.denoised.modality == "CT"
    assert -1.0 <= res.fp_score <= 1.0


def _tiny_data(folder: Path) -> Path:
    from FPDenoiseLib.data import synthetic_ct_slice

    folder.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(["chest", "abdomen", "head", "chest"]):
        im = sitk.GetImageFromArray(synthetic_ct_slice(kind, size=64, seed=i).astype(np.int16)[None])
        im.SetMetaData("FPDenoise_modality", "CT")
        sitk.WriteImage(im, str(folder / f"ct{i}.nrrd"))
    return folder


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(data=[str(_tiny_data(tmp_path / "data"))], out=str(tmp_path / "m.pt"), base_channels=4,
                patch_size=32, batch_size=4, bank_size=32, val_size=2, steps=24, restoration_steps=12,
                val_every=12, ckpt_every=6, device="cpu", lr=3e-3, noises=["gaussian"], level_range=(0.5, 0.5))
    base.update(kw)
    return TrainConfig(**base)


def test_short_training_lowers_the_loss_and_writes_a_usable_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, steps=60, val_every=20, lam=0.01, lr=1e-2, batch_size=8, level_range=(1.0, 1.0))
    path = train(cfg)
    ck = load_checkpoint(path)
    info = ck["training"]
    assert info["completed"] and "resume" not in ck
    assert set(ck["models"]) == {"denoiser", "restoration"}
    hist = [h for h in info["history"] if h["stage"] == "denoiser"]
    assert len(hist) == 3
    assert hist[-1]["psnr"] > hist[0]["psnr"]
    assert hist[-1]["psnr"] > hist[-1]["psnr_noisy"]  # denoises the held-out validation images
    assert info["gb_scale"] > 0
    Denoiser(path, device="cpu").denoise_array(ct_phantom())


def test_mse_twin_and_denoiser_stage_from_init(tmp_path):
    first = train(_cfg(tmp_path, steps=6, restoration_steps=6))
    twin = train(_cfg(tmp_path, out=str(tmp_path / "mse.pt"), loss="mse", stage="denoiser", init=str(first), steps=6))
    ck = load_checkpoint(twin)
    assert ck["training"]["loss"] == "mse"
    # the restoration net comes from --init unchanged
    f0 = model_from_checkpoint(load_checkpoint(first), "restoration").state_dict()
    f1 = model_from_checkpoint(ck, "restoration").state_dict()
    assert all(torch.equal(f0[k], f1[k]) for k in f0)
    with pytest.raises(CheckpointError, match="--init"):
        train(_cfg(tmp_path, out=str(tmp_path / "x.pt"), stage="denoiser"))


@pytest.mark.parametrize("ema", [0.0, 0.8])
def test_resume_continues_identically(tmp_path, ema):
    """A run resumed from an intermediate checkpoint ends with the same weights as one run (with the
    weight average too: it travels in the resume state)."""
    full = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "full.pt"), ema=ema)))
    part = _cfg(tmp_path, out=str(tmp_path / "part.pt"), ema=ema)
    # emulate a kill: train to a mid-stage-2 checkpoint by running with fewer steps would change the
    # cosine schedule, so instead truncate the run via a stage-2 checkpoint written at step 6
    import FPDenoiseLib.training as tr

    original = tr._run_stage

    def stop_early(role, model, cfg, steps, *a, **k):
        if role == "denoiser":
            class Killed(Exception):
                pass

            save = a[2]

            def save_then_die(step, state, _save=save):
                _save(step, state)
                if step == 12:
                    raise Killed

            a = (a[0], a[1], save_then_die, *a[3:])
            try:
                return original(role, model, cfg, steps, *a, **k)
            except Killed:
                raise SystemExit(9) from None
        return original(role, model, cfg, steps, *a, **k)

    tr._run_stage = stop_early
    try:
        with pytest.raises(SystemExit):
            train(part)
    finally:
        tr._run_stage = original
    assert load_checkpoint(part.out)["resume"]["step"] == 12
    resumed = load_checkpoint(train(part, resume=True))
    for name in ("denoiser", "restoration"):
        a, b = full["models"][name]["state_dict"], resumed["models"][name]["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ema_ships_the_moving_average_of_the_live_weights(tmp_path):
    """``ema=d`` leaves the optimisation untouched and ships sum_t d_t-weighted live weights, with the
    warm-up decay min(d, (1+t)/(10+t)); validated against weights recorded at every step."""
    import FPDenoiseLib.training as tr

    seen: list[dict] = []
    original = tr._run_stage

    def record(role, model, cfg, steps, make_batch, step_fn, save, *a, **k):
        def save_and_record(step, state):
            save(step, state)
            if role == "denoiser":
                seen.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        return original(role, model, cfg, steps, make_batch, step_fn, save_and_record, *a, **k)

    tr._run_stage = record
    try:
        path = train(_cfg(tmp_path, ema=0.9, ckpt_every=1, steps=12, restoration_steps=0))
    finally:
        tr._run_stage = original
    plain = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "plain.pt"), steps=12, restoration_steps=0)))
    shipped = load_checkpoint(path)["models"]["denoiser"]["state_dict"]
    live_end = plain["models"]["denoiser"]["state_dict"]
    assert len(seen) == 12
    for k, v in seen[-1].items():  # the average does not feed back into training
        assert torch.equal(v, live_end[k]), k
    assert load_checkpoint(path)["training"]["ema"] == 0.9
    changed = 0
    for k in shipped:
        if not shipped[k].is_floating_point():
            continue
        avg = None
        for t, w in enumerate(seen, start=1):
            d = min(0.9, (1 + t) / (10 + t))
            avg = w[k].float() * (1 - d) + (avg * d if avg is not None else 0 * w[k])
        # the initial weights weigh prod(d_t) = 13! 10! / 22! ~ 2e-5 in the average, left out here
        tol = 1e-3 * float(w[k].abs().max()) + 1e-6
        assert torch.allclose(shipped[k].float(), avg, atol=tol), k
        changed += not torch.equal(shipped[k], live_end[k])
    assert changed > 0  # it ships the average, not the last weights
    with pytest.raises(InputError, match="--ema"):
        train(_cfg(tmp_path, out=str(tmp_path / "bad.pt"), ema=1.0))


def test_cli_noises_simulate_denoise_saliency(tmp_path, ct_nrrd, tiny_checkpoint, capsys):
    assert main(["noises"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == 14 and names[0] == "gaussian" and names[-1] == "ct_correlated"

    noisy = tmp_path / "noisy.nrrd"
    assert main(["simulate", str(ct_nrrd), str(noisy), "--noise", "rician", "--level", "0.6", "--seed", "1"]) == 0
    a, b = read_image(ct_nrrd), read_image(noisy)
    assert b.array.dtype == a.array.dtype and b.spacing == a.spacing and not np.array_equal(a.array, b.array)

    out = tmp_path / "den.nrrd"
    sal = tmp_path / "sal"
    assert main(["denoise", str(noisy), str(out), "--model", str(tiny_checkpoint), "--saliency-dir", str(sal), "--device", "cpu"]) == 0
    d = read_image(out)
    assert d.array.shape == a.array.shape and d.origin == a.origin and d.direction == a.direction
    assert sorted(p.name for p in sal.iterdir()) == ["den_feature_change.nrrd", "den_saliency_denoised.nrrd", "den_saliency_input.nrrd"]
    assert main(["saliency", str(noisy), str(tmp_path / "s.nrrd"), "--model", str(tiny_checkpoint)]) == 0
    assert read_image(tmp_path / "s.nrrd").array.dtype == np.float32


def test_cli_png_roundtrip_and_one_line_errors(tmp_path, tiny_checkpoint):
    from PIL import Image as PILImage

    xray = (np.random.default_rng(0).random((48, 40)) * 4000).astype(np.uint16)
    PILImage.fromarray(xray).save(tmp_path / "xr.png")
    assert main(["denoise", str(tmp_path / "xr.png"), str(tmp_path / "o.png"), "--model", str(tiny_checkpoint)]) == 0
    out = np.asarray(PILImage.open(tmp_path / "o.png"))
    assert out.shape == xray.shape and out.dtype == np.uint16

    cmd = [sys.executable, "-m", "FPDenoiseLib.cli", "denoise", str(tmp_path / "missing.nrrd"), str(tmp_path / "x.nrrd")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing.nrrd" in lines[0]
    assert not (tmp_path / "x.nrrd").exists()
    assert main(["denoise", str(tmp_path / "xr.png"), str(tmp_path / "xr.png")]) == 2


@pytest.mark.skipif(not default_model_path().exists(), reason="shipped model not built yet")
def test_shipped_model_raises_psnr_on_sample_for_gaussian_noise():
    from FPDenoiseLib.intensity import in_normalized_units
    from FPDenoiseLib.metrics import psnr
    from FPDenoiseLib.noise import add_noise

    clean = read_image(sample_data_path())
    arr = clean.array[:3]
    noisy = in_normalized_units(arr, lambda x: add_noise(x, "gaussian", level=0.5, seed=0), modality="CT")
    den = Denoiser(device="cpu").denoise_array(noisy, modality="CT")
    rng = float(arr.max() - arr.min())
    gain = psnr(arr, den, data_range=rng) - psnr(arr, noisy, data_range=rng)
    assert gain > 3.0, gain


# ---------------------------------------------------------------- noise-aware ResUNet
def test_resunet_gate_is_exact_identity_where_the_map_is_zero():
    from FPDenoiseLib.models import ResUNet

    torch.manual_seed(0)
    net = ResUNet(channels=(4, 8, 8, 8), blocks=1).eval()
    torch.nn.init.normal_(net.tail.weight, std=0.1)  # a non-trivial correction R
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        assert torch.equal(net(x, noise_map=torch.zeros_like(x)), x)
        m = torch.zeros_like(x)
        m[..., :, 28:] = 0.05  # noise only on the right half: only the right half changes
        y = net(x, noise_map=m)
    assert torch.equal(y[..., :28], x[..., :28])
    assert not torch.equal(y[..., 28:], x[..., 28:])


def test_resunet_teacher_mask_picks_the_true_map_per_sample():
    from FPDenoiseLib.models import ResUNet

    torch.manual_seed(1)
    net = ResUNet(channels=(4, 8, 8, 8), blocks=1).eval()
    torch.nn.init.normal_(net.tail.weight, std=0.1)
    x = torch.rand(2, 1, 32, 32)
    true_map = torch.full_like(x, 0.08)
    with torch.no_grad():
        out, est = net(x, noise_map=true_map, teacher_mask=torch.tensor([True, False]), return_map=True)
        assert torch.allclose(out[:1], net(x[:1], noise_map=true_map[:1]), atol=1e-6)  # teacher: true map
        assert torch.allclose(out[1:], net(x[1:]), atol=1e-6)  # student: its own estimate
        assert torch.allclose(est, net.estimate_noise(x), atol=1e-6)  # the estimate is returned for its loss


def test_zero_level_fraction_leaves_samples_clean():
    from FPDenoiseLib.training import _noise_fn

    batch = np.random.default_rng(0).random((6, 1, 16, 16)).astype(np.float32)
    assert np.array_equal(_noise_fn(["gaussian"], (0.5, 0.5), zero_prob=1.0)(batch, np.random.default_rng(1)), batch)
    assert not np.array_equal(_noise_fn(["gaussian"], (0.5, 0.5))(batch, np.random.default_rng(1)), batch)


def test_resunet_training_trains_the_estimator_and_records_its_loss(tmp_path):
    cfg = _cfg(tmp_path, arch="resunet", loss="mse", steps=12, restoration_steps=4, val_every=12, ckpt_every=12,
               zero_level_prob=0.25, amp="bf16", map_fit=True)  # bf16 autocast also runs on CPU
    ck = load_checkpoint(train(cfg))
    D = model_from_checkpoint(ck, "denoiser")
    assert ck["models"]["denoiser"]["config"]["arch"] == "resunet"
    assert ck["models"]["denoiser"]["config"]["map_fit"] is True  # the fit is straight-through: still trained below
    assert ck["training"]["readout"] == "gradient_energy" and ck["training"]["amp"] == "bf16"
    last = [h for h in ck["training"]["history"] if h["stage"] == "denoiser"][-1]
    assert last["map"] > 0  # the estimator's L1 against the true local noise map is part of the loss
    torch.manual_seed(cfg.seed + 1)
    from FPDenoiseLib.models import build_model

    untrained = build_model(cfg.model_config("denoiser"))
    def moved(est: torch.nn.Module) -> list[str]:
        ref = untrained.estimator.state_dict()
        return [k for k, v in est.state_dict().items() if not torch.equal(v, ref[k])]

    assert moved(D.estimator)  # trained by the map loss
    # ...and only by it: without the map loss the estimator keeps its initial weights (the map that
    # reaches the denoiser is detached), which also shows `untrained` is the run's true start
    ck0 = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "nomap.pt"), arch="resunet", loss="mse", steps=12,
                                     restoration_steps=4, val_every=12, ckpt_every=12, map_weight=0.0)))
    assert moved(model_from_checkpoint(ck0, "denoiser").estimator) == []
    with pytest.raises(InputError, match="amp"):
        train(_cfg(tmp_path, out=str(tmp_path / "bad.pt"), amp="fp8"))


def test_noise_workers_give_the_same_training_as_the_in_process_loop(tmp_path):
    """--workers only moves noise synthesis into processes: the weights end bit-identical."""
    kw = dict(arch="resunet", loss="mse", steps=8, restoration_steps=3, val_every=8, ckpt_every=8,
              noises=["gaussian", "poisson", "rician"], level_range=(0.0, 0.8))
    a = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "w0.pt"), workers=0, **kw)))
    b = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "w2.pt"), workers=2, **kw)))
    from FPDenoiseLib.training import weights_digest

    def digest(ck: dict) -> str:
        return weights_digest({k: model_from_checkpoint(ck, k) for k in ck["models"]})

    assert digest(a) == digest(b)
    assert b["training"]["workers"] == 2


def test_log_residual_norm_is_a_training_option_recorded_in_the_checkpoint(tmp_path):
    from FPDenoiseLib.training import weights_digest

    kw = dict(arch="resunet", loss="mse", steps=6, restoration_steps=3, val_every=6, ckpt_every=6,
              noises=["gaussian"], level_range=(0.0, 0.8))
    a = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "mean.pt"), **kw)))
    b = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "log.pt"), residual_norm="log", **kw)))
    assert a["training"]["residual_norm"] == "mean" and b["training"]["residual_norm"] == "log"
    den = lambda ck: weights_digest({"d": model_from_checkpoint(ck, "denoiser")})  # noqa: E731
    assert den(a) != den(b)  # same data, noise and seed: only the loss differs
    assert [h for h in b["training"]["history"] if h["stage"] == "denoiser"][-1]["residual"] < 0  # log units
    with pytest.raises(InputError, match="residual norm"):
        train(_cfg(tmp_path, out=str(tmp_path / "bad.pt"), residual_norm="l1", **kw))


def test_log_map_loss_weighs_a_misread_level_relatively(tmp_path):
    from FPDenoiseLib.losses import map_error as _map_error

    mild, severe = torch.full((1, 1, 4, 4), 0.01), torch.full((1, 1, 4, 4), 0.1)
    # reading half the true level: L1 barely notices it at the mild level, the log loss nearly as much
    assert float(_map_error(mild / 2, mild, "l1")) == pytest.approx(0.1 * float(_map_error(severe / 2, severe, "l1")))
    rel_mild, rel_severe = float(_map_error(mild / 2, mild, "log")), float(_map_error(severe / 2, severe, "log"))
    assert rel_mild > 0.8 * rel_severe > 0
    assert float(_map_error(mild, mild, "log")) == 0.0
    with pytest.raises(InputError, match="map loss"):
        train(_cfg(tmp_path, out=str(tmp_path / "bad.pt"), arch="resunet", map_loss="l2"))


def test_slice_pack_round_trips_the_training_corpus(tmp_path):
    """A GPU box without image readers trains from a pack: same slices, same order, float16 values."""
    from FPDenoiseLib.data import load_clean_slices, save_slice_pack

    data = _tiny_data(tmp_path / "data")
    slices = load_clean_slices(data, max_slices_per_volume=3)
    pack = save_slice_pack(slices, tmp_path / "corpus.slices.npz")
    back = load_clean_slices([pack])
    assert [(s.source, s.index, s.modality) for s in back] == [(s.source, s.index, s.modality) for s in slices]
    for s, t in zip(slices, back):
        np.testing.assert_allclose(t.array, s.array, atol=2e-3 * max(1.0, float(np.abs(s.array).max())))
    # lzma members (smaller: the pack and the repository must fit the device's 64 MiB together); deflate
    # and a pack of np.savez_compressed (the earlier format) read back the same
    import json
    import zipfile

    with zipfile.ZipFile(pack) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_LZMA}
    deflate = save_slice_pack(slices, tmp_path / "d.slices.npz", compression="deflate")
    with zipfile.ZipFile(deflate) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    old = tmp_path / "old.slices.npz"
    meta = [{"source": s.source, "index": s.index, "modality": s.modality, "patient": s.patient} for s in slices]
    np.savez_compressed(old, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                        **{f"s{i:05d}": s.array.astype(np.float16) for i, s in enumerate(slices)})
    for other in (deflate, old):
        again = load_clean_slices([other])
        assert [s.source for s in again] == [s.source for s in back]
        assert all(np.array_equal(a.array, b.array) for a, b in zip(again, back))
    with pytest.raises(InputError, match="compression"):
        save_slice_pack(slices, tmp_path / "x.slices.npz", compression="bz2")
    with pytest.raises(InputError, match="slices.npz"):
        save_slice_pack(slices, tmp_path / "corpus.npz")
    (tmp_path / "bad.slices.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="slice pack"):
        load_clean_slices([tmp_path / "bad.slices.npz"])


def test_estimator_stage_retrains_only_the_noise_estimator(tmp_path):
    """--stage estimator swaps in a new (here: global-context) estimator under a trained denoiser."""
    base = train(_cfg(tmp_path, out=str(tmp_path / "base.pt"), arch="resunet", loss="mse", steps=6,
                      restoration_steps=3, val_every=6, ckpt_every=6))
    out = train(_cfg(tmp_path, out=str(tmp_path / "est.pt"), arch="resunet", stage="estimator", init=str(base),
                     estimator_global=True, steps=8, val_every=4, ckpt_every=8, lr=1e-2))
    a, b = load_checkpoint(base), load_checkpoint(out)
    da, db = model_from_checkpoint(a, "denoiser").state_dict(), model_from_checkpoint(b, "denoiser").state_dict()
    assert b["models"]["denoiser"]["config"]["estimator_global"] is True
    assert all(torch.equal(da[k], db[k]) for k in da if not k.startswith("estimator."))
    fa = model_from_checkpoint(a, "restoration").state_dict()
    fb = model_from_checkpoint(b, "restoration").state_dict()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)  # f comes along unchanged
    hist = [h for h in b["training"]["history"] if h["stage"] == "estimator"]
    assert len(hist) == 2 and "psnr" in hist[-1]  # validated with the new estimate
    # the new estimator was trained: it left the start it was built with
    from FPDenoiseLib.models import build_model

    torch.manual_seed(1)  # train() seeds cfg.seed + 1 before building the denoiser
    start = build_model(b["models"]["denoiser"]["config"]).estimator.state_dict()
    assert any(not torch.equal(v, db[f"estimator.{k}"]) for k, v in start.items())
    with pytest.raises(CheckpointError, match="--init"):
        train(_cfg(tmp_path, out=str(tmp_path / "x.pt"), arch="resunet", stage="estimator"))
    # an init of another width is a clear error, not a state-dict traceback
    with pytest.raises(CheckpointError, match="--base-channels"):
        train(_cfg(tmp_path, out=str(tmp_path / "y.pt"), arch="resunet", stage="estimator", init=str(base),
                   base_channels=8, steps=2))
    assert not (tmp_path / "y.pt").exists()


def test_global_estimator_sees_the_whole_image():
    """The global-context estimator's value at a pixel depends on image content far outside its
    receptive field (the plain one's does not)."""
    from FPDenoiseLib.models import NoiseLevelEstimator

    torch.manual_seed(0)
    x = torch.rand(1, 1, 64, 192) * 0.1
    y = x.clone()
    y[..., 128:] += torch.randn(1, 1, 64, 64) * 0.3  # far-away change (> 60 px from column 20)
    for glob, differs in ((True, True), (False, False)):
        est = NoiseLevelEstimator(global_context=glob)
        with torch.no_grad():
            d = (est(x) - est(y))[..., :, :20].abs().max()
        assert bool(d > 1e-7) is differs, (glob, float(d))


def test_map_fit_flattens_flat_noise_follows_the_signal_and_keeps_local_departures():
    """fit_noise_map: fluctuations of a flat map vanish (mean kept), a signal-dependent level is
    followed, and a region with 3x the level (an artifact there) is not averaged away."""
    from FPDenoiseLib.models import fit_noise_map

    g = torch.Generator().manual_seed(0)
    img = torch.linspace(0, 1, 64).repeat(64, 1)[None, None]  # intensity ramp
    flat = 0.02 * (1 + 0.15 * torch.randn(1, 1, 64, 64, generator=g))
    f = fit_noise_map(flat, img)
    assert float(f.std()) < 0.3 * float(flat.std()) and abs(float(f.mean()) / 0.02 - 1) < 0.05
    true = 0.01 + 0.03 * img.sqrt()  # Poisson-like: grows with the signal
    f = fit_noise_map(true * (1 + 0.15 * torch.randn(1, 1, 64, 64, generator=g)), img)
    assert float((f - true).abs().mean()) < 0.1 * float(true.mean())
    art = flat.clone()
    art[..., 20:40, 20:40] *= 3
    f = fit_noise_map(art, img)
    assert float(f[..., 25:35, 25:35].mean()) > 2.0 * float(f[..., :, 50:].mean())
    const = fit_noise_map(flat, torch.zeros_like(img))  # one intensity: all ties, one bin, no NaN
    assert torch.isfinite(const).all() and abs(float(const.mean()) / 0.02 - 1) < 0.05
    assert torch.allclose(fit_noise_map(flat, img, tau=0.0), flat, atol=1e-7)  # tau 0 keeps the map


def test_map_fit_is_a_weightless_setting_with_straight_through_estimator_gradients(tmp_path):
    from FPDenoiseLib.checkpoint import save_checkpoint
    from FPDenoiseLib.models import ResUNet, build_model

    torch.manual_seed(0)
    plain = ResUNet(channels=(4, 8, 8, 8), blocks=1)
    assert "map_fit" not in plain.config  # older checkpoints keep their config and hash
    fit = build_model({**plain.config, "map_fit": True})
    fit.load_state_dict(plain.state_dict())  # same weights: only the map differs
    torch.nn.init.normal_(fit.tail.weight, std=0.1)
    plain.tail.weight.data.copy_(fit.tail.weight)
    x = torch.rand(1, 1, 64, 64) * 0.5 + 0.25 + 0.05 * torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert float(fit.estimate_noise(x).std()) < float(plain.estimate_noise(x).std())
        assert not torch.equal(fit(x), plain(x))
        assert torch.equal(fit(x, strength=0.0), x)
        assert torch.equal(fit(x, noise_map=torch.full_like(x, 0.05)), plain(x, noise_map=torch.full_like(x, 0.05)))
    fit.estimator.zero_grad()
    fit.estimate_noise(x).sum().backward()
    assert all(p.grad is not None for p in fit.estimator.parameters())
    assert sum(float(p.grad.abs().sum()) for p in fit.estimator.parameters()) > 0
    p = save_checkpoint(tmp_path / "f.pt", {"denoiser": fit}, normalization={})
    assert model_from_checkpoint(load_checkpoint(p)).config["map_fit"] is True


def test_widening_a_resunet_keeps_its_output_and_then_trains_the_new_channels(tmp_path):
    """--init small.pt --base-channels N (wider) grows the denoiser: same output at step 0, and the
    zero-initialised edges from the new channels are trained (Net2Net-style growth)."""
    from FPDenoiseLib.models import ResUNet, widen_resunet

    torch.manual_seed(0)
    small = ResUNet(channels=(4, 8, 8), blocks=1, residual_gate=150, estimator_global=True).eval()
    for p in small.parameters():
        p.data.normal_(0, 0.1)  # the zero-init tail would make any widening look exact
    big = widen_resunet(small, (6, 12, 10)).eval()
    x = torch.rand(2, 1, 40, 44)
    with torch.no_grad():
        ref = small(x)
        assert float((ref - x).abs().max()) > 1e-3  # the small net does change the image
        assert torch.allclose(big(x), ref, atol=1e-6)
    assert sum(p.numel() for p in big.parameters()) > sum(p.numel() for p in small.parameters())
    with pytest.raises(ValueError, match="each >="):
        widen_resunet(small, (2, 12, 10))

    kw = dict(arch="resunet", loss="mse", restoration_steps=3, val_every=6, ckpt_every=6,
              noises=["gaussian"], level_range=(0.0, 0.8))
    base = train(_cfg(tmp_path, out=str(tmp_path / "b4.pt"), steps=6, map_fit=True, **kw))
    wide = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "b6.pt"), init=str(base), base_channels=6,
                                      steps=6, **kw)))
    D = model_from_checkpoint(wide, "denoiser")
    assert wide["models"]["denoiser"]["config"]["channels"] == [6, 12, 24, 48]
    # settings that own no weights follow the command line (no --map-fit here), not the init
    assert "map_fit" not in wide["models"]["denoiser"]["config"]
    # the tail's edges from the 2 new top-level channels started at 0 and were trained
    assert float(D.tail.weight.detach()[:, 4:].abs().sum()) > 0
    # and the old channels started from the trained weights, not from scratch
    b4 = model_from_checkpoint(load_checkpoint(base), "denoiser")
    start = widen_resunet(b4, [6, 12, 24, 48], seed=1)
    drift = (D.head.weight[:4] - start.head.weight[:4]).detach().abs().max()
    assert float(drift) < float(b4.head.weight.detach().abs().max())


def test_widening_a_resunet_with_attention_keeps_its_heads(tmp_path):
    """A net with attention grows too (the shipped pair has it): each old head stays a head of the same size
    reading the old channels, the output moves only by the attention norm's wider statistics, and
    --init --base-channels --attention grows the width and adds levels in one run. Widths that would
    change a head's size are refused."""
    from FPDenoiseLib.models import ResUNet, WindowAttention, widen_resunet

    torch.manual_seed(0)
    small = ResUNet(channels=(24, 48, 96, 192), blocks=1, attention=[2, 3]).eval()
    for p in small.parameters():
        p.data.normal_(0, 0.05)  # zero-init projections and tail would make any widening look exact
    big = widen_resunet(small, (30, 60, 120, 240)).eval()
    a, b = small.encoders[2][-1], big.encoders[2][-1]
    assert (a.heads, b.heads) == (4, 5) and isinstance(b, WindowAttention)
    for k in range(3):  # q, k, v of the old heads: the same weights, reading the old channels only
        assert torch.equal(b.qkv.weight[k * 120 : k * 120 + 96, :96], a.qkv.weight[k * 96 : (k + 1) * 96])
        assert not b.qkv.weight[k * 120 : k * 120 + 96, 96:].any()
    x = torch.rand(2, 1, 64, 48)
    with torch.no_grad():
        ref, out = small(x), big(x)
    change = float((ref - x).abs().max())
    assert change > 1e-2 and float((out - ref).abs().max()) < 0.05 * change, (change, float((out - ref).abs().max()))
    with pytest.raises(ValueError, match="heads of 24 channels"):
        widen_resunet(small, (32, 64, 128, 256))  # 128 would be 4 heads of 32
    assert ResUNet(channels=(32, 64, 128, 256), attention=[2]).encoders[2][-1].heads == 4  # a new net of that width

    kw = dict(arch="resunet", loss="mse", restoration_steps=3, val_every=6, ckpt_every=6,
              noises=["gaussian"], level_range=(0.0, 0.8))
    base = train(_cfg(tmp_path, out=str(tmp_path / "b24.pt"), steps=4, base_channels=24, attention=[2, 3], **kw))
    wide = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "b30.pt"), init=str(base), base_channels=30,
                                      attention=[1, 2, 3], steps=4, stage="denoiser", **kw)))
    cfg = wide["models"]["denoiser"]["config"]
    assert cfg["channels"] == [30, 60, 120, 240] and cfg["attention"] == [1, 2, 3]
    with pytest.raises(CheckpointError, match="multiples of 24"):
        train(_cfg(tmp_path, out=str(tmp_path / "b32.pt"), init=str(base), base_channels=32, attention=[2, 3],
                   steps=4, stage="denoiser", **kw))
    assert not (tmp_path / "b32.pt").exists()


def test_window_attention_tiles_the_map_and_starts_as_the_identity():
    from FPDenoiseLib.models import WindowAttention

    torch.manual_seed(0)
    tiled, whole = WindowAttention(48, window=8), WindowAttention(48, window=0)
    x = torch.randn(2, 48, 16, 24)
    assert torch.equal(tiled(x), x) and torch.equal(whole(x), x)  # zero output projection: grows exactly
    for p in tiled.proj.parameters():
        p.data.normal_(0, 0.1)
    whole.load_state_dict(tiled.state_dict())
    # one 8x8 tile is the whole 8x8 map: the tiling reshapes agree with plain global attention
    with torch.no_grad():
        assert torch.allclose(tiled(x[..., :8, :8]), whole(x[..., :8, :8]), atol=1e-5)
        # tiles do not see each other (the norm's image-wide statistics aside: taken out here): a change
        # in the first tile leaves the others' outputs alone
        tiled.norm = torch.nn.Identity()
        y = x.clone()
        y[..., :8, :8] += 1.0
        a, b = tiled(x), tiled(y)
        assert torch.equal(a[..., 8:, :], b[..., 8:, :]) and torch.equal(a[..., :8, 8:], b[..., :8, 8:])
        assert not torch.equal(a[..., :8, :8], b[..., :8, :8])
        # a shifted tiling crosses the unshifted tile borders; sizes that are no multiple of the tile work
        shifted = WindowAttention(48, window=8, shift=4)
        shifted.load_state_dict(whole.state_dict())
        shifted.norm = torch.nn.Identity()
        c = shifted(y) - shifted(x)
        assert float(c[..., 8:12, :8].abs().max()) > 0
        assert shifted(torch.randn(1, 48, 13, 21)).shape == (1, 48, 13, 21)
    with pytest.raises(ValueError, match="shift"):
        WindowAttention(48, window=8, shift=8)


def test_attention_grown_from_a_trained_resunet_and_trained_alone(tmp_path, capsys):
    """--attention with an --init that has none adds zero-initialised attention layers (the init's output
    at step 0); --trainable attention trains them alone, every other weight stays bit-identical; guided
    backpropagation still gives a non-zero, finite map through them."""
    from FPDenoiseLib.models import ResUNet, build_model
    from FPDenoiseLib.xai import guided_backprop

    plain = ResUNet(channels=(4, 8, 8), blocks=1)
    assert "attention" not in plain.config  # older checkpoints keep their config and hash
    with pytest.raises(ValueError, match="levels"):
        ResUNet(channels=(4, 8, 8), attention=[3])

    kw = dict(arch="resunet", loss="mse", restoration_steps=3, val_every=6, ckpt_every=6,
              noises=["gaussian"], level_range=(0.0, 0.8), base_channels=24)
    base = train(_cfg(tmp_path, out=str(tmp_path / "b.pt"), steps=4, **kw))
    b = model_from_checkpoint(load_checkpoint(base), "denoiser").eval()
    grown = build_model({**b.config, "attention": [2, 3]})
    missing = grown.load_state_dict(b.state_dict(), strict=False).missing_keys
    assert missing and all(".qkv." in k or ".proj." in k or ".norm." in k for k in missing)
    x = torch.rand(2, 1, 48, 40)
    with torch.no_grad():
        for p in b.tail.parameters():  # the zero-init tail would make any growth look exact
            p.data.normal_(0, 0.1)
        grown.tail.load_state_dict(b.tail.state_dict())
        assert torch.equal(grown.eval()(x), b(x))

    out = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "a.pt"), init=str(base), steps=6,
                                     stage="denoiser", attention=[2, 3], trainable="attention", **kw)))
    D = model_from_checkpoint(out, "denoiser")
    assert D.config["attention"] == [2, 3]
    start = model_from_checkpoint(load_checkpoint(base), "denoiser").state_dict()
    trained = D.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in start.items())  # every init weight kept
    assert float(trained["body.2.proj.weight"].abs().sum()) > 0  # the attention layers learned
    assert float(trained["decoders.0.2.proj.weight"].abs().sum()) > 0
    g = guided_backprop(D.eval(), torch.rand(1, 1, 64, 64) * 0.5 + 0.2, create_graph=True)
    g = g.detach()
    assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
    # a net with attention takes more levels the same way (the shipped pair has 2 3; level 1 costs little)
    more_ck = tmp_path / "a.pt"
    more = load_checkpoint(train(_cfg(tmp_path, out=str(tmp_path / "a1.pt"), init=str(more_ck), steps=6,
                                      stage="denoiser", attention=[1, 2, 3], trainable="attention", **kw)))
    D1 = model_from_checkpoint(more, "denoiser")
    assert D1.config["attention"] == [1, 2, 3]
    grown = D1.state_dict()
    assert all(torch.equal(grown[k], v) for k, v in start.items())  # every non-attention weight kept
    assert float(grown["encoders.1.2.proj.weight"].abs().sum()) > 0  # the new level-1 layer learned

    for bad, msg in ((dict(arch="unet", attention=[2]), "needs --arch resunet"),
                     (dict(trainable="attention", attention=[]), "needs --attention"),
                     (dict(attention=[4]), "must be in 0..3")):
        with pytest.raises(InputError, match=msg):
            train(_cfg(tmp_path, out=str(tmp_path / "x.pt"), **{**kw, **bad}))
    assert not (tmp_path / "x.pt").exists()
    # the command line's flags reach the run
    for flags, msg in ((["--attention", "2"], "needs --arch resunet"),
                       (["--arch", "resunet", "--trainable", "attention"], "needs --attention")):
        assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "y.pt"), "--device", "cpu",
                     *flags]) == 2
        assert msg in capsys.readouterr().err


def test_an_init_denoiser_of_another_shape_is_reported_not_silently_dropped(tmp_path, capsys):
    kw = dict(arch="resunet", loss="mse", restoration_steps=3, val_every=4, ckpt_every=4, steps=4,
              noises=["gaussian"], level_range=(0.0, 0.8))
    base = train(_cfg(tmp_path, out=str(tmp_path / "b6.pt"), base_channels=6, **kw))
    capsys.readouterr()
    train(_cfg(tmp_path, out=str(tmp_path / "b4.pt"), init=str(base), base_channels=4, **kw))  # narrower
    assert "starting a new denoiser" in capsys.readouterr().err


def test_a_grown_run_resumes(tmp_path, monkeypatch):
    """An interrupted fine-tune at a wider --base-channels resumes: f (frozen, from the narrower init)
    is not compared against the new width."""
    import FPDenoiseLib.training as tr

    kw = dict(arch="resunet", loss="mse", restoration_steps=3, val_every=4, ckpt_every=2,
              noises=["gaussian"], level_range=(0.0, 0.8))
    base = train(_cfg(tmp_path, out=str(tmp_path / "b4.pt"), steps=4, **kw))
    cfg = _cfg(tmp_path, out=str(tmp_path / "b6.pt"), init=str(base), base_channels=6, steps=4,
               stage="denoiser", **kw)
    original = tr._run_stage

    def die_after_first_save(role, model, c, steps, *a, **k):
        save = a[2]

        def save_then_die(step, state, _save=save):
            _save(step, state)
            raise SystemExit(9)

        return original(role, model, c, steps, a[0], a[1], save_then_die, *a[3:], **k)

    monkeypatch.setattr(tr, "_run_stage", die_after_first_save)
    with pytest.raises(SystemExit):
        train(cfg)
    monkeypatch.setattr(tr, "_run_stage", original)
    assert load_checkpoint(cfg.out)["resume"]["step"] == 2
    out = load_checkpoint(train(cfg, resume=True))
    assert out["models"]["denoiser"]["config"]["channels"] == [6, 12, 24, 48]
    assert out["training"]["completed"]
