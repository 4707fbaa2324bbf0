"""The 13 synthetic noise and artifact models of the FP-loss paper (Table I), plus real CT noise texture.

Every model is a small callable class (torchio-transform style): physical parameters with
documented defaults + a ``seed`` in the constructor, ``__call__(image)`` on a 2D ``(y, x)`` or 3D
``(z, y, x)`` image in the library's normalised range (~[0, 1]), returning a NEW float32 array of
the same shape. ``from_level(level, seed)`` maps one unified severity ``level`` in [0, 1] to the
physical parameters: level 0 = (almost) no corruption, level 0.5 = the documented default
("clearly visible but still diagnostic"), level 1 = severe.

======================  =========================================================  ==========================================
name                    physics / model                                            defaults (level 0.5)          level 1
======================  =========================================================  ==========================================
``gaussian``            additive white Gaussian, ``x + N(0, sigma^2)``             sigma=0.05                    0.15
``poisson``             photon counting, ``Poisson(I0 * x) / I0`` (x<0 untouched)  photons I0=200 /unit          I0=10
``speckle``             multiplicative, ``x * (1 + N(0, sigma^2))``                sigma=0.1                     0.3
``noncentral_chi``      RSS magnitude over L coils of complex Gaussian channels     sigma=0.03, coils=4           sigma=0.1
``rician``              magnitude of signal + complex Gaussian noise (1 coil)      sigma=0.05                    0.15
``salt_pepper``         impulse noise: a fraction of pixels set to low/high        amount=0.05, salt_ratio=0.5   amount=0.2
``structured``          periodic sinusoidal stripes (+ random row banding)         amplitude=0.05, period=8 px   0.15
``thermal``             complex white Gaussian in k-space, then magnitude          sigma=0.04 (image-domain std)  0.12
``magnetic_field``      smooth multiplicative bias ``exp(poly_3(r))``              strength=0.3 (max abs log)   0.7
``chemical_shift``      band ('fat') signal partly displaced along readout         shift=3 px, fraction=0.7     8 px
``motion``              k-space segments from rotated/translated copies            3 deg, 3 px, 2 moves         8 deg, 8 px, 4
``wrap_around``         phase-encode FOV too small: fold-over (periodisation)      fov_fraction=0.8             0.6
``susceptibility``      local dipole field: readout distortion + pile-up/drop-out  shift=3 px, dropout=0.6      6 px, 0.9
``ct_correlated``       CT quantum noise after filtered back-projection: white     sigma=0.015, kernel cutoff    0.05
                        noise shaped by the NPS ``|f| * Hann(f / cutoff)^2``       random in [0.2, 0.6] cyc/px
======================  =========================================================  ==========================================

The first 13 are the paper's (:data:`PAPER_NOISE_NAMES`, the benchmark grid). ``ct_correlated`` is
not in the paper: it is the texture of a real CT scanner's noise (grain of a few pixels, set by the
reconstruction kernel), which white-noise training does not teach a net to remove.

Conventions: pointwise models (gaussian ... salt_pepper) and the bias field are truly 3D; k-space
and geometric MR artifacts act slice-wise in the in-plane axes (phase-encode = y (axis -2),
frequency-encode/readout = x (axis -1) by default). Magnitude models (noncentral_chi, rician,
thermal, motion) return magnitudes, so negative inputs come back positive. Inputs are never
modified. With an int seed a *new* instance is reproducible; repeated calls on one instance draw
new noise (the generator advances); pass a ``np.random.Generator`` to share a stream.

>>> img = np.full((32, 32), 0.5, dtype=np.float32)
>>> noisy = add_noise(img, "rician", level=0.5, seed=0)
>>> noisy.shape, noisy.dtype
((32, 32), dtype('float32'))
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Union

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .errors import InputError

# runtime alias: evaluated at import, so typing.Union (int | ... needs Python 3.10; Slicer 5.6/5.8 embed 3.9)
SeedLike = Union[int, np.random.Generator, None]  # noqa: UP007

__all__ = [
    "DEFAULT_LEVEL",
    "NOISES",
    "NOISE_NAMES",
    "PAPER_NOISE_NAMES",
    "CTCorrelatedNoise",
    "ChemicalShiftArtifact",
    "GaussianNoise",
    "MagneticFieldInhomogeneity",
    "MixNoise",
    "MotionArtifact",
    "NoiseModel",
    "NoncentralChiNoise",
    "PoissonNoise",
    "RicianNoise",
    "SaltPepperNoise",
    "SpeckleNoise",
    "StructuredNoise",
    "SusceptibilityArtifact",
    "ThermalNoise",
    "WrapAroundArtifact",
    "add_noise",
]

DEFAULT_LEVEL = 0.5
_SLAB = 16  # slices per FFT block for 3D volumes: bounds complex working memory


# --------------------------------------------------------------------------- helpers
def _make_rng(seed: SeedLike, who: str) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
        if seed is not None and seed < 0:
            raise InputError(f"{who}: seed must be >= 0, got {seed}")
        return np.random.default_rng(seed)
    raise InputError(f"{who}: seed must be an int, a numpy Generator or None, got {type(seed).__name__}")


def _check_image(image: Any, who: str) -> np.ndarray:
    """Validate and return a float32 COPY of ``image`` (2D or 3D, finite, non-empty)."""
    try:
        a = np.asarray(image)
    except Exception as exc:  # ragged lists etc.
        raise InputError(f"{who}: image cannot be converted to an array ({exc})") from None
    if a.dtype.kind not in "biuf":
        raise InputError(f"{who}: image must be a real numeric array, got dtype {a.dtype}")
    if a.ndim not in (2, 3):
        raise InputError(f"{who}: image must be 2D (y, x) or 3D (z, y, x), got {a.ndim}-D shape {a.shape}")
    if a.size == 0:
        raise InputError(f"{who}: image is empty (shape {a.shape})")
    a = np.array(a, dtype=np.float32, copy=True)
    if not np.isfinite(a).all():
        raise InputError(f"{who}: image contains NaN or infinite values")
    return a


def _check_level(level: Any, who: str) -> float:
    try:
        lv = float(level)
    except (TypeError, ValueError):
        raise InputError(f"{who}: level must be a number in [0, 1], got {level!r}") from None
    if not (math.isfinite(lv) and 0.0 <= lv <= 1.0):
        raise InputError(f"{who}: level must be in [0, 1], got {level!r}")
    return lv


def _ramp(level: float, at0: float, at05: float, at1: float, *, log: bool = False) -> float:
    """Piecewise-linear (or log-linear) map of level through (0, at0), (0.5, at05), (1, at1)."""
    if log:
        return float(np.exp(_ramp(level, math.log(at0), math.log(at05), math.log(at1))))
    if level <= 0.5:
        return at0 + (at05 - at0) * (level / 0.5)
    return at05 + (at1 - at05) * ((level - 0.5) / 0.5)


def _nonneg(value: Any, pname: str, who: str, *, upper: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{who}: {pname} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (upper is not None and v > upper):
        rng = f"[0, {upper}]" if upper is not None else ">= 0"
        raise InputError(f"{who}: {pname} must be finite and {rng}, got {value!r}")
    return v


def _inplane_axis(axis: int, who: str) -> int:
    if axis not in (-1, -2):
        raise InputError(f"{who}: axis must be -2 (y) or -1 (x) (an in-plane axis), got {axis!r}")
    return axis


def _slabs(a: np.ndarray):
    """Yield index tuples covering ``a`` in blocks of slices (2D: the whole image)."""
    if a.ndim == 2:
        yield (slice(None),)
        return
    for z0 in range(0, a.shape[0], _SLAB):
        yield (slice(z0, z0 + _SLAB),)


def _complex_normal(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Complex white Gaussian, each of real/imag ~ N(0, sigma^2), complex64."""
    n = np.empty(shape, dtype=np.complex64)
    n.real = rng.standard_normal(shape, dtype=np.float32)
    n.imag = rng.standard_normal(shape, dtype=np.float32)
    n *= np.float32(sigma)
    return n


