"""Training losses: residual loss + lambda * feature-preserving (FP) loss.

``L = mean((D(x~) - x~ + n)^2) + lambda * mean((GB_f(D(x~)) - GB_f(x))^2) / s`` with
``n = x~ - x`` and ``s = mean(GB_f(x)^2)`` over the clean training bank (``gb_scale``).
The residual term equals ``mean((D(x~) - x)^2)``; it is written in the paper's residual form.

Why ``s``: GB maps have no fixed unit (their size depends on f's weights and the readout), so
the raw FP term can be 1e-11 or 1e+3 depending on the restoration net and lambda would have to
be re-tuned for every f. Dividing by the clean maps' mean energy makes the FP term a relative
feature error (0 = identical features, 1 = as large as the features themselves), so one lambda
transfers between restoration nets, patch sizes and datasets. ``gb_scale=1`` gives the paper's
un-normalised form.
``mode="mse"`` drops the FP term and keeps everything else identical (the ablation twin).

``residual_norm="log"`` replaces the batch mean of the residual term by the batch mean of
``log(eps + mean_pixels(residual^2))`` per sample, i.e. the training objective becomes the mean
per-image PSNR (up to sign and a factor), the figure the benchmarks report. Why: in a batch that
mixes severities from 0 to 0.85, the plain mean is dominated by the heaviest samples (a level-0.85
sample's squared error is ~40x a level-0.1 one's), so mild noise, the clinically common case, gets
almost no gradient. ``eps`` (1e-6, i.e. 60 dB for a unit range) stops clean samples whose error is
already negligible from dominating in turn. The residual term is then in log units, so lambda must be
chosen afresh for this mode.

Means (not sums) keep ``lambda`` independent of patch and batch size.

Example:
    >>> from FPDenoiseLib.models import UNet
    >>> f = UNet(base_channels=4, residual=False).eval()
    >>> loss = FPLoss(f, lam=1.0)
    >>> clean = torch.rand(2, 1, 16, 16); noisy = clean + 0.1 * torch.randn_like(clean)
    >>> total, parts = loss(noisy.clone(), noisy, clean)
    >>> sorted(parts)
    ['fp', 'residual', 'total']
"""

from __future__ import annotations

import torch
from torch import nn

from .xai import DEFAULT_READOUT, Readout, get_readout, guided_backprop

RESIDUAL_NORMS = ("mean", "log")
LOG_EPS = 1e-6  # per-sample MSE floor of residual_norm="log": 60 dB for a unit intensity range
MAP_LOSSES = ("l1", "log")
MAP_LOG_EPS = 1e-3  # normalised units (~4 HU on CT): below it the relative map error stops mattering


def map_error(est: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Loss of a noise-level map ``est`` against the true local noise std ``target`` (same units).

    "l1" is the mean absolute error. "log" weighs errors relative to the true level, so a map that
    reads half the true noise at a mild level costs as much as at a severe one (L1 barely notices it);
    measured on the shipped models it also under-weighs severe levels (``Resources/Models/README.md``).

    >>> float(map_error(torch.full((1, 1, 2, 2), 0.5), torch.ones(1, 1, 2, 2)))
    0.5
    """
    if kind == "log":
        return (torch.log(MAP_LOG_EPS + est.clamp_min(0)) - torch.log(MAP_LOG_EPS + target)).abs().mean()
    if kind != "l1":
        raise ValueError(f"map loss must be one of {MAP_LOSSES}, got {kind!r}")
    return (est - target).abs().mean()


class FPLoss(nn.Module):
    """Residual + lambda * FP loss with a frozen restoration net.

    Args:
        restoration: the frozen restoration net ``f`` (its parameters are set to
            ``requires_grad=False`` here; gradients flow through it to the denoiser output only).
        lam: weight of the FP term.
        gb_scale: mean squared GB of clean training images (normalises the FP term; see above).
        mode: "fp" (paper) or "mse" (ablation: residual loss only).
        readout: GB readout of ``f`` (a name in :data:`FPDenoiseLib.xai.READOUTS` or a callable);
            the clean maps and ``gb_scale`` must have been computed with the same readout.
        residual_norm: "mean" (the paper's squared error averaged over the batch) or "log" (the
            mean over samples of ``log(eps + per-sample MSE)``; see the module docstring).
    """

    def __init__(
        self,
        restoration: nn.Module | None,
        *,
        lam: float = 1.0,
        mode: str = "fp",
        gb_scale: float = 1.0,
        readout: str | Readout = DEFAULT_READOUT,
        residual_norm: str = "mean",
    ) -> None:
        super().__init__()
        if mode not in ("fp", "mse"):
            raise ValueError(f"loss mode must be 'fp' or 'mse', got {mode!r}")
        if residual_norm not in RESIDUAL_NORMS:
            raise ValueError(f"residual_norm must be one of {RESIDUAL_NORMS}, got {residual_norm!r}")
        self.residual_norm = residual_norm
        if mode == "fp" and restoration is None:
            raise ValueError("the FP loss needs a restoration network")
        self.mode = mode
        self.lam = float(lam)
        if not gb_scale > 0:
            raise ValueError(f"gb_scale must be positive, got {gb_scale}")
        self.gb_scale = float(gb_scale)
        get_readout(readout)  # fail early on an unknown name
        self.readout = readout
        self.restoration = restoration
        if restoration is not None:
            restoration.eval()
            for p in restoration.parameters():
                p.requires_grad_(False)

    def gb_clean(self, clean: torch.Tensor) -> torch.Tensor:
        """GB of clean images (no graph): compute once per sample and pass it to ``forward``."""
        assert self.restoration is not None
        return guided_backprop(self.restoration, clean, create_graph=False, readout=self.readout)

    def forward(
        self,
        denoised: torch.Tensor,
        noisy: torch.Tensor,
        clean: torch.Tensor,
        gb_clean: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Return ``(total_loss, {"residual", "fp", "total"})``; ``gb_clean`` is the cached GB(x)."""
        noise = noisy - clean
        sq = ((denoised - noisy) + noise).pow(2)
        if self.residual_norm == "log":
            residual = torch.log(LOG_EPS + sq.flatten(1).mean(1)).mean()
        else:
            residual = sq.mean()
        if self.mode == "mse":
            r = float(residual.detach())
            return residual, {"residual": r, "fp": 0.0, "total": r}
        if gb_clean is None:
            gb_clean = self.gb_clean(clean)
        gb_den = guided_backprop(self.restoration, denoised, create_graph=True, readout=self.readout)
        fp = (gb_den - gb_clean).pow(2).mean() / self.gb_scale
        total = residual + self.lam * fp
        return total, {
            "residual": float(residual.detach()),
            "fp": float(fp.detach()),
            "total": float(total.detach()),
        }
