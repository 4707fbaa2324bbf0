"""Networks, Guided Backprop, FP loss and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from FPDenoiseLib.errors import CheckpointError
from FPDenoiseLib.losses import FPLoss
from FPDenoiseLib.models import DRUNet, GuidedReLU, UNet, build_model
from FPDenoiseLib.xai import guided_backprop, guided_mode


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (2, 1, 37, 50), (1, 1, 5, 3), (3, 1, 64, 31)])
def test_unet_and_drunet_keep_any_size(shape):
    x = torch.rand(shape)
    assert UNet(base_channels=4)(x).shape == x.shape
    assert DRUNet(base_channels=4, blocks=1)(x).shape == x.shape


def test_paper_unet_channels_and_config_roundtrip():
    net = UNet(base_channels=64, max_channels=512)
    widths = [net.stem[0].out_channels] + [d[0].out_channels for d in net.downs]
    assert widths == [64, 128, 256, 512, 512]
    assert len(net.downs) == 4 and len(net.ups) == 4
    assert all(isinstance(m, GuidedReLU) for m in [net.stem[1], net.stem[3]])
    rebuilt = build_model(net.config)
    assert rebuilt.config == net.config
    with pytest.raises(CheckpointError):
        build_model({"arch": "nope"})


def test_residual_unet_starts_as_identity():
    x = torch.rand(2, 1, 20, 24)
    assert torch.equal(UNet(base_channels=4)(x), x)


class _Tiny(nn.Module):
    """y = W2 relu(W1 x + b1) + b2 with 1x1 convs: GB can be written out by hand per pixel."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 1)
        self.act = GuidedReLU()
        self.c2 = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


def test_guided_backprop_equals_hand_computation():
    """The guided rule, written out for the legacy energy readout 0.5*||f||^2 (seed = f(y))."""
    torch.manual_seed(3)
    net = _Tiny()
    with torch.no_grad():
        net.c1.weight.copy_(torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1))
        net.c1.bias.copy_(torch.tensor([0.1, 0.3, -0.2]))
        net.c2.weight.copy_(torch.tensor([0.7, 1.5, -1.0]).view(1, 3, 1, 1))
        net.c2.bias.fill_(-0.05)
    x = torch.linspace(-1, 1, 12).view(1, 1, 3, 4)
    gb = guided_backprop(net, x, readout="energy")[0, 0].numpy()

    w1, b1 = np.array([1.0, -2.0, 0.5]), np.array([0.1, 0.3, -0.2])
    w2, b2 = np.array([0.7, 1.5, -1.0]), -0.05
    xs = x[0, 0].numpy().astype(np.float64)
    pre = w1[:, None, None] * xs + b1[:, None, None]
    y = (w2[:, None, None] * np.maximum(pre, 0)).sum(0) + b2
    g_h = w2[:, None, None] * y  # d(0.5 y^2)/dh = W2^T y
    g_pre = np.maximum(g_h, 0) * (pre > 0)  # guided rule: positive input AND positive gradient
    expected = (w1[:, None, None] * g_pre).sum(0)
    np.testing.assert_allclose(gb, expected, rtol=1e-5, atol=1e-6)
    # and it differs from the plain gradient where the gradient sign gate bites
    plain = (w1[:, None, None] * g_h * (pre > 0)).sum(0)
    assert not np.allclose(plain, expected)
    assert not net.act.guided  # mode restored


def test_guided_mode_requires_guided_relus():
    with pytest.raises(TypeError):
        with guided_mode(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())):
            pass


def test_display_mode_keeps_no_graph():
    f = UNet(base_channels=4, residual=False)
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    gb = guided_backprop(f, x)
    assert not gb.requires_grad and gb.grad_fn is None


def _trained_pair():
    torch.manual_seed(0)
    f = UNet(base_channels=4, residual=False)
    d = UNet(base_channels=4)
    nn.init.normal_(d.head.weight, std=0.05)
    return f, d