# --------------------------------------------------------------------------- base class
class NoiseModel:
    """Base class: subclasses set ``name``, ``_params`` and implement ``_apply`` and ``_level_params``."""

    name: ClassVar[str] = ""
    _params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, seed: SeedLike = None) -> None:
        self.seed = seed
        self._rng = _make_rng(seed, self.name or type(self).__name__)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        raise NotImplementedError

    @classmethod
    def from_level(cls, level: float, seed: SeedLike = None) -> NoiseModel:
        """Build the model whose physical parameters correspond to severity ``level`` in [0, 1]."""
        lv = _check_level(level, cls.name)
        return cls(**cls._level_params(lv), seed=seed)

    @property
    def params(self) -> dict:
        """Physical parameters (for logging and explanation)."""
        return {k: getattr(self, k) for k in self._params}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({inner})"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Return a corrupted float32 copy of the 2D/3D ``image`` (the input is not modified)."""
        a = _check_image(image, self.name)
        out = self._apply(a)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _apply(self, a: np.ndarray) -> np.ndarray:  # a: private float32 copy, may be modified
        raise NotImplementedError


# --------------------------------------------------------------------------- pointwise noise
class GaussianNoise(NoiseModel):
    """Additive white Gaussian noise ``x + N(mean, sigma^2)``.

    Parameters: ``sigma`` std in normalised intensity units (default 0.05, i.e. 5 % of the
    [0, 1] range); ``mean`` offset (default 0). Level: sigma 0 -> 0.05 -> 0.15.

    >>> bool(GaussianNoise(sigma=0.05, seed=0)(np.zeros((8, 8))).std() > 0)
    True
    """

    name = "gaussian"
    _params = ("sigma", "mean")

    def __init__(self, sigma: float = 0.05, mean: float = 0.0, seed: SeedLike = None) -> None:
        super().__init__(seed)
        self.sigma = _nonneg(sigma, "sigma", self.name)
        self.mean = float(mean)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"sigma": _ramp(level, 0.0, 0.05, 0.15)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        n = self._rng.standard_normal(a.shape, dtype=np.float32)
        n *= np.float32(self.sigma)
        n += np.float32(self.mean)
        a += n
        return a


class PoissonNoise(NoiseModel):
    """Photon-counting (quantum) noise: ``Poisson(photons * x) / photons``.

    ``photons`` (I0) is the expected count for intensity 1.0 (a dose proxy; default 200, lower =
    noisier); the variance at intensity m is ``m / photons``. Negative intensities have rate 0 and
    are returned unchanged. Level: photons 1e6 -> 200 -> 10 (log scale).

    >>> out = PoissonNoise(photons=100, seed=0)(np.full((64, 64), 0.5))
    >>> bool(abs(out.var() - 0.005) < 0.001)
    True
    """

    name = "poisson"
    _params = ("photons",)

    def __init__(self, photons: float = 200.0, seed: SeedLike = None) -> None:
        super().__init__(seed)
        self.photons = _nonneg(photons, "photons", self.name)
        if self.photons <= 0:
            raise InputError(f"{self.name}: photons must be > 0, got {photons!r}")

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"photons": _ramp(level, 1e6, 200.0, 10.0, log=True)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        i0 = self.photons
        rate = np.clip(a, 0.0, None).astype(np.float64) * i0  # clip only for the rate
        counts = self._rng.poisson(rate)
        # x + (counts - rate)/I0 == counts/I0 where x >= 0, and leaves x < 0 untouched
        a += ((counts - rate) / i0).astype(np.float32)
        return a


