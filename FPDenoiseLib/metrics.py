"""Image-quality and feature-preservation metrics (PSNR, SSIM, GB correlation, 95% CI).

PSNR and SSIM are thin wrappers over :mod:`skimage.metrics` with one difference: ``data_range`` is
*required*. scikit-image guesses it from the dtype (1 for floats, 65535 for uint16...), which is wrong
for CT in HU or MR in arbitrary units and silently changes every PSNR; callers must say what the
full intensity range of the reference is, in the same units as the arrays (e.g. ``4095.0`` for a CT
window -1024..3071 HU, ``1.0`` for the library's normalised range).

Arrays are ``(y, x)`` images or ``(z, y, x)`` volumes (see docs/ARCHITECTURE.md). Both inputs are
read-only here; they are converted to float64 copies before any arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from FPDenoiseLib.errors import InputError

__all__ = ["psnr", "ssim", "feature_preservation", "mean_ci95"]


def _to_numpy(a: Any, what: str) -> np.ndarray:
    """Float64 copy of ``a`` (numpy array, torch tensor or array-like); InputError if not numeric."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor, without importing torch here
        a = a.detach().cpu().numpy()
    try:
        arr = np.array(a, dtype=np.float64)  # np.array always copies: the caller's array is untouched
    except (TypeError, ValueError) as err:
        raise InputError(f"{what}: not a numeric array ({err})") from None
    return arr


