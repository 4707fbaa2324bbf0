"""Networks: the paper's U-Net and DPIR's DRUNet architecture.

Both take ``(N, 1, H, W)`` float32 tensors in the normalised range and accept any ``H, W``: the
input is reflect-padded to a multiple of the total down-sampling factor and cropped back, so
512x512 CT slices, 2048x2500 X-rays and odd sizes all work.

Every ReLU is a :class:`GuidedReLU`: an ordinary ReLU in the forward pass, whose backward pass
switches to the Guided-Backpropagation rule inside :func:`FPDenoiseLib.xai.guided_mode`. Keeping
the switch on the module (not a global hook) makes GB thread-safe per model and lets the same
weights serve both plain training and GB explanations.

Example:
    >>> net = UNet(base_channels=8)
    >>> net(torch.zeros(1, 1, 37, 50)).shape
    torch.Size([1, 1, 37, 50])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError


class _GuidedReLUFn(torch.autograd.Function):
    """ReLU whose backward passes gradient only where input > 0 AND incoming gradient > 0.

    The backward is written with differentiable ops (``clamp`` of the incoming gradient, times a
    constant mask), so with ``create_graph=True`` the GB map is itself differentiable w.r.t. the
    upstream gradient seed. That is what lets the FP loss reach the denoiser's weights.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mask = x > 0
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad_out.clamp(min=0) * mask


class GuidedReLU(nn.Module):
    """``nn.ReLU`` that follows the Guided-Backpropagation rule while ``self.guided`` is True."""

    def __init__(self) -> None:
        super().__init__()
        self.guided = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.guided:
            return _GuidedReLUFn.apply(x)
        return F.relu(x)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        GuidedReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        GuidedReLU(),
    )


class _Up(nn.Module):
    """Bilinear x2 up-sampling, skip concatenation, double conv (paper's 'Up')."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(cin, cin // 2, 1)
        self.conv = _double_conv(cin // 2 + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, self.reduce(x)], dim=1))


def _pad_to_multiple(x: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph == 0 and pw == 0:
        return x, (h, w)
    # reflect needs pad < size; tiny inputs fall back to replicate
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


class UNet(nn.Module):
    """The paper's U-Net: stem double conv, ``depth`` x Down (max-pool + double conv), ``depth`` x Up
    (upsample + skip concat + double conv), 1x1 output conv; ReLU everywhere.

    Channels double per level: ``base_channels * 2**i`` (paper: 64-128-256-512-1024 for base 64;
    the paper lists 64..512 with 4 Down, i.e. the bottleneck is capped at ``max_channels``).

    Args:
        base_channels: width of the first level (paper 64; CPU default 16).
        depth: number of Down/Up modules (paper 4). Inputs are padded to a multiple of 2**depth.
        residual: if True the net predicts a residual that is added to its input
            (``D(y) = y + R(y)``, residual learning for the denoiser). The restoration net ``f``
            uses ``residual=False`` so that its whole mapping goes through ReLUs and GB of it is
            informative.
        max_channels: cap on channel count (paper: 512).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        residual: bool = True,
        max_channels: int = 512,
    ) -> None:
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError("depth and base_channels must be >= 1")
        self.config = {
            "arch": "unet",
            "in_channels": in_channels,
            "out_channels": out_channels,
            "base_channels": base_channels,
            "depth": depth,
            "residual": residual,
            "max_channels": max_channels,
        }
        self.depth = depth
        self.residual = residual and in_channels == out_channels
        chans = [min(base_channels * 2**i, max_channels) for i in range(depth + 1)]
        self.stem = _double_conv(in_channels, chans[0])
        self.downs = nn.ModuleList(_double_conv(chans[i], chans[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(_Up(chans[i + 1], chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], out_channels, 1)
        if self.residual:  # start as the identity: early training never makes images worse
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, (h, w) = _pad_to_multiple(x, 2**self.depth)
        feats = [self.stem(xp)]
        for down in self.downs:
            feats.append(down(F.max_pool2d(feats[-1], 2)))
        y = feats.pop()
        for up in self.ups:
            y = up(y, feats.pop())
        y = self.head(y)
        if self.residual:
            y = y + xp
        return y[..., :h, :w]


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), GuidedReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DRUNet(nn.Module):
    """DPIR's DRUNet architecture (Zhang et al. 2021): 4 scales of residual blocks, strided-conv
    down-sampling, transposed-conv up-sampling, additive skips, no biases.

    DPIR feeds a noise-level map as an extra input channel; here ``noise_level_map=True`` adds a
    constant channel ``sigma`` (normalised units), estimated from the image at inference when not
    given. Pretrained DPIR weights cannot be downloaded here, so this class is trained with our
    ``train`` command on the same data as the U-Net (benchmark baseline).
    """

    def __init__(
        self, base_channels: int = 16, blocks: int = 2, noise_level_map: bool = False, residual: bool = True
    ) -> None:
        super().__init__()
        self.config = {
            "arch": "drunet",
            "base_channels": base_channels,
            "blocks": blocks,
            "noise_level_map": noise_level_map,
            "residual": residual,
        }
        self.noise_level_map = noise_level_map
        self.residual = residual
        c = [base_channels * m for m in (1, 2, 4, 8)]
        cin = 2 if noise_level_map else 1
        self.head = nn.Conv2d(cin, c[0], 3, padding=1, bias=False)
        self.downs = nn.ModuleList(
            nn.Sequential(*[_ResBlock(c[i]) for _ in range(blocks)], nn.Conv2d(c[i], c[i + 1], 2, stride=2, bias=False))
            for i in range(3)
        )
        self.body = nn.Sequential(*[_ResBlock(c[3]) for _ in range(blocks)])
        self.ups = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2, bias=False), *[_ResBlock(c[i]) for _ in range(blocks)])
            for i in reversed(range(3))
        )
        self.tail = nn.Conv2d(c[0], 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        xp, (h, w) = _pad_to_multiple(x, 8)
        inp = xp
        if self.noise_level_map:
            if sigma is None:
                sigma = _estimate_sigma(xp)
            s = torch.as_tensor(sigma, dtype=xp.dtype, device=xp.device).reshape(-1, 1, 1, 1)
            inp = torch.cat([xp, s.expand(xp.shape[0], 1, *xp.shape[-2:])], dim=1)
        x0 = self.head(inp)
        skips = [x0]
        y = x0
        for down in self.downs:
            y = down(y)
            skips.append(y)
        y = self.body(y) + skips.pop()
        for up in self.ups:
            y = up(y) + skips.pop()
        y = self.tail(y)
        if self.residual:
            y = y + xp
        return y[..., :h, :w]


def _estimate_sigma(x: torch.Tensor) -> torch.Tensor:
    """Per-image noise std from the median absolute Laplacian-like high-pass (Donoho MAD)."""
    d = (x[..., 1:, 1:] - x[..., :-1, 1:] - x[..., 1:, :-1] + x[..., :-1, :-1]) / 2.0
    return d.abs().flatten(1).median(dim=1).values / 0.6745


def build_model(config: dict) -> nn.Module:
    """Rebuild a network from its ``config`` dict (as stored in checkpoints).

    >>> build_model(UNet(base_channels=4).config).config["base_channels"]
    4
    """
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    try:
        if arch == "unet":
            return UNet(**cfg)
        if arch == "drunet":
            return DRUNet(**cfg)
    except TypeError as err:
        raise CheckpointError(f"model config does not match architecture {arch!r}: {err}") from err
    raise CheckpointError(f"unknown architecture {arch!r} (known: unet, drunet)")