class SpeckleNoise(NoiseModel):
    """Multiplicative speckle ``x * (1 + N(0, sigma^2))`` (std proportional to the signal).

    ``sigma`` is the relative std (default 0.1, i.e. 10 % of the local intensity).
    Level: sigma 0 -> 0.1 -> 0.3.

    >>> out = SpeckleNoise(sigma=0.1, seed=0)(np.full((64, 64), 0.5))
    >>> bool(abs(out.std() - 0.05) < 0.01)
    True
    """

    name = "speckle"
    _params = ("sigma",)

    def __init__(self, sigma: float = 0.1, seed: SeedLike = None) -> None:
        super().__init__(seed)
        self.sigma = _nonneg(sigma, "sigma", self.name)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"sigma": _ramp(level, 0.0, 0.1, 0.3)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        n = self._rng.standard_normal(a.shape, dtype=np.float32)
        n *= np.float32(self.sigma)
        n *= a
        a += n
        return a


class NoncentralChiNoise(NoiseModel):
    """Multi-coil MR magnitude noise: root-sum-of-squares over ``coils`` receive channels.

    Each coil sees ``x / sqrt(coils)`` (uniform sensitivity, so the noise-free RSS equals x) plus
    complex Gaussian noise with per-component std ``sigma`` (normalised units). The magnitude
    follows a non-central chi distribution with 2*coils degrees of freedom; the background
    (x = 0) mean ``sigma*sqrt(2)*Gamma(L+1/2)/Gamma(L)`` grows with the number of coils.
    Defaults sigma=0.03, coils=4. Level: sigma 0 -> 0.03 -> 0.1 (coils fixed).

    >>> bool(NoncentralChiNoise(sigma=0.03, coils=4, seed=0)(np.zeros((32, 32))).mean() > 0.07)
    True
    """

    name = "noncentral_chi"
    _params = ("sigma", "coils")

    def __init__(self, sigma: float = 0.03, coils: int = 4, seed: SeedLike = None) -> None:
        super().__init__(seed)
        self.sigma = _nonneg(sigma, "sigma", self.name)
        if not isinstance(coils, (int, np.integer)) or isinstance(coils, bool) or coils < 2:
            raise InputError(f"{self.name}: coils must be an int >= 2 (1 coil is 'rician'), got {coils!r}")
        self.coils = int(coils)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"sigma": _ramp(level, 0.0, 0.03, 0.1)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        s = a / np.float32(math.sqrt(self.coils))
        acc = np.zeros_like(a)
        sig = np.float32(self.sigma)
        for _ in range(self.coils):  # loop over coils keeps memory at a few volumes
            re = self._rng.standard_normal(a.shape, dtype=np.float32)
            re *= sig
            re += s
            acc += re * re
            im = self._rng.standard_normal(a.shape, dtype=np.float32)
            im *= sig
            acc += im * im
        return np.sqrt(acc, out=acc)


class RicianNoise(NoiseModel):
    """Single-coil MR magnitude noise ``|x + n_r + i n_i|``, ``n_r, n_i ~ N(0, sigma^2)``.

    ``sigma`` per-component std in normalised units (default 0.05). At zero signal the output is
    Rayleigh with mean ``sigma*sqrt(pi/2)`` (the Rician bias). Level: sigma 0 -> 0.05 -> 0.15.

    >>> out = RicianNoise(sigma=0.05, seed=0)(np.zeros((64, 64)))
    >>> bool(abs(out.mean() - 0.05 * np.sqrt(np.pi / 2)) < 0.005)
    True
    """

    name = "rician"
    _params = ("sigma",)

    def __init__(self, sigma: float = 0.05, seed: SeedLike = None) -> None:
        super().__init__(seed)
        self.sigma = _nonneg(sigma, "sigma", self.name)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"sigma": _ramp(level, 0.0, 0.05, 0.15)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        sig = np.float32(self.sigma)
        re = self._rng.standard_normal(a.shape, dtype=np.float32)
        re *= sig
        re += a
        im = self._rng.standard_normal(a.shape, dtype=np.float32)
        im *= sig
        return np.hypot(re, im, out=re)


class SaltPepperNoise(NoiseModel):
    """Impulse noise: a fraction ``amount`` of pixels is set to ``high`` (salt) or ``low`` (pepper).

    ``salt_ratio`` is the share of corrupted pixels that become salt. ``low``/``high`` default to
    0 and 1, the ends of the normalised range. Defaults amount=0.05 (5 % of pixels),
    salt_ratio=0.5. Level: amount 0 -> 0.05 -> 0.2.

    >>> out = SaltPepperNoise(amount=0.1, seed=0)(np.full((64, 64), 0.5))
    >>> bool(abs((out != 0.5).mean() - 0.1) < 0.02)
    True
    """

    name = "salt_pepper"
    _params = ("amount", "salt_ratio", "low", "high")

    def __init__(
        self,
        amount: float = 0.05,
        salt_ratio: float = 0.5,
        low: float = 0.0,
        high: float = 1.0,
        seed: SeedLike = None,
    ) -> None:
        super().__init__(seed)
        self.amount = _nonneg(amount, "amount", self.name, upper=1.0)
        self.salt_ratio = _nonneg(salt_ratio, "salt_ratio", self.name, upper=1.0)
        self.low, self.high = float(low), float(high)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"amount": _ramp(level, 0.0, 0.05, 0.2)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        hit = self._rng.random(a.shape, dtype=np.float32) < self.amount
        salt = self._rng.random(a.shape, dtype=np.float32) < self.salt_ratio
        a[hit & salt] = self.high
        a[hit & ~salt] = self.low
        return a


