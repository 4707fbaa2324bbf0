"""PNG figures (matplotlib, Agg backend): image panels like the paper's Fig. 3-5.

Saliency and feature-change panels use the one display rule of :mod:`FPDenoiseLib.display` (the
Slicer module's and the browser's): background percentile hidden, Inferno with the display gamma,
and a colour bar.

Example:
    >>> save_panel([("clean", img), ("GB", sal, "inferno")], "panel.png")   # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .display import DisplayWindow, colour_table, gray_range, render_rgba, saliency_window
from .io import atomic_path


def draw_map(ax: Any, values: np.ndarray, window: DisplayWindow | None = None, *, background: np.ndarray | None = None) -> Any:
    """Draw a saliency / feature-change map on ``ax`` with the display rule; returns a ScalarMappable
    for ``fig.colorbar`` (its colours and ticks match the pixels: the gamma is in the colour table).

    Background pixels (at or below ``window.lo``) show ``background`` in grey when given, else black.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    v = np.asarray(values, dtype=np.float32)
    window = window or saliency_window(v)
    if background is not None:
        b = np.asarray(background, dtype=np.float32)
        lo, hi = gray_range(b)
        ax.imshow(b, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    else:
        ax.set_facecolor("black")
        ax.imshow(np.zeros(v.shape), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.imshow(render_rgba(v, window), interpolation="nearest")
    return ScalarMappable(norm=Normalize(window.lo, window.hi), cmap=ListedColormap(colour_table(window.gamma)))


def save_panel(
    panels: Sequence[tuple],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    shared_range: tuple[float, float] | None = None,
    footer: str | None = None,
) -> Path:
    """Write a one-row panel of 2D images to ``path`` (PNG, atomic).

    Args:
        panels: ``(title, array2d)``, ``(title, array2d, cmap)`` or ``(title, array2d, "inferno",
            window)``; gray images share ``shared_range`` (e.g. the clean image's display window)
            when given, so that noise and denoising are compared on one scale. Any other cmap marks a
            saliency / feature-change map, drawn with :func:`draw_map` (``window``: a
            :class:`~FPDenoiseLib.display.DisplayWindow` shared with other panels, default its own)
            and a colour bar under it.
        footer: a line under the panels (e.g. the feature score and its meaning).
        path: output PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.4 if footer else 3.2), squeeze=False)
    for ax, item in zip(axes[0], panels):
        name, arr = item[0], np.asarray(item[1], dtype=np.float32)
        cmap = item[2] if len(item) > 2 else "gray"
        if cmap == "gray":
            vmin, vmax = shared_range or gray_range(arr)
            ax.imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        else:
            mappable = draw_map(ax, arr, item[3] if len(item) > 3 else None)
            bar = fig.colorbar(mappable, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
            bar.ax.tick_params(labelsize=6)
            bar.locator = MaxNLocator(3)
            bar.update_ticks()
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    if footer:
        fig.text(0.5, 0.01, footer, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if footer else 0, 1, 1))
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path
