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

import math

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
        out = torch.relu(x)
        # the output, not a mask: the next layer keeps it for its own backward anyway (no extra memory)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        # in place on clamp's fresh result (clamp keeps its input, not its result); same values as `* mask`
        return grad_out.clamp(min=0).mul_(out > 0)


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


def float32_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in float32 also inside an autocast region (output in autocast's dtype).

    For the layers that read the raw image: bfloat16 keeps 8 significant bits, so an intensity of
    0.5 (normalised) would be rounded by up to 0.002, a fifth of a 2 % noise sigma's step, and the net
    would read that rounding as noise. Their outputs are features, which bf16 holds well. Measured on
    the shipped default (7 held-out CT slices, Gaussian 2 %): bf16 everywhere 45.18 dB, with the two
    input convolutions in float32 45.23, float32 45.23.

    >>> conv = nn.Conv2d(1, 2, 3)
    >>> x = torch.rand(1, 1, 8, 8)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     y = float32_layer(conv, x)
    >>> y.dtype, torch.equal(y, conv(x).to(torch.bfloat16))  # conv(x) out here: float32
    (torch.bfloat16, True)
    """
    dev = x.device.type
    try:
        on = torch.is_autocast_enabled(dev)
        dtype = torch.get_autocast_dtype(dev) if on else None
    except (TypeError, AttributeError):  # torch < 2.4 has no device argument here
        on = torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()
        dtype = (torch.get_autocast_cpu_dtype() if dev == "cpu" else torch.get_autocast_gpu_dtype()) if on else None
    if not on:
        return layer(x)
    with torch.autocast(dev, enabled=False):
        return layer(x.float()).to(dtype)


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


def local_noise_map(noise: torch.Tensor, radius: float = 2.0) -> torch.Tensor:
    """Local RMS of a noise realisation ``noise`` (N,1,H,W): ``sqrt(G_radius * noise^2)``.

    The supervision target of :class:`NoiseLevelEstimator` and the map :class:`ResUNet` is
    trained with. Signal-dependent noise (Poisson, Rician, speckle) and local artifacts get a
    map that varies over the image; white Gaussian noise gets a flat map equal to its sigma.
    """
    k = int(math.ceil(3 * radius))
    t = torch.arange(-k, k + 1, dtype=noise.dtype, device=noise.device)
    g = torch.exp(-0.5 * (t / radius) ** 2)
    g = g / g.sum()
    e = noise.pow(2)
    e = F.conv2d(F.pad(e, (k, k, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    e = F.conv2d(F.pad(e, (0, 0, k, k), mode="replicate"), g.view(1, 1, -1, 1))
    return e.clamp_min(0).sqrt()


def impulse_mask(
    x: torch.Tensor, *, tol: float = 1e-3, threshold: float = 0.03, max_neighbours: int = 2,
    min_fraction: float = 2e-3,
) -> torch.Tensor:
    """Isolated salt & pepper pixels of ``x`` (N,1,H,W, normalised units) as a bool mask.

    A pixel is an impulse when it sits at its image's extreme value (its min or max within ``tol``:
    where dead or saturated detector elements and salt & pepper put it), at most ``max_neighbours`` of its 8 neighbours
    share that extreme (clipped air, saturated metal and bright bone come in clusters), and it
    differs from its 3x3 median by more than ``threshold``. An image where fewer than
    ``min_fraction`` of the pixels qualify gets no mask at all: a clean image's single brightest
    pixel is anatomy, not noise.

    >>> x = torch.full((1, 1, 32, 32), 0.4); x[0, 0, ::4, ::4] = 1.0
    >>> int(impulse_mask(x).sum())
    64
    """
    n = x.shape[0]
    xd = x.detach()
    lo, hi = xd.flatten(1).min(1).values.view(n, 1, 1, 1), xd.flatten(1).max(1).values.view(n, 1, 1, 1)
    ones = torch.ones(1, 1, 3, 3, dtype=xd.dtype, device=xd.device)
    cand = torch.zeros_like(xd, dtype=torch.bool)
    for at in (xd >= hi - tol, xd <= lo + tol):
        a = at.to(xd.dtype)
        neighbours = F.conv2d(F.pad(a, (1, 1, 1, 1)), ones) - a
        cand |= at & (neighbours <= max_neighbours)
    keep = cand.flatten(1).float().mean(1) >= min_fraction
    if not bool(keep.any()):
        return torch.zeros_like(cand)
    cand &= keep.view(n, 1, 1, 1)
    at = cand.nonzero(as_tuple=True)
    cand[at] = (xd[at] - _window_values(xd, at, 3).median(dim=1).values).abs() > threshold
    keep = cand.flatten(1).float().mean(1) >= min_fraction
    return cand & keep.view(n, 1, 1, 1)


def _window_values(x: torch.Tensor, at: tuple[torch.Tensor, ...], size: int) -> torch.Tensor:
    """(k, size*size) values of the ``size`` x ``size`` windows (edge-replicated) around the
    pixels ``at`` (a ``nonzero(as_tuple=True)`` of an (N,1,H,W) mask): only where needed."""
    h, w = x.shape[-2:]
    r = torch.arange(-(size // 2), size // 2 + 1, device=x.device)
    ys = (at[2][:, None, None] + r[None, :, None]).clamp(0, h - 1)
    xs = (at[3][:, None, None] + r[None, None, :]).clamp(0, w - 1)
    return x[at[0][:, None, None], at[1][:, None, None], ys, xs].flatten(1)


def replace_impulses(x: torch.Tensor, mask: torch.Tensor, size: int = 5, passes: int = 3) -> torch.Tensor:
    """``x`` with the ``mask`` pixels replaced by the median of the unmasked pixels around them
    (``size`` x ``size``): a switching median, which leaves every other pixel untouched. A
    later pass catches the impulses that dense noise had hidden in clusters."""
    for i in range(passes):
        if i:  # the image is known to carry impulses: no minimum count now
            mask = impulse_mask(x, min_fraction=0.0)
        if not bool(mask.any()):
            return x
        at = mask.nonzero(as_tuple=True)
        v = torch.where(mask, torch.full_like(x, float("nan")), x)
        win = _window_values(v, at, size)
        # nanmedian has no kernel on some backends (MPS): the few flagged windows go through the CPU
        med = (win.cpu().nanmedian(dim=1).values.to(x.device) if x.device.type == "mps"
               else win.nanmedian(dim=1).values)
        med = torch.where(torch.isnan(med), x[at], med)  # a window of impulses only: keep
        x = x.index_put(at, med)
    return x


class NoiseLevelEstimator(nn.Module):
    """Small CNN that predicts the local noise-level map (normalised units) of an image.

    Works at half resolution (pixel-unshuffle) for speed; the output is non-negative
    (softplus) and smoothed, then up-sampled back to full resolution.
    """

    def __init__(
        self, unshuffle: int = 2, channels: int = 24, depth: int = 5, global_context: bool = False, fit: bool = False
    ) -> None:
        super().__init__()
        u2 = unshuffle**2
        self.unshuffle = unshuffle
        self.fit = fit
        layers: list[nn.Module] = [nn.Conv2d(u2, channels, 3, padding=1), GuidedReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), GuidedReLU()]
        self.global_context = global_context
        if global_context:
            # Whether noise is flat (Gaussian) or follows the signal (Poisson, Rician) is a property of
            # the whole image, which a 20-pixel receptive field cannot see: the image-wide mean of
            # the features joins every pixel's own before the last layers.
            self.body = nn.Sequential(*layers)
            self.mix = nn.Sequential(nn.Conv2d(2 * channels, channels, 1), GuidedReLU(),
                                     nn.Conv2d(channels, channels, 3, padding=1), GuidedReLU())
            self.out = nn.Conv2d(channels, 1, 3, padding=1)
        else:
            layers.append(nn.Conv2d(channels, 1, 3, padding=1))
            self.net = nn.Sequential(*layers)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.global_context:
            return self.net[1:](float32_layer(self.net[0], x))
        h = self.body[1:](float32_layer(self.body[0], x))
        g = h.mean(dim=(2, 3), keepdim=True).expand_as(h)
        return self.out(self.mix(torch.cat([h, g], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xu = F.pixel_unshuffle(x, self.unshuffle)
        z = self._logits(xu)
        # softplus keeps the map >= 0; the 0.1 scale puts typical sigmas (0.005-0.15) near z ~ 0
        s = 0.1 * F.softplus(z - 2.0)
        s = F.avg_pool2d(s, 5, stride=1, padding=2, count_include_pad=False)
        if self.fit:
            # straight-through: the estimator's own loss still sees its raw map
            s = s + (fit_noise_map(s.detach(), xu.mean(1, keepdim=True)) - s).detach()
        return F.interpolate(s, scale_factor=self.unshuffle, mode="bilinear", align_corners=False)


MAP_FIT_BINS = 16
MAP_FIT_TAU = 0.2


def fit_noise_map(
    noise_map: torch.Tensor, image: torch.Tensor, *, bins: int = MAP_FIT_BINS, tau: float = MAP_FIT_TAU
) -> torch.Tensor:
    """Regularise a local noise-level map by a smooth function of the local intensity.

    A per-pixel estimate fluctuates even where the noise is flat (Gaussian) and is biased by the
    texture under it (lung parenchyma under 2 % Gaussian noise: read 20-25 % low), so the denoiser
    over- and under-smooths with it; yet the noise of real scanners does depend on the signal
    (Poisson, Rician, speckle). So the variance is fitted as ``a + b I + c I^2`` of the
    5x5-smoothed intensity ``I`` (weighted least squares over ``bins`` equal-count intensity bins:
    a Poisson-Gaussian model plus a multiplicative term), and the map's deviations from the fit
    are soft-thresholded at ``tau`` times the fit: small fluctuations vanish, large local
    departures (an artifact in one region) stay.

    Measured on the held-out patients, the shipped FP model with and without it (same weights;
    ``Resources/Models/README.md``): Gaussian 2 % +0.16 dB, Poisson 200 +0.65 dB, 13-type grid mean
    +0.09 dB, for about 7 ms of a 512x512 slice's 80-90 ms.

    Args:
        noise_map: (B, 1, H, W) noise std, normalised units (>= 0).
        image: (B, 1, H, W) the image at the map's resolution.
        bins: intensity bins per image (fewer on small images: at least 128 pixels per bin).
        tau: soft threshold, as a fraction of the fitted level (0 = keep the map as it is).

    >>> m = torch.full((1, 1, 32, 32), 0.02) + 0.002 * torch.randn(1, 1, 32, 32)
    >>> bool(fit_noise_map(m, torch.rand(1, 1, 32, 32)).std() < m.std() / 2)
    True
    """
    pooled = F.avg_pool2d(image, 5, stride=1, padding=2, count_include_pad=False)
    out = torch.empty_like(noise_map)
    for b in range(noise_map.shape[0]):
        # the statistics (16 numbers) on the CPU: quantile and float64 lstsq are not on every device
        v = noise_map[b, 0].reshape(-1).detach().float().cpu().square()
        i = pooled[b, 0].reshape(-1).detach().float().cpu()
        nb = max(1, min(bins, i.numel() // 128))
        q = torch.linspace(0, 1, nb + 1)[1:-1]
        # bin edges from at most 16384 pixels: the sort dominates the cost (4.3 vs 0.9 ms at 256x256)
        idx = torch.bucketize(i, torch.quantile(i[:: max(1, i.numel() // 16384)], q))
        cnt = torch.zeros(nb).index_add_(0, idx, torch.ones_like(i))
        used = cnt > 0  # ties (e.g. a constant background) leave bins empty
        cnt = cnt[used]
        var = torch.zeros(nb).index_add_(0, idx, v)[used] / cnt
        centre = torch.zeros(nb).index_add_(0, idx, i)[used] / cnt
        lo, span = float(centre.min()), max(float(centre.max() - centre.min()), 1e-6)
        t = (centre - lo) / span
        deg = min(2, t.numel() - 1)  # one bin: a flat map
        w = cnt.sqrt().double()[:, None]
        basis = torch.stack([t**k for k in range(deg + 1)], 1).double()
        coef = torch.linalg.lstsq(basis * w, var.double()[:, None] * w).solution[:, 0].tolist()
        tp = ((pooled[b, 0].float() - lo) / span).clamp(0, 1)
        # a quadratic may dip below zero between bins: floor it at a twentieth of the lowest bin
        fitted = sum(c * tp**k for k, c in enumerate(coef)).clamp_min(0.05 * float(var.min()))
        out[b, 0] = fitted.sqrt().to(out.dtype)
    fitted = F.avg_pool2d(out, 5, stride=1, padding=2, count_include_pad=False)
    d = noise_map - fitted
    return fitted + torch.sign(d) * (d.abs() - tau * fitted).clamp_min(0)


class WindowAttention(nn.Module):
    """Multi-head self-attention over ``window`` x ``window`` tiles of a feature map (0: the whole map).

    A learned non-local mean: each position averages the features of similar positions in its tile,
    which convolutions of the same cost cannot do and which is where BM3D / NL-means beat a small
    CNN (flat air, parenchyma and soft tissue). ``shift`` offsets the tiles (Swin's shifted windows),
    so two such layers see across each other's tile borders. The output projection starts at zero,
    so adding the layer to a trained net leaves its output unchanged (``ResUNet(attention=...)``
    grown from a checkpoint without it). Softmax is no ReLU: guided backpropagation passes its
    plain gradient, the ReLUs around it stay guided.

    >>> a = WindowAttention(8, window=4, shift=2)
    >>> x = torch.rand(1, 8, 10, 12)
    >>> bool(torch.equal(a(x), x))
    True
    """

    HEAD_DIM = 24

    def __init__(self, channels: int, window: int = 8, shift: int = 0, head_dim: int = HEAD_DIM) -> None:
        super().__init__()
        if window < 0 or not 0 <= shift < max(window, 1):
            raise ValueError(f"WindowAttention: window {window} >= 0 and 0 <= shift < window needed, got shift {shift}")
        self.window, self.shift = int(window), int(shift)
        heads = max(1, channels // head_dim)
        while channels % heads:  # e.g. 128 channels: 4 heads of 32 (not 5 of 25.6)
            heads -= 1
        self.heads = heads
        self.norm = nn.GroupNorm(1, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads, d = self.heads, c // self.heads
        t = self.qkv(self.norm(x))
        if not self.window:
            t = t.reshape(b, 3, heads, d, h * w).permute(1, 0, 2, 4, 3)
            o = F.scaled_dot_product_attention(t[0], t[1], t[2]).permute(0, 1, 3, 2).reshape(b, c, h, w)
            return x + self.proj(o)
        k = self.window
        if self.shift:
            t = torch.roll(t, (-self.shift, -self.shift), (2, 3))
        ph, pw = (-h) % k, (-w) % k
        if ph or pw:  # reflect needs the pad below the size: a tile larger than the map is padded by replication
            t = F.pad(t, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        hp, wp = h + ph, w + pw
        t = t.reshape(b, 3, heads, d, hp // k, k, wp // k, k).permute(1, 0, 4, 6, 2, 5, 7, 3)
        t = t.reshape(3, -1, heads, k * k, d)
        o = F.scaled_dot_product_attention(t[0], t[1], t[2])
        o = o.reshape(b, hp // k, wp // k, heads, k, k, d).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, hp, wp)
        o = o[..., :h, :w]
        if self.shift:
            o = torch.roll(o, (self.shift, self.shift), (2, 3))
        return x + self.proj(o)


class ResUNet(nn.Module):
    """Fast noise-aware residual U-Net (the default denoiser).

    Pixel-unshuffle (x2) in, four levels of residual blocks (channels 16-32-64-128 by default,
    strided-conv down, transposed-conv up, additive skips), pixel-shuffle out, global residual
    ``D(y) = y + tanh(g m) R(y, m)``. ``m`` is a noise-level map given as an extra input channel, as in
    DPIR/FFDNet; when not given it is predicted by a built-in :class:`NoiseLevelEstimator`
    (blind denoising). ``strength`` s (the Low / Medium / High of commercial deep-learning
    reconstruction): 0 returns the input exactly; below 1 the output is the blend
    ``y + s (D(y) - y)`` of the input with the full correction; above 1 the map is scaled by s
    (stronger).

    Working at half resolution makes it ~4x cheaper than a full-resolution U-Net of the same
    width, which is what keeps a 512x512 slice under 0.1 s on two CPU cores. ``attention`` lists
    levels (0 = the top) that get :class:`WindowAttention` after their blocks: 8x8 tiles (shifted by
    4 in the decoder), the bottom level over the whole map (experimental; 1.15x the time at 2, 3).
    ``map_gain`` scales the estimated map the net reads (a calibration after training, 1 = as trained;
    ``scripts/calibrate_map_gain.py``); a map passed in is used as it is.

    >>> net = ResUNet(channels=(4, 8, 8, 8), blocks=1)
    >>> net(torch.zeros(1, 1, 37, 50)).shape
    torch.Size([1, 1, 37, 50])
    """

    MAP_SCALE = 10.0  # map values ~0.01-0.15 -> ~0.1-1.5 at the input, like the image channel
    ATTENTION_WINDOW = 8  # tiles of the attention levels (8 at 1/8 resolution: 64 pixels of the slice)

    def __init__(
        self,
        channels: tuple[int, ...] | list[int] = (16, 32, 64, 128),
        blocks: int = 2,
        unshuffle: int = 2,
        estimator_channels: int = 24,
        estimator_depth: int = 5,
        residual_gate: float = 40.0,
        impulse_filter: bool = False,
        estimator_global: bool = False,
        map_fit: bool = False,
        attention: tuple[int, ...] | list[int] = (),
        map_gain: float = 1.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not (math.isfinite(map_gain) and map_gain > 0):
            raise ValueError(f"ResUNet map_gain must be > 0, got {map_gain}")
        attention = sorted({int(a) for a in attention})
        if any(not 0 <= a < len(channels) for a in attention):
            raise ValueError(f"ResUNet attention levels must be in 0..{len(channels) - 1}, got {attention}")
        if len(channels) < 2 or min(channels) < 1 or blocks < 1 or unshuffle < 1:
            raise ValueError("ResUNet needs >= 2 levels, positive channels, blocks >= 1 and unshuffle >= 1")
        self.config = {
            "arch": "resunet",
            "channels": channels,
            "blocks": blocks,
            "unshuffle": unshuffle,
            "estimator_channels": estimator_channels,
            "estimator_depth": estimator_depth,
            "residual_gate": float(residual_gate),
            "impulse_filter": bool(impulse_filter),
            "estimator_global": bool(estimator_global),
        }
        if map_fit:  # only when set: older checkpoints keep their config (and content hash)
            self.config["map_fit"] = True
        if attention:  # likewise
            self.config["attention"] = attention
        if map_gain != 1.0:  # likewise; a calibration set after training (scripts/calibrate_map_gain.py)
            self.config["map_gain"] = float(map_gain)
        # the estimated map is scaled by it before the net reads it; estimate_noise() stays the measurement
        self.map_gain = float(map_gain)
        self.impulse_filter = bool(impulse_filter)
        self.residual_gate = float(residual_gate)
        self.unshuffle = unshuffle
        self.multiple = unshuffle * 2 ** (len(channels) - 1)
        u2 = unshuffle**2
        c = channels
        self.estimator = NoiseLevelEstimator(unshuffle, estimator_channels, estimator_depth, estimator_global, map_fit)
        self.head = nn.Conv2d(2 * u2, c[0], 3, padding=1, bias=False)
        win = self.ATTENTION_WINDOW

        def level(i: int, shift: int) -> nn.Sequential:  # a level's blocks, then its attention if any
            attn = [WindowAttention(c[i], win, shift)] if i in attention else []
            return nn.Sequential(*[_ResBlock(c[i]) for _ in range(blocks)], *attn)

        self.encoders = nn.ModuleList(level(i, 0) for i in range(len(c) - 1))
        self.downs = nn.ModuleList(nn.Conv2d(c[i], c[i + 1], 2, stride=2, bias=False) for i in range(len(c) - 1))
        # the bottom level attends globally (a 512x512 slice is 32x32 there at 4 levels)
        top = [WindowAttention(c[-1], 0, 0, 2 * WindowAttention.HEAD_DIM)] if len(c) - 1 in attention else []
        self.body = nn.Sequential(*[_ResBlock(c[-1]) for _ in range(blocks)], *top)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2, bias=False) for i in reversed(range(len(c) - 1))
        )
        self.decoders = nn.ModuleList(level(i, win // 2) for i in reversed(range(len(c) - 1)))
        self.tail = nn.Conv2d(c[0], u2, 3, padding=1, bias=False)
        nn.init.zeros_(self.tail.weight)  # starts as the identity

    def estimate_noise(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted local noise-level map of ``x`` (same shape, normalised units)."""
        x = self.remove_impulses(x)
        xp, (h, w) = _pad_to_multiple(x, self.multiple)
        return self.estimator(xp)[..., :h, :w]

    def remove_impulses(self, x: torch.Tensor) -> torch.Tensor:
        """The switching-median pre-stage (``impulse_filter``): isolated salt & pepper pixels carry
        no measurement, so they are replaced before the network sees the image."""
        return replace_impulses(x, impulse_mask(x)) if self.impulse_filter else x

    def forward(
        self,
        x: torch.Tensor,
        noise_map: torch.Tensor | None = None,
        strength: float = 1.0,
        return_map: bool = False,
        teacher_mask: torch.Tensor | None = None,
    ):
        """Denoise ``x``; ``noise_map`` (broadcastable to ``x``) overrides the estimate.

        ``teacher_mask`` (training only, bool per sample): use ``noise_map`` for these samples
        and the detached estimate for the others; the estimate is returned for its own loss.
        """
        if strength == 0:  # exact identity, not a learned approximation of it
            out = x.clone()
            return (out, torch.zeros_like(x)) if return_map else out
        x = self.remove_impulses(x)
        xp, (h, w) = _pad_to_multiple(x, self.multiple)
        est = self.estimator(xp) if (noise_map is None or return_map) else None
        if noise_map is None:
            m = est if self.map_gain == 1.0 else est * self.map_gain
        else:
            m, _ = _pad_to_multiple(noise_map.expand_as(x), self.multiple)
            if teacher_mask is not None:
                m = torch.where(teacher_mask.view(-1, 1, 1, 1), m, est.detach())
        u = self.unshuffle
        # Below 1 the map stays as estimated and only the correction is scaled (below). Scaling the map
        # is no smooth control there: the default removed 80 HU of 100 HU noise at half the map as at the
        # full map, and the CT texture model turned almost off (real CT, 60 HU: 59 HU left at half the
        # map, 29 HU at the full map), since a net reads what exceeds its map as structure.
        ms = max(strength, 1.0)
        inp = torch.cat([F.pixel_unshuffle(xp, u), F.pixel_unshuffle(m * (ms * self.MAP_SCALE), u)], dim=1)
        y = float32_layer(self.head, inp)  # reads the raw image
        skips = []
        for enc, down in zip(self.encoders, self.downs):  # noqa: B905 (Python 3.9 has no strict=)
            y = enc(y)
            skips.append(y)
            y = down(y)
        y = self.body(y)
        for up, dec in zip(self.ups, self.decoders):  # noqa: B905
            y = dec(up(y) + skips.pop())
        r = F.pixel_shuffle(self.tail(y), u).float()  # under bf16 autocast: gate and strength in float32
        if self.residual_gate > 0:
            # The correction is gated by the local noise level, tanh(gate * m): where the map is 0
            # the output is the input exactly (clean images and regions pass unchanged); at typical
            # noise levels (m >~ 2 / gate) the gate is ~1 and the net learns as a plain residual net
            # (a gate linear in m would shrink its effective learning rate by m ~ 0.01-0.05).
            r = r * torch.tanh(m.float() * (ms * self.residual_gate))
        if strength < 1:
            r = r * strength  # the blend y + s (D(y) - y)
        out = (xp + r)[..., :h, :w]
        return (out, est[..., :h, :w]) if return_map else out


def _estimate_sigma(x: torch.Tensor) -> torch.Tensor:
    """Per-image noise std from the median absolute Laplacian-like high-pass (Donoho MAD)."""
    d = (x[..., 1:, 1:] - x[..., :-1, 1:] - x[..., 1:, :-1] + x[..., :-1, :-1]) / 2.0
    return d.abs().flatten(1).median(dim=1).values / 0.6745


# config keys that own no weights: nets that differ only in these share one weight layout (an init,
# a soup); the command line or the first checkpoint decides their values
WEIGHTLESS_KEYS = ("residual_gate", "impulse_filter", "map_fit", "map_gain")


def weight_config(config: dict) -> dict:
    """``config`` without the settings that own no weights (:data:`WEIGHTLESS_KEYS`)."""
    return {k: v for k, v in config.items() if k not in WEIGHTLESS_KEYS}


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
        if arch == "resunet":
            return ResUNet(**cfg)
    except TypeError as err:
        raise CheckpointError(f"model config does not match architecture {arch!r}: {err}") from err
    raise CheckpointError(f"unknown architecture {arch!r} (known: unet, drunet, resunet)")


def attention_prefixes(net: nn.Module) -> tuple[str, ...]:
    """Name prefixes (``"body.2."``) of the :class:`WindowAttention` layers in ``net``."""
    return tuple(f"{name}." for name, m in net.named_modules() if isinstance(m, WindowAttention))


def grow_attention(src: ResUNet, levels: tuple[int, ...] | list[int], *, like: ResUNet | None = None) -> ResUNet:
    """``src`` with :class:`WindowAttention` layers added at ``levels``: the same function (their output
    projections are zero). Layers ``src`` has already keep their weights. With ``like`` (a net with the
    new layers), the new layers' norm, q, k and v are ``like``'s, which any value of them allows: a
    weight average of the two then keeps them instead of mixing in a fresh random init.

    >>> small = ResUNet(channels=(24, 48), blocks=1)
    >>> x = torch.rand(1, 1, 32, 32)
    >>> bool(torch.equal(small(x), grow_attention(small, [1])(x)))
    True
    >>> grow_attention(grow_attention(small, [1]), [0]).config["attention"]
    [0, 1]
    """
    have = {int(a) for a in src.config.get("attention", ())}
    want = have | {int(a) for a in levels}
    if want == have:
        raise ValueError(f"grow_attention: the net has attention at {sorted(have)} already, nothing to add")
    old = {name for name, m in src.named_modules() if isinstance(m, WindowAttention)}
    dst = build_model({**src.config, "attention": sorted(want)})
    dst.load_state_dict(src.state_dict(), strict=False)  # the new attention layers are all it lacks
    if like is not None:
        donors = dict(like.named_modules())
        for name, m in dst.named_modules():
            if isinstance(m, WindowAttention) and name not in old:
                m.norm.load_state_dict(donors[name].norm.state_dict())
                m.qkv.load_state_dict(donors[name].qkv.state_dict())
    return dst.to(next(src.parameters()).device)


def widen_resunet(src: ResUNet, channels: tuple[int, ...] | list[int], *, seed: int = 0) -> ResUNet:
    """A wider copy of ``src`` that computes the same function (Net2Net-style growth).

    Every old weight is copied; the new channels get a fresh random init on their inputs and zero
    weights on every edge that feeds an old channel (and the output), so the output is unchanged
    while the zero edges still receive gradients. Fine-tuning then starts from the trained net's
    quality and grows into the extra capacity, instead of re-learning from scratch (which takes
    far longer than a CPU session).

    Attention layers (``src.config["attention"]``) keep their heads: old head j stays head j, new heads
    read every channel and feed only the new ones. Their norm's statistics run over all channels, new
    ones included, so such a net's output is close, not equal: the shipped default grown from base 24
    to 30 moves a noisy real CT slice by at most 5e-4 (normalised units; RMS 5e-5), a start that
    training absorbs. A level whose head size would change (128 channels split 4 x 32 where the old 96
    were 4 x 24) is refused.

    >>> small = ResUNet(channels=(4, 8), blocks=1)
    >>> big = widen_resunet(small, (6, 12))
    >>> x = torch.rand(1, 1, 16, 16)
    >>> bool(torch.allclose(small(x), big(x), atol=1e-6))
    True
    """
    channels = [int(c) for c in channels]
    old = src.config["channels"]
    if len(channels) != len(old) or any(c < o for c, o in zip(channels, old)):  # noqa: B905
        raise ValueError(f"widen_resunet: {channels} must have {len(old)} levels, each >= {old}")
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        dst = ResUNet(**{**{k: v for k, v in src.config.items() if k != "arch"}, "channels": channels})
    src_mods = dict(src.named_modules())
    attn = [name for name, m in dst.named_modules() if isinstance(m, WindowAttention)]  # in order: one message
    for name in attn:
        a, b = src_mods[name], dict(dst.named_modules())[name]
        da, db = a.qkv.in_channels // a.heads, b.qkv.in_channels // b.heads
        if da != db:
            raise ValueError(f"widen_resunet: attention {name} has heads of {da} channels; {b.qkv.in_channels} "
                             f"channels would split into {b.heads} of {db} (choose widths whose attention levels "
                             f"are multiples of {da})")
    with torch.no_grad():
        for name, mod in dst.named_modules():
            if isinstance(mod, nn.GroupNorm):  # an attention layer's norm: old channels keep their affine
                c_old = src_mods[name].num_channels
                mod.weight[:c_old], mod.bias[:c_old] = src_mods[name].weight, src_mods[name].bias
                continue
            if not isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
                continue
            if name.endswith(".qkv") and name[: -len(".qkv")] in attn:
                _widen_qkv(src_mods[name], mod)
                continue
            w_old = src_mods[name].weight
            w = mod.weight
            # ConvTranspose2d stores (in, out, k, k); Conv2d (out, in, k, k)
            o_ax, i_ax = (1, 0) if isinstance(mod, nn.ConvTranspose2d) else (0, 1)
            o_old, i_old = w_old.shape[o_ax], w_old.shape[i_ax]
            idx = [slice(None)] * w.dim()
            idx[o_ax], idx[i_ax] = slice(0, o_old), slice(0, i_old)
            w[tuple(idx)] = w_old
            idx[i_ax] = slice(i_old, None)
            w[tuple(idx)] = 0.0  # new channels never feed old ones (nor the output: tail's outputs are all old)
            if mod.bias is not None:
                mod.bias[:o_old] = src_mods[name].bias
    return dst.to(next(src.parameters()).device)


def _widen_qkv(src: nn.Conv2d, dst: nn.Conv2d) -> None:
    """Copy an attention layer's q, k, v conv into a wider one: each of the three blocks at its new offset,
    reading the old channels only (new input columns zero); the new heads' rows keep their random init."""
    c, c2 = src.in_channels, dst.in_channels
    for k in range(3):
        dst.weight[k * c2 : k * c2 + c] = 0.0
        dst.weight[k * c2 : k * c2 + c, :c] = src.weight[k * c : (k + 1) * c]
        dst.bias[k * c2 : k * c2 + c] = src.bias[k * c : (k + 1) * c]