# --------------------------------------------------------------------------- structured / k-space
class StructuredNoise(NoiseModel):
    """Periodic stripe pattern (equipment interference) plus optional detector-row banding.

    Adds ``amplitude * sin(2*pi*(x*cos(a) + y*sin(a)) / period_px + phase)`` to every slice, with
    ``a = angle_deg`` (None = random in [0, 180)) and a random phase; ``banding`` is the std of a
    random offset shared by each group of ``band_width_px`` rows. Units: amplitude and banding in
    normalised intensity, period and band width in pixels. Defaults amplitude=0.05, period_px=8,
    banding=0.02, band_width_px=16. Level: amplitude 0 -> 0.05 -> 0.15, banding 0 -> 0.02 -> 0.05.

    >>> out = StructuredNoise(amplitude=0.1, period_px=8, angle_deg=0, banding=0, seed=0)(np.zeros((16, 64)))
    >>> int(np.argmax(np.abs(np.fft.rfft(out[0]))))  # 64 px / 8 px = bin 8
    8
    """

    name = "structured"
    _params = ("amplitude", "period_px", "angle_deg", "banding", "band_width_px")

    def __init__(
        self,
        amplitude: float = 0.05,
        period_px: float = 8.0,
        angle_deg: float | None = None,
        banding: float = 0.02,
        band_width_px: int = 16,
        seed: SeedLike = None,
    ) -> None:
        super().__init__(seed)
        self.amplitude = _nonneg(amplitude, "amplitude", self.name)
        self.period_px = _nonneg(period_px, "period_px", self.name)
        if self.period_px < 2:
            raise InputError(f"{self.name}: period_px must be >= 2 pixels (Nyquist), got {period_px!r}")
        self.angle_deg = None if angle_deg is None else float(angle_deg)
        self.banding = _nonneg(banding, "banding", self.name)
        if int(band_width_px) < 1:
            raise InputError(f"{self.name}: band_width_px must be >= 1, got {band_width_px!r}")
        self.band_width_px = int(band_width_px)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"amplitude": _ramp(level, 0.0, 0.05, 0.15), "banding": _ramp(level, 0.0, 0.02, 0.05)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        h, w = a.shape[-2:]
        ang = self.angle_deg if self.angle_deg is not None else float(self._rng.uniform(0.0, 180.0))
        phase = float(self._rng.uniform(0.0, 2 * np.pi))
        th = np.deg2rad(ang)
        y = np.arange(h, dtype=np.float64)[:, None]
        x = np.arange(w, dtype=np.float64)[None, :]
        pattern = self.amplitude * np.sin(
            2 * np.pi * (x * np.cos(th) + y * np.sin(th)) / self.period_px + phase
        )
        n_bands = -(-h // self.band_width_px)
        offsets = self._rng.normal(0.0, 1.0, n_bands) * self.banding
        pattern = pattern + np.repeat(offsets, self.band_width_px)[:h, None]
        a += pattern.astype(np.float32)  # broadcasts over z
        return a


class ThermalNoise(NoiseModel):
    """Receiver thermal noise: complex white Gaussian added in k-space, magnitude image returned.

    The in-plane FFT is orthonormal, so ``sigma`` (normalised units, default 0.04) is also the
    per-component std of the noise in the image domain (= the noise std on high-signal tissue).
    Applied slice-wise. Level: sigma 0 -> 0.04 -> 0.12.

    >>> out = ThermalNoise(sigma=0.04, seed=0)(np.ones((64, 64)))
    >>> bool(abs(out.std() - 0.04) < 0.005)
    True
    """

    name = "thermal"
    _params = ("sigma",)

    def __init__(self, sigma: float = 0.04, seed: SeedLike = None) -> None:
        super().__init__(seed)
        self.sigma = _nonneg(sigma, "sigma", self.name)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"sigma": _ramp(level, 0.0, 0.04, 0.12)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        for sl in _slabs(a):
            k = sfft.fft2(a[sl].astype(np.complex64), axes=(-2, -1), norm="ortho")
            k += _complex_normal(self._rng, k.shape, self.sigma)
            a[sl] = np.abs(sfft.ifft2(k, axes=(-2, -1), norm="ortho"))
        return a


class MagneticFieldInhomogeneity(NoiseModel):
    """Smooth multiplicative bias field (B1/B0 inhomogeneity): ``x * exp(p(r))``.

    ``p`` is a random polynomial of total degree ``order`` (default 3) in coordinates scaled to
    [-1, 1] along each axis (truly 3D for volumes), rescaled so ``max |p| = strength``; the field
    therefore lies in [exp(-strength), exp(strength)] (default strength 0.3: about -26 %/+35 %).
    The field depends only on the shape and the seed, never on the image content.
    Level: strength 0 -> 0.3 -> 0.7.

    >>> out = MagneticFieldInhomogeneity(strength=0.3, seed=0)(np.ones((32, 32)))
    >>> bool(np.exp(-0.3) - 1e-5 <= out.min() and out.max() <= np.exp(0.3) + 1e-5)
    True
    """

    name = "magnetic_field"
    _params = ("strength", "order")

    def __init__(self, strength: float = 0.3, order: int = 3, seed: SeedLike = None) -> None:
        super().__init__(seed)
        self.strength = _nonneg(strength, "strength", self.name)
        if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 1 <= order <= 6:
            raise InputError(f"{self.name}: order must be an int in [1, 6], got {order!r}")
        self.order = int(order)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"strength": _ramp(level, 0.0, 0.3, 0.7)}

    def field(self, shape: tuple[int, ...]) -> np.ndarray:
        """Draw a bias field (float32, ``shape``) from this model's generator."""
        nd = len(shape)
        axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
        o = self.order
        if nd == 2:
            yy, xx = axes
            p = np.zeros(shape)
            for i in range(o + 1):
                for j in range(o + 1 - i):
                    if i + j:
                        p += self._rng.uniform(-1, 1) * np.outer(yy**i, xx**j)
        else:
            zz, yy, xx = axes
            p = np.zeros(shape, dtype=np.float32)
            for k in range(o + 1):  # separable: p = sum_k z^k * P_k(y, x)
                pk = np.zeros(shape[1:])
                for i in range(o + 1 - k):
                    for j in range(o + 1 - k - i):
                        if i + j + k:
                            pk += self._rng.uniform(-1, 1) * np.outer(yy**i, xx**j)
                p += (zz**k).astype(np.float32)[:, None, None] * pk.astype(np.float32)[None]
        peak = float(np.abs(p).max())
        scale = self.strength / peak if peak > 0 else 0.0
        p *= scale
        return np.exp(p).astype(np.float32)

    def _apply(self, a: np.ndarray) -> np.ndarray:
        a *= self.field(a.shape)
        return a


