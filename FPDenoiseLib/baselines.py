"""Classical denoising baselines of the paper's comparison, behind one signature.

Every method is ``fn(image, *, sigma=None) -> np.ndarray``:

- ``image``: a 2D ``(y, x)`` float image in the library's normalised range (~[0, 1], see
  :mod:`FPDenoiseLib.intensity`); it is never modified. Use :func:`apply_slicewise` (or
  :func:`denoise`) for ``(z, y, x)`` volumes.
- ``sigma``: standard deviation of the noise in the same normalised units. ``None`` estimates it per
  image with :func:`skimage.restoration.estimate_sigma` (wavelet median-absolute-deviation, robust
  for Gaussian-like noise). Only the noise-adaptive methods (bm3d, nlmeans, bilateral, wavelet,
  wiener) use it; the fixed-kernel filters (gaussian, mean, median, filter_combination) ignore it,
  as in the paper, and do not pay for the estimate.
- returns a new float32 array of the same shape.

All methods call scikit-image / SciPy / the ``bm3d`` package; nothing is re-implemented here. The
exact parameter choices are in :data:`BASELINE_PARAMS` (the benchmark prints them). They follow the
libraries' documented defaults or examples, set once for all noise types; none is tuned on the
benchmark data.

Example
-------
>>> import numpy as np
>>> from FPDenoiseLib.baselines import BASELINES
>>> noisy = np.random.default_rng(0).normal(0.5, 0.1, (64, 64)).astype(np.float32)
>>> out = BASELINES["median"](noisy)
>>> out.shape, out.dtype
((64, 64), dtype('float32'))
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage, signal
from skimage.restoration import denoise_bilateral, denoise_nl_means, denoise_wavelet, estimate_sigma

from FPDenoiseLib.errors import InputError

__all__ = [
    "BASELINES",
    "BASELINE_PARAMS",
    "BASELINE_COMMON_PARAMS",
    "SIGMA_FLOOR",
    "apply_slicewise",
    "denoise",
    "estimate_noise_sigma",
    "time_method",
    "bm3d_denoise",
    "nlmeans",
    "bilateral",
    "wavelet",
    "gaussian",
    "mean",
    "median",
    "wiener",
    "filter_combination",
]

BaselineFn = Callable[..., np.ndarray]

#: Smallest noise sigma used (normalised units). A (nearly) clean image gives sigma ~ 0, which makes
#: NL-means' h = 0 and BM3D's thresholds degenerate; 1e-3 = 0.1% of the range is "no visible noise".
SIGMA_FLOOR = 1e-3

# Fixed kernels shared by the single filters and filter_combination.
_MEAN_SIZE = 3
_MEDIAN_SIZE = 3
_GAUSS_SIGMA = 1.0
_NLM_PATCH, _NLM_DIST, _NLM_H = 5, 6, 0.8
_BIL_SIGMA_COLOR, _BIL_SIGMA_SPATIAL = 2.0, 1.5
_WIENER_SIZE = 5

BASELINE_PARAMS: dict[str, str] = {
    "bm3d": "bm3d.bm3d(image, sigma_psd=sigma, profile='np', all stages); sigma = noise std "
    "(estimate_sigma if not given)",
    "nlmeans": f"skimage.restoration.denoise_nl_means(patch_size={_NLM_PATCH}, patch_distance={_NLM_DIST}, "
    f"h={_NLM_H}*sigma, sigma=sigma, fast_mode=True) (scikit-image's documented recipe)",
    "bilateral": f"skimage.restoration.denoise_bilateral(sigma_color={_BIL_SIGMA_COLOR}*sigma, "
    f"sigma_spatial={_BIL_SIGMA_SPATIAL} px, win_size=default 11 px, bins=10000): range kernel wide "
    "enough to average noise, narrow enough to keep edges of contrast >> 2*sigma",
    "wavelet": "skimage.restoration.denoise_wavelet(sigma=sigma, wavelet='db1', mode='soft', "
    "method='BayesShrink', wavelet_levels=default (dwt_max_level - 3), rescale_sigma=True)",
    "gaussian": f"scipy.ndimage.gaussian_filter(sigma={_GAUSS_SIGMA} px, truncate=4, mode='reflect'); "
    "noise sigma unused",
    "mean": f"scipy.ndimage.uniform_filter(size={_MEAN_SIZE}x{_MEAN_SIZE} px, mode='reflect'); noise sigma unused",
    "median": f"scipy.ndimage.median_filter(size={_MEDIAN_SIZE}x{_MEDIAN_SIZE} px, mode='reflect'); noise sigma unused",
    "wiener": f"scipy.signal.wiener(mysize={_WIENER_SIZE}x{_WIENER_SIZE} px, noise=sigma**2) "
    "(local-statistics adaptive Wiener filter)",
    "filter_combination": f"sequential chain in the paper's order: mean {_MEAN_SIZE}x{_MEAN_SIZE} -> "
    f"median {_MEDIAN_SIZE}x{_MEDIAN_SIZE} -> Gaussian sigma={_GAUSS_SIGMA} px (same kernels as the "
    "single filters); noise sigma unused",
}
#: Applies to every method (printed with BASELINE_PARAMS by the benchmark).
BASELINE_COMMON_PARAMS = (
    "input: 2D float image in the normalised range (~[0, 1]); volumes slice by slice; "
    f"sigma = skimage.restoration.estimate_sigma(slice) when not given, floored at {SIGMA_FLOOR}"
)


# ---------------------------------------------------------------- helpers


def _check_image(image: Any, *, name: str = "image") -> np.ndarray:
    """Float64 copy of a finite 2D image (InputError otherwise); the caller's array is never touched."""
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch.Tensor without importing torch
        image = image.detach().cpu().numpy()
    try:
        arr = np.array(image, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"{name}: not a numeric array ({err})") from None
    if arr.ndim != 2:
        raise InputError(f"{name}: expected a 2D (y, x) image, got shape {arr.shape}; use apply_slicewise for volumes")
    if min(arr.shape) < 2:
        raise InputError(f"{name}: image too small, shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or inf")
    return arr


