"""Intensity normalisation between original units (HU, detector counts, MR a.u.) and the
library's normalised range (~[0, 1]) that the networks and noise models work in.

CT uses a fixed HU window so that one HU means the same everywhere (the model learns the
noise of real tissue densities); X-ray and MR have no absolute unit, so each image is scaled by
its own percentiles. The mapping is linear and never clips, so ``inverse(forward(a)) == a``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError

DEFAULT_POLICY: dict = {"ct_window": (-1024.0, 3071.0), "percentiles": (0.5, 99.5)}


def looks_like_ct(a: np.ndarray) -> bool:
    """HU data without a modality tag (NRRD/NIfTI/MHA, a Slicer volume): signed or float values
    whose low end is air (-1000 HU, or the -2000/-3024 padding outside the scan circle) and whose
    top is within the HU range of bone/metal."""
    a = np.asarray(a)
    if a.size == 0 or not (np.issubdtype(a.dtype, np.signedinteger) or np.issubdtype(a.dtype, np.floating)):
        return False
    sub = a.ravel()[:: max(1, a.size // 200_000)]
    sub = sub[np.isfinite(sub)] if np.issubdtype(sub.dtype, np.floating) else sub
    if sub.size == 0:
        return False
    lo, hi = np.percentile(sub, [1, 99.9])
    return bool(-3100 <= lo <= -500 and 0 <= hi <= 5000)


def guess_modality(a: np.ndarray, modality: str | None = None) -> str:
    """``modality`` upper-cased when it is informative, else "CT" for HU-looking data, else "OT".

    >>> guess_modality(np.array([[-1000, 40], [60, 1200]], np.int16))
    'CT'
    """
    mod = (modality or "").upper()
    if mod and mod != "OT":
        return mod
    return "CT" if looks_like_ct(a) else "OT"


@dataclass(frozen=True)
class Normalizer:
    """Linear map ``(a - lo) / (hi - lo)``; ``kind`` is "window" (CT, HU) or "percentile"."""

    kind: str
    lo: float
    hi: float

    def forward(self, a: np.ndarray) -> np.ndarray:
        """Original units -> normalised float32."""
        return ((np.asarray(a, dtype=np.float32) - np.float32(self.lo)) / np.float32(self.hi - self.lo)).astype(
            np.float32, copy=False
        )

    def inverse(self, a: np.ndarray) -> np.ndarray:
        """Normalised -> original units (float32)."""
        return (np.asarray(a, dtype=np.float32) * np.float32(self.hi - self.lo) + np.float32(self.lo)).astype(
            np.float32, copy=False
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_array(cls, a: np.ndarray, *, modality: str | None = None, policy: dict | None = None) -> Normalizer:
        """Choose the normaliser for ``a``: HU window for CT, percentiles otherwise.

        >>> Normalizer.for_array(np.zeros((4, 4)), modality="CT")
        Normalizer(kind='window', lo=-1024.0, hi=3071.0)
        """
        policy = {**DEFAULT_POLICY, **(policy or {})}
        if guess_modality(a, modality) == "CT":
            lo, hi = policy["ct_window"]
            return cls("window", float(lo), float(hi))
        arr = np.asarray(a)
        if arr.size == 0:
            raise InputError("cannot normalise an empty image")
        finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
        if finite.size == 0:
            raise InputError("image has no finite values (all NaN/inf)")
        # Subsample big volumes: percentiles of 1M voxels are as good as of 100M and far cheaper.
        flat = finite.ravel()
        if flat.size > 1_000_000:
            flat = flat[:: flat.size // 1_000_000]
        p_lo, p_hi = policy["percentiles"]
        lo, hi = np.percentile(flat, [p_lo, p_hi]).astype(float)
        if not hi > lo:  # flat image: keep a unit scale so the map stays invertible
            lo, hi = float(flat.min()), float(flat.min()) + 1.0
        return cls("percentile", float(lo), float(hi))


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float ``values`` to ``dtype``; integers are rounded and clipped to the type's range
    (never wrapped around: +40000 in int16 becomes 32767, not -25536)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return np.asarray(values).astype(dtype, copy=False)


def in_normalized_units(
    array: np.ndarray,
    fn,
    *,
    modality: str | None = None,
    policy: dict | None = None,
) -> np.ndarray:
    """Apply ``fn`` (which works in the normalised range) to ``array`` given in original units.

    Normalises with :meth:`Normalizer.for_array`, applies ``fn``, maps back and casts to the
    input's dtype. Used to simulate noise on a CT volume in HU:

    >>> from FPDenoiseLib.noise import add_noise
    >>> hu = np.zeros((4, 32, 32), np.int16)
    >>> noisy = in_normalized_units(hu, lambda x: add_noise(x, "gaussian", seed=0), modality="CT")
    >>> noisy.dtype
    dtype('int16')
    """
    norm = Normalizer.for_array(array, modality=modality, policy=policy)
    return cast_like(norm.inverse(fn(norm.forward(array))), np.asarray(array).dtype)