class ChemicalShiftArtifact(NoiseModel):
    """Chemical-shift (fat/water) misregistration along the frequency-encode axis.

    Pixels whose intensity lies in ``band`` = (lo, hi) are treated as 'fat' (None = the image's
    70th-95th percentile band). A share ``fraction`` of their signal is removed in place and
    re-added ``shift_px`` pixels away along ``axis`` (default -1, readout = x): a shifted,
    attenuated replica that leaves a dark gap on one side and a bright rim on the other.
    ``direction`` +1/-1 is the readout polarity (None = random). Units: shift in pixels,
    band in normalised intensity. Defaults shift_px=3, fraction=0.7. Level: shift 0 -> 3 -> 8 px.

    >>> img = np.zeros((16, 16)); img[6:10, 6:10] = 0.8
    >>> out = ChemicalShiftArtifact(shift_px=2, band=(0.7, 0.9), direction=1)(img)
    >>> float(out[7, 11]) > 0  # replica 2 px to the right
    True
    """

    name = "chemical_shift"
    _params = ("shift_px", "band", "fraction", "axis", "direction")

    def __init__(
        self,
        shift_px: int = 3,
        band: tuple[float, float] | None = None,
        fraction: float = 0.7,
        axis: int = -1,
        direction: int | None = None,
        seed: SeedLike = None,
    ) -> None:
        super().__init__(seed)
        self.shift_px = int(round(_nonneg(shift_px, "shift_px", self.name)))
        if band is not None:
            if len(band) != 2 or not all(math.isfinite(float(b)) for b in band) or band[0] > band[1]:
                raise InputError(f"{self.name}: band must be (lo, hi) with lo <= hi, got {band!r}")
            band = (float(band[0]), float(band[1]))
        self.band = band
        self.fraction = _nonneg(fraction, "fraction", self.name, upper=1.0)
        self.axis = _inplane_axis(axis, self.name)
        if direction not in (None, 1, -1):
            raise InputError(f"{self.name}: direction must be 1, -1 or None, got {direction!r}")
        self.direction = direction

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"shift_px": int(round(_ramp(level, 0.0, 3.0, 8.0)))}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        sign = self.direction if self.direction is not None else int(self._rng.choice((-1, 1)))
        lo, hi = self.band if self.band is not None else np.percentile(a, (70.0, 95.0))
        s = self.shift_px * sign
        n = a.shape[self.axis]
        if s == 0 or abs(s) >= n or self.fraction == 0:
            return a
        fat = np.where((a >= lo) & (a <= hi), a, np.float32(0)) * np.float32(self.fraction)
        moved = np.zeros_like(fat)
        src = [slice(None)] * a.ndim
        dst = [slice(None)] * a.ndim
        src[self.axis] = slice(0, n - s) if s > 0 else slice(-s, n)
        dst[self.axis] = slice(s, n) if s > 0 else slice(0, n + s)
        moved[tuple(dst)] = fat[tuple(src)]  # zero-filled shift: no wrap of the replica
        a -= fat
        a += moved
        return a