def _check_sigma(sigma: Any) -> float | None:
    if sigma is None:
        return None
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"sigma: must be a non-negative number or None, got {sigma!r}") from None
    if not math.isfinite(s) or s < 0:
        raise InputError(f"sigma: must be a non-negative finite number or None, got {sigma!r}")
    return s


def estimate_noise_sigma(image: Any) -> float:
    """Noise standard deviation of a 2D image, in the image's units (normalised units here).

    :func:`skimage.restoration.estimate_sigma` (median absolute deviation of the finest diagonal
    wavelet sub-band / 0.6745), floored at :data:`SIGMA_FLOOR`.

    Example
    -------
    >>> import numpy as np
    >>> noisy = 0.5 + np.random.default_rng(0).normal(0, 0.1, (128, 128))
    >>> round(estimate_noise_sigma(noisy), 1)
    0.1
    """
    arr = _check_image(image)
    return _sigma_of(arr, None)


def _sigma_of(arr: np.ndarray, sigma: Any) -> float:
    s = _check_sigma(sigma)
    if s is None:
        s = float(estimate_sigma(arr, channel_axis=None))
    return max(s, SIGMA_FLOOR)


def _out(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# ---------------------------------------------------------------- methods


def bm3d_denoise(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """BM3D (block matching and 3D collaborative filtering) via the ``bm3d`` package.

    Parameters: see ``BASELINE_PARAMS["bm3d"]``. ``sigma``: noise std in normalised units.

    Example
    -------
    >>> import numpy as np
    >>> bm3d_denoise(np.full((32, 32), 0.5, np.float32), sigma=0.05).shape
    (32, 32)
    """
    import bm3d  # optional heavy dependency (test extra): import only when used

    arr = _check_image(image)
    s = _sigma_of(arr, sigma)
    return _out(bm3d.bm3d(arr, sigma_psd=s, profile="np"))


def nlmeans(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """Non-local means (scikit-image), h = 0.8 * sigma, 5x5 patches, 13x13 search window.

    Example
    -------
    >>> import numpy as np
    >>> nlmeans(np.zeros((32, 32)), sigma=0.1).dtype
    dtype('float32')
    """
    arr = _check_image(image)
    s = _sigma_of(arr, sigma)
    return _out(
        denoise_nl_means(
            arr, patch_size=_NLM_PATCH, patch_distance=_NLM_DIST, h=_NLM_H * s, sigma=s, fast_mode=True,
            preserve_range=True, channel_axis=None,
        )
    )


def bilateral(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """Bilateral filter (scikit-image), range sigma = 2 * noise sigma, spatial sigma = 1.5 px.

    Example
    -------
    >>> import numpy as np
    >>> bilateral(np.zeros((32, 32)), sigma=0.1).shape
    (32, 32)
    """
    arr = _check_image(image)
    s = _sigma_of(arr, sigma)
    return _out(
        denoise_bilateral(
            arr, sigma_color=_BIL_SIGMA_COLOR * s, sigma_spatial=_BIL_SIGMA_SPATIAL, channel_axis=None
        )
    )


def wavelet(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """Wavelet shrinkage (scikit-image): BayesShrink soft thresholds, Haar (db1) wavelet.

    Example
    -------
    >>> import numpy as np
    >>> wavelet(np.zeros((32, 32)), sigma=0.1).shape
    (32, 32)
    """
    arr = _check_image(image)
    s = _sigma_of(arr, sigma)
    return _out(
        denoise_wavelet(
            arr, sigma=s, wavelet="db1", mode="soft", method="BayesShrink", rescale_sigma=True, channel_axis=None
        )
    )


def gaussian(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """Gaussian low-pass filter (SciPy), kernel sigma = 1 px. ``sigma`` (noise) is ignored.

    Example
    -------
    >>> import numpy as np
    >>> float(gaussian(np.ones((16, 16)))[0, 0])
    1.0
    """
    arr = _check_image(image)
    _check_sigma(sigma)
    return _out(ndimage.gaussian_filter(arr, sigma=_GAUSS_SIGMA, mode="reflect"))


def mean(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """3x3 mean (box) filter (SciPy). ``sigma`` (noise) is ignored.

    Example
    -------
    >>> import numpy as np
    >>> float(mean(np.ones((16, 16)))[0, 0])
    1.0
    """
    arr = _check_image(image)
    _check_sigma(sigma)
    return _out(ndimage.uniform_filter(arr, size=_MEAN_SIZE, mode="reflect"))


def median(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """3x3 median filter (SciPy). ``sigma`` (noise) is ignored.

    Example
    -------
    >>> import numpy as np
    >>> img = np.zeros((16, 16)); img[5, 5] = 1.0   # one impulse
    >>> float(median(img).max())
    0.0
    """
    arr = _check_image(image)
    _check_sigma(sigma)
    return _out(ndimage.median_filter(arr, size=_MEDIAN_SIZE, mode="reflect"))


def wiener(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """Adaptive Wiener filter (SciPy), 5x5 local window, noise power = sigma**2.

    Example
    -------
    >>> import numpy as np
    >>> wiener(np.zeros((16, 16)), sigma=0.1).shape
    (16, 16)
    """
    arr = _check_image(image)
    s = _sigma_of(arr, sigma)
    # SciPy divides by the local variance, which is 0 on flat regions; it then uses the local mean
    # there (np.where), so the divide-by-zero warning is noise.
    with np.errstate(divide="ignore", invalid="ignore"):
        return _out(signal.wiener(arr, mysize=_WIENER_SIZE, noise=s * s))


def filter_combination(image: Any, *, sigma: float | None = None) -> np.ndarray:
    """The paper's "filter combination": mean 3x3 -> median 3x3 -> Gaussian (1 px), applied in sequence.

    The paper says only "combined denoising strategies by Mean Filter, Median Filter and Gaussian
    Filter". We apply them as a sequential chain in the order the paper lists them, not as the
    average of three outputs, because its own numbers are only consistent with that: the
    combination beats every single filter on Gaussian noise (PSNR 32.1 vs <= 31.4 dB, LIDC), which
    needs the stronger smoothing of a chain (an average of three similar low-pass outputs smooths no
    more than the strongest of them), and it scores like the mean filter on salt & pepper (32.6 vs
    mean 32.5, median 41.1 dB), which is what happens when the mean filter runs first and smears each
    impulse over 3x3 pixels before the median can remove it. ``sigma`` (noise) is ignored.

    Example
    -------
    >>> import numpy as np
    >>> float(filter_combination(np.ones((16, 16)))[0, 0])
    1.0
    """
    arr = _check_image(image)
    _check_sigma(sigma)
    out = ndimage.uniform_filter(arr, size=_MEAN_SIZE, mode="reflect")
    out = ndimage.median_filter(out, size=_MEDIAN_SIZE, mode="reflect")
    return _out(ndimage.gaussian_filter(out, sigma=_GAUSS_SIGMA, mode="reflect"))


#: Registry in the paper's column order (BM3D, which the paper cites but does not tabulate, first).
BASELINES: dict[str, BaselineFn] = {
    "bm3d": bm3d_denoise,
    "nlmeans": nlmeans,
    "bilateral": bilateral,
    "wavelet": wavelet,
    "gaussian": gaussian,
    "mean": mean,
    "median": median,
    "wiener": wiener,
    "filter_combination": filter_combination,
}


# ---------------------------------------------------------------- volumes, dispatch, timing


def apply_slicewise(fn: BaselineFn, volume: Any, *, sigma: float | None = None) -> np.ndarray:
    """Apply a 2D baseline to every z slice of a ``(z, y, x)`` volume (a 2D image is passed through).

    With ``sigma=None`` the noise is estimated per slice (noise level can vary along z, e.g. with
    the CT tube current). Returns a new float32 array of the volume's shape.

    Example
    -------
    >>> import numpy as np
    >>> apply_slicewise(median, np.zeros((3, 16, 16))).shape
    (3, 16, 16)
    """
    if hasattr(volume, "detach") and hasattr(volume, "cpu"):
        volume = volume.detach().cpu().numpy()
    vol = np.asarray(volume)
    if vol.ndim == 2:
        return fn(vol, sigma=sigma)
    if vol.ndim != 3 or vol.shape[0] == 0:
        raise InputError(f"volume: expected a 2D (y, x) or 3D (z, y, x) array, got shape {vol.shape}")
    out = np.empty(vol.shape, dtype=np.float32)
    for z in range(vol.shape[0]):
        out[z] = fn(vol[z], sigma=sigma)
    return out


def denoise(name: str, image: Any, *, sigma: float | None = None) -> np.ndarray:
    """Run the baseline ``name`` (a :data:`BASELINES` key) on a 2D image or, slice-wise, a volume.

    Example
    -------
    >>> import numpy as np
    >>> denoise("mean", np.zeros((2, 16, 16))).shape
    (2, 16, 16)
    """
    try:
        fn = BASELINES[name]
    except KeyError:
        raise InputError(f"baseline {name!r}: unknown; choose from {', '.join(BASELINES)}") from None
    return apply_slicewise(fn, image, sigma=sigma)


def time_method(fn: Callable[..., Any], image: Any, repeats: int = 3, **kwargs: Any) -> float:
    """Wall-clock seconds per call of ``fn(image, **kwargs)``: the median of ``repeats`` timed calls.

    No separate warm-up: the classical filters have none to speak of, and for slices/s the median
    already discards a slow first call when ``repeats >= 3``. ``1 / time_method(...)`` is slices/s.

    Example
    -------
    >>> import numpy as np
    >>> time_method(median, np.zeros((64, 64), np.float32), repeats=1) > 0
    True
    """
    if int(repeats) < 1:
        raise InputError(f"repeats: must be >= 1, got {repeats!r}")
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        fn(image, **kwargs)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))
