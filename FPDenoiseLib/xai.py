"""Guided Backpropagation (Springenberg et al. 2015) of the restoration net ``f``.

``GB_f(y) = d R(f(y)) / dy`` where every ReLU's backward passes gradient only where its forward
input was > 0 AND the incoming gradient is > 0.

Readout choice (why not ``f(y).sum()``)
---------------------------------------
For a ReLU network ``f`` is piecewise *linear* in ``y``. With a linear readout ``R = sum f(y)``
the gradient ``dR/dy`` is the product of constant weight matrices and 0/1 masks: piecewise
*constant* in ``y``. The FP loss ``||GB(D(x~)) - GB(x)||^2`` then has an exactly zero derivative
w.r.t. ``D(x~)`` and hence w.r.t. the denoiser's weights (we measured exactly 0.0). We therefore
explain the energy readout ``R = 0.5 * ||f(y)||^2``: ``dR/dy = J_f(y)^T f(y)``. The seed ``f(y)``
varies continuously with ``y``, so ``d GB / dy`` is non-zero and the FP loss trains the denoiser.
For a restoration net ``f(y) ~ y`` the map reads as "how much each pixel contributes to the
reconstructed intensity, routed through the features the network uses" — an edge- and
structure-weighted image, which is what the saliency overlays show.

Two modes: ``create_graph=False`` (display: no graph kept, cheap) and ``create_graph=True``
(the map is differentiable, for the FP loss).

Example:
    >>> from FPDenoiseLib.models import UNet
    >>> f = UNet(base_channels=4, residual=False)
    >>> guided_backprop(f, torch.rand(2, 1, 32, 32)).shape
    torch.Size([2, 1, 32, 32])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models import GuidedReLU


@contextmanager
def guided_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every :class:`GuidedReLU` of ``model`` to the GB backward rule for the block."""
    relus = [m for m in model.modules() if isinstance(m, GuidedReLU)]
    if not relus:
        raise TypeError("guided_mode needs a model built from FPDenoiseLib.models (GuidedReLU activations)")
    previous = [m.guided for m in relus]
    for m in relus:
        m.guided = True
    try:
        yield model
    finally:
        for m, p in zip(relus, previous, strict=True):
            m.guided = p


def guided_backprop(model: nn.Module, x: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    """Guided-Backprop map of ``R = 0.5 * ||model(x)||^2`` w.r.t. ``x``, per sample.

    Args:
        model: a network from :mod:`FPDenoiseLib.models` (its parameters are not updated here).
        x: ``(N, 1, H, W)`` float tensor in the normalised range.
        create_graph: keep the graph so the returned map can be differentiated (FP loss). When
            False the result is detached and no graph survives the call.

    Returns:
        Tensor of ``x``'s shape. Samples are independent (the readout is a sum over samples).
    """
    with guided_mode(model), torch.enable_grad():
        xi = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        out = model(xi)
        readout = 0.5 * out.pow(2).sum()
        (grad,) = torch.autograd.grad(readout, xi, create_graph=create_graph)
    return grad if create_graph else grad.detach()


def saliency_for_display(gb: torch.Tensor) -> torch.Tensor:
    """Magnitude of a GB map, the quantity shown as a heat overlay (sign carries no meaning to a
    reader; the loss and the feature-preservation score use the signed map)."""
    return gb.abs()