class MotionArtifact(NoiseModel):
    """Rigid in-plane patient motion during acquisition (torchio RandomMotion-like).

    ``num_transforms`` poses (rotation uniform in +-``degrees``, translation uniform in
    +-``translation_px`` per in-plane axis) start at random times; each pose contributes the
    phase-encode k-space lines (``axis``, default -2 = y) acquired while it lasted. The segment
    that holds the k-space centre keeps the original pose, so the anatomy stays registered and the
    motion shows as ghosting/blurring. Slice-wise, magnitude output. Defaults degrees=3,
    translation_px=3, num_transforms=2. Level: degrees and translation 0 -> 3 -> 8, num_transforms
    1 -> 2 -> 4 (more moves = more corrupted k-space segments).

    >>> img = np.zeros((32, 32)); img[8:24, 10:20] = 1
    >>> out = MotionArtifact(degrees=5, translation_px=4, seed=0)(img)
    >>> bool(np.abs(out - img).max() > 0.01)
    True
    """

    name = "motion"
    _params = ("degrees", "translation_px", "num_transforms", "axis")

    def __init__(
        self,
        degrees: float = 3.0,
        translation_px: float = 3.0,
        num_transforms: int = 2,
        axis: int = -2,
        seed: SeedLike = None,
    ) -> None:
        super().__init__(seed)
        self.degrees = _nonneg(degrees, "degrees", self.name)
        self.translation_px = _nonneg(translation_px, "translation_px", self.name)
        if (
            not isinstance(num_transforms, (int, np.integer))
            or isinstance(num_transforms, bool)
            or num_transforms < 1
        ):
            raise InputError(f"{self.name}: num_transforms must be an int >= 1, got {num_transforms!r}")
        self.num_transforms = int(num_transforms)
        self.axis = _inplane_axis(axis, self.name)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        v = _ramp(level, 0.0, 3.0, 8.0)
        return {"degrees": v, "translation_px": v, "num_transforms": int(round(_ramp(level, 1.0, 2.0, 4.0)))}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        m = self.num_transforms
        angles = self._rng.uniform(-self.degrees, self.degrees, m)
        shifts = self._rng.uniform(-self.translation_px, self.translation_px, (m, 2))
        times = np.sort(self._rng.uniform(0.0, 1.0, m))
        n_lines = a.shape[self.axis]
        # segment id of each line in centred (fftshift) order; the centre segment keeps the pose
        bounds = np.floor(times * n_lines).astype(int)
        seg_c = np.searchsorted(bounds, np.arange(n_lines), side="right")
        centre_seg = seg_c[n_lines // 2]
        seg = np.fft.ifftshift(seg_c)  # back to FFT line order
        pose_of_seg = [None if s == centre_seg else 0 for s in range(m + 1)]
        k = 0
        for s in range(m + 1):
            if pose_of_seg[s] is not None:
                pose_of_seg[s] = k
                k += 1
        h, w = a.shape[-2:]
        c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
        for sl in _slabs(a):
            block = a[sl]
            kspace = sfft.fft2(block.astype(np.complex64), axes=(-2, -1), norm="ortho")
            for s in range(m + 1):
                p = pose_of_seg[s]
                lines = np.nonzero(seg == s)[0]
                if p is None or lines.size == 0:
                    continue
                moved = self._move(block, angles[p], shifts[p], c)
                km = sfft.fft2(moved.astype(np.complex64), axes=(-2, -1), norm="ortho")
                idx = [slice(None)] * block.ndim
                idx[self.axis] = lines
                kspace[tuple(idx)] = km[tuple(idx)]
            a[sl] = np.abs(sfft.ifft2(kspace, axes=(-2, -1), norm="ortho"))
        return a

    @staticmethod
    def _move(block: np.ndarray, angle_deg: float, shift: np.ndarray, c: np.ndarray) -> np.ndarray:
        th = np.deg2rad(angle_deg)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        offset2 = c - rot @ c - shift  # output(o) = input(rot @ o + offset)
        if block.ndim == 2:
            mat, off = rot, offset2
        else:
            mat = np.eye(3)
            mat[1:, 1:] = rot
            off = np.concatenate([[0.0], offset2])
        return ndimage.affine_transform(block, mat, offset=off, order=1, mode="nearest")


class WrapAroundArtifact(NoiseModel):
    """Aliasing (fold-over) from a phase-encode field of view smaller than the object.

    With an FOV of ``M = round(fov_fraction * N)`` pixels along ``axis`` (default -2 = y), the
    reconstruction is the periodisation of the object with period M: every pixel j receives the
    signal of all pixels j + k*M (k != 0), scaled by ``weight`` (1 = ideal coil; < 1 models coil
    sensitivity fall-off). Equivalent to skipping/undersampling phase-encode k-space lines.
    Content near one edge therefore appears near the other. Deterministic given its parameters
    (``seed`` is accepted for API uniformity). Defaults fov_fraction=0.8, weight=1.
    Level: fov_fraction 1.0 -> 0.8 -> 0.6.

    >>> img = np.zeros((10, 4)); img[9] = 1
    >>> float(WrapAroundArtifact(fov_fraction=0.8)(img)[1, 0])  # row 9 folds onto row 9 - 8 = 1
    1.0
    """

    name = "wrap_around"
    _params = ("fov_fraction", "weight", "axis")

    def __init__(
        self, fov_fraction: float = 0.8, weight: float = 1.0, axis: int = -2, seed: SeedLike = None
    ) -> None:
        super().__init__(seed)
        self.fov_fraction = _nonneg(fov_fraction, "fov_fraction", self.name, upper=1.0)
        if self.fov_fraction <= 0:
            raise InputError(f"{self.name}: fov_fraction must be in (0, 1], got {fov_fraction!r}")
        self.weight = _nonneg(weight, "weight", self.name)
        self.axis = _inplane_axis(axis, self.name)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"fov_fraction": _ramp(level, 1.0, 0.8, 0.6)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        n = a.shape[self.axis]
        m = max(1, int(round(self.fov_fraction * n)))
        if m >= n or self.weight == 0:
            return a
        src = np.moveaxis(a.copy(), self.axis, 0)
        out = np.moveaxis(a, self.axis, 0)  # view: writes go to a
        w = np.float32(self.weight)
        for shift in range(m, n, m):
            out[: n - shift] += w * src[shift:]
            out[shift:] += w * src[: n - shift]
        return a


class SusceptibilityArtifact(NoiseModel):
    """Local susceptibility artifact (air/tissue or metal): geometric distortion + drop-out.

    A localised dipole-shaped field offset ``(3cos^2(t) - 1)/2 * rho^2 exp(-rho^2)`` (rho = r / R,
    R = ``radius`` * min(in-plane size), B0 along y in 2D and z in 3D, compact support r < 4R)
    centred at ``center`` (pixel/voxel coordinates, None = random in the central half) displaces
    signal along the readout axis (x) by up to ``max_shift_px`` pixels, with the Jacobian
    intensity change (pile-up where signal converges, thinning where it spreads), and intravoxel
    dephasing removes up to ``dropout`` (fraction, 0..1) of the signal at the centre. Pixels
    farther than 4R from the centre are returned unchanged. Defaults max_shift_px=3, dropout=0.6,
    radius=0.08. Level: max_shift_px 0 -> 3 -> 6, dropout 0 -> 0.6 -> 0.9.

    >>> out = SusceptibilityArtifact(center=(32, 32), seed=0)(np.ones((64, 64)))
    >>> bool(out[32, 32] < 0.6 and out[0, 0] == 1.0)
    True
    """

    name = "susceptibility"
    _params = ("max_shift_px", "dropout", "radius", "center")

    def __init__(
        self,
        max_shift_px: float = 3.0,
        dropout: float = 0.6,
        radius: float = 0.08,
        center: tuple[float, ...] | None = None,
        seed: SeedLike = None,
    ) -> None:
        super().__init__(seed)
        self.max_shift_px = _nonneg(max_shift_px, "max_shift_px", self.name)
        self.dropout = _nonneg(dropout, "dropout", self.name, upper=1.0)
        self.radius = _nonneg(radius, "radius", self.name, upper=1.0)
        if self.radius <= 0:
            raise InputError(f"{self.name}: radius must be in (0, 1], got {radius!r}")
        self.center = None if center is None else tuple(float(c) for c in center)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"max_shift_px": _ramp(level, 0.0, 3.0, 6.0), "dropout": _ramp(level, 0.0, 0.6, 0.9)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        vol = a if a.ndim == 3 else a[None]  # view: writes go to a
        nz, h, w = vol.shape
        r0 = max(1.5, self.radius * min(h, w))
        support = 4.0 * r0
        if self.center is None:
            c = np.array([self._rng.uniform(0.25 * (n - 1), 0.75 * (n - 1)) for n in a.shape])
        else:
            if len(self.center) != a.ndim:
                raise InputError(f"{self.name}: center needs {a.ndim} coordinates, got {self.center!r}")
            c = np.array(self.center)
        cz, cy, cx = (c[0], c[1], c[2]) if a.ndim == 3 else (0.0, c[0], c[1])
        mx = support + self.max_shift_px + 2  # room for the readout displacement
        ys = slice(max(0, math.floor(cy - support)), min(h, math.ceil(cy + support) + 1))
        xs = slice(max(0, math.floor(cx - mx)), min(w, math.ceil(cx + mx) + 1))
        zs = range(max(0, math.floor(cz - support)), min(nz, math.ceil(cz + support) + 1))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            return a  # dipole entirely outside the image
        # peak of |field| (at cos^2 = 1) for the normalisation to max_shift_px
        rr = np.linspace(0.0, support, 4001)
        peak = float(np.max((rr / r0) ** 2 * np.exp(-((rr / r0) ** 2)) * (1 - (rr / support) ** 2) ** 2))
        gy, gx = np.meshgrid(
            np.arange(ys.start, ys.stop, dtype=np.float64),
            np.arange(xs.start, xs.stop, dtype=np.float64),
            indexing="ij",
        )
        dy, dx = gy - cy, gx - cx
        for z in zs:  # slice by slice: bounded memory on large volumes
            dz = float(z - cz) if a.ndim == 3 else 0.0
            r2 = dy * dy + dx * dx + dz * dz
            b0 = dz * dz if a.ndim == 3 else dy * dy  # B0 along z in 3D, along y in 2D
            cos2 = np.divide(b0, r2, out=np.zeros_like(r2), where=r2 > 0)
            taper = np.clip(1.0 - r2 / support**2, 0.0, 1.0) ** 2
            rho2 = r2 / r0**2
            disp = (self.max_shift_px / peak) * 0.5 * (3.0 * cos2 - 1.0) * rho2 * np.exp(-rho2) * taper
            crop = vol[z, ys, xs]
            # signal from true position x appears at x + disp: sample back at x' - disp(x')
            coords = [gy - ys.start, gx - xs.start - disp]
            warped = ndimage.map_coordinates(crop, coords, order=1, mode="nearest")
            jac = 1.0 + np.gradient(disp, axis=-1) if disp.shape[-1] > 1 else np.ones_like(disp)
            gain = 1.0 / np.clip(jac, 0.2, None)  # pile-up (jac < 1) / thinning (jac > 1)
            keep = 1.0 - self.dropout * np.exp(-r2 / (0.75 * r0) ** 2) * taper  # intravoxel dephasing
            vol[z, ys, xs] = (warped * gain * keep).astype(np.float32)
        return a


# --------------------------------------------------------------------------- CT noise texture
class CTCorrelatedNoise(NoiseModel):
    """Quantum noise of a CT slice reconstructed by filtered back-projection: correlated, not white.

    Projection noise passed through the ramp filter and the kernel's apodisation window has the
    radial noise power spectrum ``NPS(f) ~ |f| * Hann(f / cutoff)^2`` (``f`` in cycles per pixel):
    no power at zero frequency, a peak in the mid band, nothing above ``cutoff``. White Gaussian
    noise is shaped to that spectrum in the in-plane Fourier domain, slice by slice (independent
    between slices), and scaled to std ``sigma`` (normalised intensity units; 0.015 is about 60 HU on
    the CT window). ``cutoff`` (cycles/pixel, in (0, 0.71]): about 0.25 for a smooth soft-tissue
    kernel, 0.5 for a sharp lung / bone kernel; None draws it uniformly in [0.2, 0.6] per call.
    Level: sigma 0 -> 0.015 -> 0.05.

    >>> out = CTCorrelatedNoise(sigma=0.02, cutoff=0.4, seed=0)(np.zeros((128, 128)))
    >>> bool(abs(out.std() - 0.02) < 0.002)
    True
    """

    name = "ct_correlated"
    _params = ("sigma", "cutoff")

    def __init__(self, sigma: float = 0.015, cutoff: float | None = None, seed: SeedLike = None) -> None:
        super().__init__(seed)
        self.sigma = _nonneg(sigma, "sigma", self.name)
        if cutoff is not None and not (0.0 < float(cutoff) <= 0.71):
            raise InputError(f"{self.name}: cutoff must be in (0, 0.71] cycles/pixel, got {cutoff!r}")
        self.cutoff = None if cutoff is None else float(cutoff)

    @classmethod
    def _level_params(cls, level: float) -> dict:
        return {"sigma": _ramp(level, 0.0, 0.015, 0.05)}

    def _apply(self, a: np.ndarray) -> np.ndarray:
        h, w = a.shape[-2:]
        fc = self.cutoff if self.cutoff is not None else float(self._rng.uniform(0.2, 0.6))
        f = np.hypot(sfft.fftfreq(h)[:, None], sfft.rfftfreq(w)[None, :])
        amp = np.sqrt(f) * np.where(f < fc, 0.5 * (1.0 + np.cos(np.pi * f / fc)), 0.0)
        # unit output variance: Parseval over the full spectrum (rfft columns other than 0 and Nyquist count twice)
        weight = np.full(amp.shape[1], 2.0)
        weight[0] = 1.0
        if w % 2 == 0:
            weight[-1] = 1.0
        power = float((amp**2 * weight).sum()) / (h * w)
        if power <= 0:  # tiny image: no frequency below the cutoff
            return a
        amp = (amp * (self.sigma / np.sqrt(power))).astype(np.float32)
        for sl in _slabs(a):
            white = self._rng.standard_normal(a[sl].shape, dtype=np.float32)
            a[sl] += sfft.irfft2(sfft.rfft2(white, axes=(-2, -1)) * amp, s=(h, w), axes=(-2, -1)).astype(np.float32)
        return a


# --------------------------------------------------------------------------- registry and helpers
NOISES: dict[str, type[NoiseModel]] = {
    cls.name: cls
    for cls in (
        GaussianNoise,
        PoissonNoise,
        SpeckleNoise,
        NoncentralChiNoise,
        RicianNoise,
        SaltPepperNoise,
        StructuredNoise,
        ThermalNoise,
        MagneticFieldInhomogeneity,
        ChemicalShiftArtifact,
        MotionArtifact,
        WrapAroundArtifact,
        SusceptibilityArtifact,
        CTCorrelatedNoise,
    )
}
#: The noise names in registry order (the paper's table order, then ``ct_correlated``).
NOISE_NAMES: tuple[str, ...] = tuple(NOISES)
#: The paper's 13 (Table I): the benchmark grid.
PAPER_NOISE_NAMES: tuple[str, ...] = NOISE_NAMES[:13]


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in NOISES:
        raise InputError(f"unknown noise {name!r}; valid names: {', '.join(NOISE_NAMES)}")
    return name


def add_noise(
    image: np.ndarray, name: str, *, level: float | None = None, seed: SeedLike = None
) -> np.ndarray:
    """Corrupt ``image`` with noise model ``name`` at severity ``level`` (default 0.5).

    >>> add_noise(np.zeros((8, 8)), "gaussian", level=0.5, seed=1).shape
    (8, 8)
    """
    model = NOISES[_check_name(name)].from_level(DEFAULT_LEVEL if level is None else level, seed=seed)
    return model(image)


class MixNoise:
    """Training sampler: each call draws a noise type from ``names`` and a level uniformly in
    ``level_range`` and returns ``(noisy, name, level)``. Deterministic for an int seed.

    >>> noisy, name, level = MixNoise(seed=0)(np.zeros((16, 16)))
    >>> name in NOISE_NAMES and 0.1 <= level <= 1.0
    True
    """

    def __init__(
        self,
        names: tuple[str, ...] | list[str] = NOISE_NAMES,
        level_range: tuple[float, float] = (0.1, 1.0),
        seed: SeedLike = None,
    ) -> None:
        if isinstance(names, str):
            names = (names,)
        names = tuple(names)
        if not names:
            raise InputError("MixNoise: names must not be empty")
        self.names = tuple(_check_name(n) for n in names)
        try:
            lo, hi = (float(v) for v in level_range)
        except (TypeError, ValueError):
            raise InputError(f"MixNoise: level_range must be (lo, hi), got {level_range!r}") from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise InputError(f"MixNoise: level_range must satisfy 0 <= lo <= hi <= 1, got {level_range!r}")
        self.level_range = (lo, hi)
        self._rng = _make_rng(seed, "MixNoise")

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, str, float]:
        name = self.names[int(self._rng.integers(len(self.names)))]
        level = float(self._rng.uniform(*self.level_range))
        noisy = NOISES[name].from_level(level, seed=self._rng)(image)
        return noisy, name, level