def test_fp_loss_gradient_reaches_denoiser_and_is_finite():
    f, d = _trained_pair()
    clean = torch.rand(2, 1, 32, 32)
    noisy = clean + 0.1 * torch.randn_like(clean)
    loss = FPLoss(f, lam=1.0)
    gb_clean = loss.gb_clean(clean)
    den = d(noisy)
    _, parts = loss(den, noisy, clean, gb_clean)
    fp_only = loss.lam * (guided_backprop(f, den, create_graph=True) - gb_clean).pow(2).mean() / loss.gb_scale
    grads = torch.autograd.grad(fp_only, list(d.parameters()), allow_unused=True)
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert parts["fp"] > 0
    assert np.isfinite(total) and total > 0
    assert all(p.grad is None for p in f.parameters())  # f frozen


def test_linear_readout_trap_gives_exactly_zero_gradient():
    """Documents why xai uses the energy readout: sum(f(y)) gives d(FP)/d(weights) == 0 exactly."""
    f, d = _trained_pair()
    noisy = torch.rand(2, 1, 32, 32)
    den = d(noisy)
    with guided_mode(f):
        (g,) = torch.autograd.grad(f(den).sum(), den, create_graph=True)
    fp = g.pow(2).mean()
    grads = torch.autograd.grad(fp, list(d.parameters()), allow_unused=True)
    assert sum(float(gr.abs().sum()) for gr in grads if gr is not None) == 0.0


def test_mse_mode_is_residual_only_and_equals_mse_to_clean():
    clean = torch.rand(2, 1, 8, 8)
    noisy = clean + 0.2
    den = noisy - 0.1
    total, parts = FPLoss(None, mode="mse")(den, noisy, clean)
    assert parts["fp"] == 0.0
    assert torch.isclose(total, (den - clean).pow(2).mean())
    with pytest.raises(ValueError):
        FPLoss(None, mode="fp")


def test_log_residual_norm_is_mean_per_sample_log_mse_and_balances_severities():
    from FPDenoiseLib.losses import LOG_EPS

    clean = torch.zeros(2, 1, 8, 8)
    noisy = clean.clone()
    noisy[0] += 0.01  # mild
    noisy[1] += 0.5  # severe
    den = noisy.clone().requires_grad_(True)  # the identity: residual = the noise
    total, _ = FPLoss(None, mode="mse", residual_norm="log")(den, noisy, clean)
    want = torch.log(LOG_EPS + torch.tensor([0.01**2, 0.5**2])).mean()
    assert torch.isclose(total, want)
    (g,) = torch.autograd.grad(total, den)
    # d log(mse)/d den = 2 r / (numel * mse): per pixel 2/(64 r); the mild sample pulls ~50x harder
    # (the plain mean gives it 50x less pull than the severe one)
    ratio = float(g[0].abs().mean() / g[1].abs().mean())
    assert 40 < ratio < 51
    (g_mean,) = torch.autograd.grad(FPLoss(None, mode="mse")(den, noisy, clean)[0], den)
    assert float(g_mean[0].abs().mean() / g_mean[1].abs().mean()) == pytest.approx(0.02, rel=1e-4)
    with pytest.raises(ValueError, match="residual_norm"):
        FPLoss(None, mode="mse", residual_norm="sum")


def test_checkpoint_roundtrip_hash_and_half(tmp_path):
    f, d = _trained_pair()
    p = save_checkpoint(tmp_path / "m.pt", {"denoiser": d, "restoration": f},
                        normalization={"ct_window": [-1024, 3071]}, training={"name": "x"})
    ck = load_checkpoint(p)
    d2 = model_from_checkpoint(ck, "denoiser")
    x = torch.rand(1, 1, 24, 24)
    assert torch.equal(d2(x), d.eval()(x))
    # tampered weights are refused
    ck["models"]["denoiser"]["state_dict"]["head.weight"] += 1
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="hash"):
        load_checkpoint(tmp_path / "bad.pt")
    # float16 shipping copy loads as float32 and stays close
    p16 = save_checkpoint(tmp_path / "h.pt", {"denoiser": d, "restoration": f}, normalization={}, dtype=torch.float16)
    assert p16.stat().st_size < 0.6 * p.stat().st_size
    d16 = model_from_checkpoint(load_checkpoint(p16), "denoiser")
    assert next(d16.parameters()).dtype == torch.float32
    assert torch.allclose(d16(x), d(x), atol=1e-3)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
