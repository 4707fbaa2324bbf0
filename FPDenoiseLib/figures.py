"""PNG figures (matplotlib, Agg backend): image panels like the paper's Fig. 3-5.

Example:
    >>> save_panel([("clean", img), ("GB", sal, "inferno")], "panel.png")   # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io import atomic_path


def _display_range(a: np.ndarray, cmap: str) -> tuple[float, float]:
    if cmap == "gray":
        return float(np.percentile(a, 0.5)), float(np.percentile(a, 99.5))
    return 0.0, float(np.percentile(a, 99.5)) or 1.0


def save_panel(
    panels: Sequence[tuple],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    shared_range: tuple[float, float] | None = None,
) -> Path:
    """Write a one-row panel of 2D images to ``path`` (PNG, atomic).

    Args:
        panels: ``(title, array2d)`` or ``(title, array2d, cmap)``; gray images share
            ``shared_range`` (e.g. the clean image's display window) when given, so that noise and
            denoising are compared on one scale; saliency maps use their own 0..p99.5 range.
        path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    for ax, item in zip(axes[0], panels, strict=True):
        name, arr = item[0], np.asarray(item[1], dtype=np.float32)
        cmap = item[2] if len(item) > 2 else "gray"
        vmin, vmax = shared_range if (shared_range and cmap == "gray") else _display_range(arr, cmap)
        ax.imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