def _check_pair(reference: Any, test: Any, *, ndims: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    ref = _to_numpy(reference, "reference")
    tst = _to_numpy(test, "test")
    if ref.shape != tst.shape:
        raise InputError(f"reference/test: shape mismatch {ref.shape} vs {tst.shape}")
    if ref.ndim not in ndims:
        raise InputError(f"reference: expected a {' or '.join(f'{d}D' for d in ndims)} array, got shape {ref.shape}")
    if ref.size == 0:
        raise InputError("reference: empty array")
    for name, arr in (("reference", ref), ("test", tst)):
        if not np.isfinite(arr).all():
            raise InputError(f"{name}: contains NaN or inf")
    return ref, tst


def _check_range(data_range: Any) -> float:
    try:
        dr = float(data_range)
    except (TypeError, ValueError):
        raise InputError(f"data_range: must be a positive number, got {data_range!r}") from None
    if not math.isfinite(dr) or dr <= 0:
        raise InputError(f"data_range: must be a positive finite number, got {data_range!r}")
    return dr


def psnr(reference: Any, test: Any, *, data_range: float) -> float:
    """Peak signal-to-noise ratio of ``test`` against ``reference``, in dB.

    ``PSNR = 10 * log10(data_range**2 / MSE)``; computed by
    :func:`skimage.metrics.peak_signal_noise_ratio` on float64 copies, over every voxel of a 2D or
    3D array.

    Parameters
    ----------
    reference, test : ndarray, shape (y, x) or (z, y, x)
        Ground truth and the image to score, same shape and same intensity units.
    data_range : float
        Full range of possible values of ``reference`` in its units (e.g. 1.0 for the normalised
        range, 4095.0 for CT -1024..3071 HU). Required: no guessing from the dtype.

    Returns
    -------
    float
        PSNR in dB; ``inf`` when the two arrays are identical (MSE = 0; not capped).

    Raises
    ------
    InputError
        Shape mismatch, NaN/inf values, not 2D/3D, or ``data_range`` not a positive finite number.

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.zeros((8, 8)); test = ref + 0.1
    >>> round(psnr(ref, test, data_range=1.0), 3)
    20.0
    """
    ref, tst = _check_pair(reference, test, ndims=(2, 3))
    dr = _check_range(data_range)
    if np.array_equal(ref, tst):
        return math.inf  # skimage would return inf too, but with a divide-by-zero RuntimeWarning
    return float(peak_signal_noise_ratio(ref, tst, data_range=dr))


def ssim(reference: Any, test: Any, *, data_range: float) -> float:
    """Structural similarity (mean SSIM) of ``test`` against ``reference``, unitless in [-1, 1].

    2D: :func:`skimage.metrics.structural_similarity` with its defaults (7x7 uniform window,
    K1=0.01, K2=0.03) and the given ``data_range``.

    3D ``(z, y, x)``: the **mean of the 2D SSIM of each z slice**. Why slice-wise rather than a
    7x7x7 window: medical volumes are usually anisotropic (slice spacing several times the pixel
    spacing), the paper and the benchmark score 2D slices, and a 3D window would need z >= 7.

    Parameters
    ----------
    reference, test : ndarray, shape (y, x) or (z, y, x), y and x >= 7
        Ground truth and the image to score, same shape and units.
    data_range : float
        Full range of possible values of ``reference`` in its units. Required.

    Returns
    -------
    float
        Mean SSIM; 1.0 for identical images.

    Raises
    ------
    InputError
        Shape mismatch, NaN/inf, not 2D/3D, slices smaller than 7x7, or bad ``data_range``.

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    >>> ssim(ref, ref, data_range=1.0)
    1.0
    """
    ref, tst = _check_pair(reference, test, ndims=(2, 3))
    dr = _check_range(data_range)
    if min(ref.shape[-2:]) < 7:
        raise InputError(f"reference: SSIM needs slices of at least 7x7 pixels, got shape {ref.shape}")
    if ref.ndim == 2:
        return float(structural_similarity(ref, tst, data_range=dr))
    return float(np.mean([structural_similarity(r, t, data_range=dr) for r, t in zip(ref, tst)]))


def feature_preservation(gb_reference: Any, gb_test: Any) -> float:
    """Feature-preservation score: Pearson correlation of two Guided-Backprop saliency maps.

    ``gb_reference`` is typically GB_f(clean) and ``gb_test`` GB_f(denoised) (see
    :func:`FPDenoiseLib.xai.guided_backprop`; numpy arrays or torch tensors of any equal shape).
    The maps are flattened and correlated as given (signed, as the FP loss compares them).

    Why Pearson correlation rather than the FP loss's squared difference: GB maps have no physical
    unit and their magnitude varies with image contrast and the network, so an MSE between maps is
    not comparable across images or models. The correlation is scale- and offset-free, bounded in
    [-1, 1], and reads directly: 1 = the same saliency pattern (features preserved), ~0 = unrelated
    pattern (e.g. maps of independent noise), negative = inverted.

    Degenerate maps (zero variance, e.g. all-zero saliency): two constant maps score 1.0 (nothing
    differs); one constant and one non-constant map score 0.0 (no shared pattern).

    Parameters
    ----------
    gb_reference, gb_test : array-like or torch.Tensor
        Saliency maps of the same shape.

    Returns
    -------
    float
        Pearson correlation coefficient in [-1, 1], unitless.

    Raises
    ------
    InputError
        Shape mismatch, empty maps or NaN/inf values.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.random.default_rng(0).normal(size=(32, 32))
    >>> feature_preservation(g, 3 * g + 1)
    1.0
    """
    a = _to_numpy(gb_reference, "gb_reference")
    b = _to_numpy(gb_test, "gb_test")
    if a.shape != b.shape:
        raise InputError(f"gb_reference/gb_test: shape mismatch {a.shape} vs {b.shape}")
    a, b = a.ravel(), b.ravel()
    if a.size == 0:
        raise InputError("gb_reference: empty saliency map")
    for name, arr in (("gb_reference", a), ("gb_test", b)):
        if not np.isfinite(arr).all():
            raise InputError(f"{name}: contains NaN or inf")
    a = a - a.mean()
    b = b - b.mean()
    na, nb = float(np.sqrt(a @ a)), float(np.sqrt(b @ b))
    # Relative threshold: a map that is constant up to float rounding counts as constant.
    const_a = na <= 1e-12 * max(1.0, float(np.abs(a).max(initial=0.0))) * math.sqrt(a.size)
    const_b = nb <= 1e-12 * max(1.0, float(np.abs(b).max(initial=0.0))) * math.sqrt(b.size)
    if const_a or const_b:
        return 1.0 if (const_a and const_b) else 0.0
    r = float(a @ b) / (na * nb)
    return float(min(1.0, max(-1.0, r)))


def mean_ci95(values: Iterable[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% confidence interval of the mean (Student's t-distribution).

    ``lo, hi = mean -/+ t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation
    (ddof=1). Values keep their unit (dB for PSNR, unitless for SSIM, seconds for timings).

    Parameters
    ----------
    values : iterable of float
        Per-image measurements; at least one, all finite.

    Returns
    -------
    (mean, lo, hi) : tuple of float
        With a single value the interval is undefined: ``(value, nan, nan)``.

    Raises
    ------
    InputError
        No values, or a NaN/inf among them (e.g. the inf PSNR of an image identical to its
        reference; filter or cap such rows before averaging).

    Examples
    --------
    >>> m, lo, hi = mean_ci95([1.0, 2.0, 3.0])
    >>> m, round(lo, 4), round(hi, 4)
    (2.0, -0.4841, 4.4841)
    """
    try:
        v = np.array(list(values), dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise InputError(f"values: not numeric ({err})") from None
    if v.size == 0:
        raise InputError("values: need at least one value for a mean")
    if not np.isfinite(v).all():
        raise InputError("values: contain NaN or inf (e.g. PSNR of identical images); filter or cap them first")
    mean = float(v.mean())
    if v.size == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half
