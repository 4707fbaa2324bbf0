"""scripts/finetune_estimator.py: only the noise estimator learns, from whole slices and patches under a
random contrast (data.intensity_augment), and the recipe is recorded in the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from script_helpers import load_script

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from FPDenoiseLib.data import intensity_augment
from FPDenoiseLib.intensity import DEFAULT_POLICY
from FPDenoiseLib.io import Image, write_image
from FPDenoiseLib.models import ResUNet, UNet

fte = load_script("scripts/finetune_estimator.py", "finetune_estimator")


def test_intensity_augment_is_a_monotone_contrast_change_of_a_clean_image():
    img = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    outs = [intensity_augment(img, np.random.default_rng(s), invert_prob=0.0) for s in range(5)]
    for out in outs:  # the order of grey levels (anatomy) is kept, values stay >= 0, nothing else is added
        assert out.dtype == np.float32 and out.min() >= 0 and np.all(np.diff(out.ravel()) >= 0)
    assert len({round(float(o.mean()), 4) for o in outs}) == 5  # the draws differ
    inv = intensity_augment(img, np.random.default_rng(0), gamma=(1.0, 1.0), invert_prob=1.0)
    fg = img > 0.05 * np.percentile(img, 99.5)
    assert np.all(np.diff(inv[fg]) <= 1e-7)  # reversed inside the object
    assert np.all(np.diff(inv[~fg]) >= 0) and inv[~fg].max() <= 0.06  # air keeps its (dark) order
    np.testing.assert_array_equal(intensity_augment(img, np.random.default_rng(3)),
                                  intensity_augment(img, np.random.default_rng(3)))


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_finetune_changes_only_the_estimator_and_records_the_recipe(tmp_path, capsys, ema):
    torch.manual_seed(0)
    net = ResUNet(channels=(4, 8, 8, 8), blocks=1, estimator_channels=4, estimator_depth=3, estimator_global=True)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    src = save_checkpoint(tmp_path / "src.pt", {"denoiser": net, "restoration": UNet(base_channels=4, depth=2)},
                          normalization=DEFAULT_POLICY,
                          training={"name": "t", "noises": ["gaussian", "poisson"], "level_range": [0.0, 0.8]})
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(2):  # real files, read through the corpus loader
        vol = (rng.random((2, 112, 100)) * 1400 - 1000).astype(np.int16)
        write_image(Image(vol, (0.7, 0.7, 2.0), (0, 0, 0), modality="CT"), data / f"ct{i}.nrrd")
    out = tmp_path / "ft.pt"
    assert fte.main([str(src), "--out", str(out), "--data", str(data), "--steps", "3", "--eval-every", "2",
                     "--patches", "2", "--full", "1", "--zoom", "1.0", "--lr", "1e-2", "--threads", "1",
                     "--ema", str(ema), "--faint", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "before" in text and "check 2" in text and "check 3" in text
    ck = load_checkpoint(out)
    before, after = net.state_dict(), model_from_checkpoint(ck, "denoiser").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("estimator.") for k in changed)  # the denoiser itself is untouched
    torch.testing.assert_close(model_from_checkpoint(ck, "restoration").state_dict(),
                               model_from_checkpoint(load_checkpoint(src), "restoration").state_dict())
    (rec,) = ck["training"]["estimator_finetune"]
    assert rec["steps"] == 3 and rec["steps_done"] == 3 and rec["data"] == [str(data)] and rec["lr"] == 1e-2
    assert rec["ema"] == ema and rec["faint"] == 0.5
    assert ck["training"]["noises"] == ["gaussian", "poisson"]  # the model's own record is kept


def test_finetune_refuses_a_denoiser_without_an_estimator(tmp_path):
    src = save_checkpoint(tmp_path / "u.pt", {"denoiser": UNet(base_channels=4, depth=2)},
                          normalization=DEFAULT_POLICY, training={"noises": ["gaussian"], "level_range": [0, 1]})
    with pytest.raises(SystemExit):
        fte.main([str(src), "--out", str(tmp_path / "o.pt"), "--steps", "1"])


def test_ema_saves_the_average_of_the_weights(tmp_path):
    torch.manual_seed(1)
    net = ResUNet(channels=(4, 8), blocks=1, estimator_channels=4, estimator_depth=3)
    src = save_checkpoint(tmp_path / "src.pt", {"denoiser": net}, normalization=DEFAULT_POLICY,
                          training={"noises": ["gaussian"], "level_range": [0.1, 0.5]})
    data = tmp_path / "data"
    vol = (np.random.default_rng(1).random((1, 100, 100)) * 1000 - 500).astype(np.int16)
    write_image(Image(vol, (0.7, 0.7, 2.0), (0, 0, 0), modality="CT"), data / "ct.nrrd")
    common = [str(src), "--data", str(data), "--steps", "1", "--patches", "1", "--full", "1", "--lr", "1e-2",
              "--threads", "1"]
    fte.main([*common, "--out", str(tmp_path / "plain.pt")])
    fte.main([*common, "--out", str(tmp_path / "ema.pt"), "--ema", "0.5"])
    w0 = net.estimator.state_dict()
    w1 = model_from_checkpoint(load_checkpoint(tmp_path / "plain.pt"), "denoiser").estimator.state_dict()
    avg = model_from_checkpoint(load_checkpoint(tmp_path / "ema.pt"), "denoiser").estimator.state_dict()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    for k in w0:  # one step with decay 0.5: the saved weights are the mean of the start and the step
        torch.testing.assert_close(avg[k], 0.5 * (w0[k] + w1[k]), atol=1e-6, rtol=1e-5)
