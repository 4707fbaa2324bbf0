"""How saliency and feature-change maps are shown: one rule for Slicer, the browser, PNG panels.

Pure numpy (matplotlib only to read its Inferno table once); no Qt, no Slicer. The Slicer Logic turns
:class:`DisplayWindow` into a display node's window + lower threshold + colour table, the browser
viewer uses the same Logic, and :mod:`FPDenoiseLib.figures` / the benchmark figures call
:func:`render_rgba` and :func:`colorbar_rgba`.

The rule (measured on the real chest CT slice ``Resources/TestData/real_ct_lung1_slice.nrrd`` with
the ``gradient_energy`` readout of the shipped model):

* |GB| is heavy-tailed: its 50th percentile is < 1 % of its 99.5th on a clean slice, because flat
  tissue and air carry almost no saliency while edges, vessels and bone borders carry a lot.
* **Threshold** (``lo``) = the :data:`BACKGROUND_PERCENTILE` (60th) percentile of the map; voxels at
  or below it are transparent. On the real slice this hides 96 % of the air outside the body and
  keeps 58 % of the body's pixels visible (clean), 97 % / 60 % with Gaussian noise at level 0.5:
  the flat interior of soft tissue goes, vessels, bone and organ borders stay. The percentile adapts to
  the map's units (any checkpoint, any readout); a fixed fraction of the maximum does not (2 % of
  the robust max keeps 48 % of the body on the clean slice but 93 % on the noisy one, with a third of
  the air shown).
* **Top** (``hi``) = the :data:`UPPER_PERCENTILE` (99.5th) percentile, robust to a few hot voxels.
* **Gamma** :data:`DISPLAY_GAMMA` = 0.5 between the two: with a linear ramp the median visible voxel
  sits at 3 % of the colour range (almost black) and the overlay reads as a few bright rims; the
  square root spreads the vessels over the middle of the Inferno ramp. The gamma is baked into the
  colour table (:func:`colour_table`), so Slicer's linear window/level still applies.

Example:
    >>> import numpy as np
    >>> m = np.linspace(0.0, 1.0, 1001)
    >>> w = saliency_window(m)
    >>> round(w.lo, 2), round(w.hi, 3), w.gamma
    (0.6, 0.995, 0.5)
    >>> render_rgba(m.reshape(7, 143), w).shape
    (7, 143, 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Percentile of the map below which voxels are background (transparent). See the module docstring.
BACKGROUND_PERCENTILE = 60.0
#: Percentile of the map shown at the top of the colour ramp.
UPPER_PERCENTILE = 99.5
#: Exponent applied to the normalised value before the colour look-up (0.5 = square root).
DISPLAY_GAMMA = 0.5
#: Percentiles are estimated on at most this many values (a strided subsample of large volumes).
_MAX_SAMPLES = 2_000_000
#: Percentiles of a grey image shown black and white in PNG panels (a few outliers do not set the range).
GRAY_PERCENTILES = (0.5, 99.5)
#: One-line meaning of the feature score shown next to it (Slicer panel, browser, PNG panel).
FEATURE_SCORE_MEANING = "1.0 = every feature kept"


@dataclass(frozen=True)
class DisplayWindow:
    """``lo``: threshold and bottom of the colour ramp; ``hi``: top of the ramp; ``gamma``: ramp shape."""

    lo: float
    hi: float
    gamma: float = DISPLAY_GAMMA

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """``values`` mapped to 0..1 on the ramp (gamma applied), float32."""
        v = (np.asarray(values, dtype=np.float32) - self.lo) / np.float32(self.hi - self.lo)
        return np.clip(v, 0.0, 1.0) ** np.float32(self.gamma)


def gray_range(image: np.ndarray) -> tuple[float, float]:
    """``(black, white)`` levels of a grey image in PNG panels: its :data:`GRAY_PERCENTILES`."""
    a = np.asarray(image)
    return float(np.percentile(a, GRAY_PERCENTILES[0])), float(np.percentile(a, GRAY_PERCENTILES[1]))


def _sample(maps: tuple[np.ndarray, ...]) -> np.ndarray:
    flat = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    flat = flat[np.isfinite(flat)]
    if flat.size > _MAX_SAMPLES:
        flat = flat[:: flat.size // _MAX_SAMPLES]
    return flat


def saliency_window(
    *maps: np.ndarray,
    background_percentile: float = BACKGROUND_PERCENTILE,
    upper_percentile: float = UPPER_PERCENTILE,
    gamma: float = DISPLAY_GAMMA,
) -> DisplayWindow:
    """Display window of one or more maps (2D or 3D) shown on one scale.

    Pass the input's and the output's saliency together so that equal colour means equal saliency
    on both sides. ``lo < hi`` always holds (an all-zero map gets ``(0, 1)``).
    """
    if not maps:
        raise ValueError("saliency_window: give at least one map")
    if not 0.0 <= background_percentile < upper_percentile <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= background < upper <= 100, got {background_percentile}, {upper_percentile}")
    flat = _sample(maps)
    if flat.size == 0:
        return DisplayWindow(0.0, 1.0, gamma)
    lo, hi = (float(v) for v in np.percentile(flat, [background_percentile, upper_percentile]))
    if not hi > lo:
        # Few distinct values (e.g. mostly zeros): fall back to the maximum so something is graded.
        hi = float(flat.max())
        if not hi > lo:
            hi = lo + 1.0
    return DisplayWindow(lo, hi, gamma)


@lru_cache(maxsize=1)
def _inferno() -> np.ndarray:
    # matplotlib's Inferno (van der Walt & Smith, CC0), the same values as Slicer's ColorFiles/Inferno.txt.
    from matplotlib import colormaps

    table = colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3]
    table = np.rint(table * 255.0).astype(np.uint8)
    table.setflags(write=False)
    return table


def inferno_lut() -> np.ndarray:
    """The 256-entry Inferno colour table, ``(256, 3)`` uint8 RGB, black -> purple -> orange -> pale yellow."""
    return _inferno().copy()


def colour_table(gamma: float = DISPLAY_GAMMA) -> np.ndarray:
    """``(256, 3)`` float RGB in 0..1: entry ``i`` is Inferno at ``(i/255) ** gamma``.

    This is the table a linear window/level display (Slicer's) needs to show ``DisplayWindow``'s
    gamma; ``gamma=1`` is Inferno itself.
    """
    idx = np.rint((np.arange(256) / 255.0) ** gamma * 255.0).astype(int)
    return _inferno()[idx].astype(np.float64) / 255.0


def render_rgba(values: np.ndarray, window: DisplayWindow, *, opacity: float = 1.0) -> np.ndarray:
    """RGBA uint8 image of a 2D map: Inferno colours, alpha 0 at or below ``window.lo`` (background)."""
    v = np.asarray(values, dtype=np.float32)
    idx = np.rint(window.normalise(v) * 255.0).astype(np.intp)
    rgba = np.empty(v.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = _inferno()[idx]
    rgba[..., 3] = np.where(v > window.lo, np.uint8(round(255 * float(np.clip(opacity, 0.0, 1.0)))), np.uint8(0))
    return rgba


def colorbar_rgba(length: int = 256, thickness: int = 16, *, gamma: float = DISPLAY_GAMMA, vertical: bool = True) -> np.ndarray:
    """A colour bar, ``(length, thickness, 4)`` uint8 (high values at the top) or ``(thickness, length, 4)``.

    Ticks follow the window: the bottom is ``lo`` (threshold), the top ``hi``; the value at a
    fraction ``t`` of the bar is ``lo + t ** (1/gamma) * (hi - lo)`` (see :func:`colorbar_ticks`).
    """
    t = np.linspace(0.0, 1.0, length)
    rgb = np.rint(colour_table(gamma) * 255.0).astype(np.uint8)[np.rint(t * 255).astype(int)]
    bar = np.concatenate([rgb, np.full((length, 1), 255, np.uint8)], axis=1)
    out = np.repeat(bar[:, None, :], thickness, axis=1)
    return out[::-1] if vertical else out.transpose(1, 0, 2)


def colorbar_ticks(window: DisplayWindow, n: int = 3) -> list[tuple[float, float]]:
    """``(position 0..1 along the bar, value)`` for ``n`` ticks evenly spaced along the bar."""
    pos = np.linspace(0.0, 1.0, max(2, n))
    return [(float(p), float(window.lo + p ** (1.0 / window.gamma) * (window.hi - window.lo))) for p in pos]


def feature_change(gb_output: np.ndarray, gb_reference: np.ndarray) -> np.ndarray:
    """``|GB(output) - GB(reference)|`` of two *signed* GB maps, float32: where structure changed."""
    return np.abs(np.asarray(gb_output, dtype=np.float32) - np.asarray(gb_reference, dtype=np.float32))


def feature_score_text(score: float | None) -> str:
    """``"feature score 0.931 (1.0 = every feature kept)"``; ``"feature score -"`` without a score."""
    if score is None or not np.isfinite(score):
        return "feature score -"
    return f"feature score {float(score):.3f} ({FEATURE_SCORE_MEANING})"
