"""Training data: clean 2D slices from folders and patch sampling.

Everything here works in the library's normalised range (see :mod:`FPDenoiseLib.intensity`):
CT slices are mapped with the fixed HU window, X-ray / MR / other images with their own
percentiles. Every random choice takes a seed so that a run can be reproduced (and resumed).
Procedural phantoms are in :mod:`FPDenoiseLib.phantoms`, the paper's dataset protocols in
:mod:`FPDenoiseLib.protocols`.

>>> from FPDenoiseLib.data import Slice, PatchSampler
>>> from FPDenoiseLib.phantoms import synthetic_ct_slice
>>> hu = synthetic_ct_slice("chest", size=128, seed=0)          # float32 HU
>>> s = Slice(array=(hu + 1024) / 4095, source="phantom", index=0, modality="CT")
>>> batch = next(iter(PatchSampler([s], patch_size=32, batch_size=4)))
>>> batch.shape
(4, 1, 32, 32)
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import InputError
from .intensity import Normalizer, guess_modality

# runtime alias: evaluated at import, so typing.Union (int | ... needs Python 3.10; Slicer 5.6/5.8 embed 3.9)
SeedLike = Union[int, np.random.Generator, None]  # noqa: UP007

__all__ = [
    "Slice",
    "load_clean_slices",
    "save_slice_pack",
    "load_slice_pack",
    "slices_from_image",
    "PatchSampler",
    "FixedPatchSet",
    "pad_to_min",
]

#: Slices whose normalised standard deviation is below this are "empty" (air only, blank).
MIN_STD = 1e-3


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _stable_seed(*parts: Any) -> int:
    """A seed derived from ``parts`` that is identical across runs and machines (no ``hash()``)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode())


# ----------------------------------------------------------------------------------------------
# Clean slices
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)  # arrays: identity, not elementwise ==
class Slice:
    """One clean 2D training image.

    ``array`` is ``(y, x)`` float32 in normalised units; ``source`` the file / series it came from,
    ``index`` the axial slice index in that volume (0 for 2D images), ``modality`` "CT", "MR",
    "XR" or "OT". ``normalizer`` maps back to original units; ``patient`` groups slices for a
    patient-level split (PatientID, else the folder name).
    """

    array: np.ndarray
    source: str
    index: int
    modality: str
    normalizer: Normalizer | None = None
    patient: str | None = None


def _to_gray_volume(arr: np.ndarray, path: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4 and a.shape[-1] in (3, 4):  # RGB(A) that slipped through: luminance
        a = a[..., :3].astype(np.float32).mean(axis=-1)
    if a.ndim != 3:
        raise InputError(f"{path}: expected a 2D image or 3D volume, got array of shape {a.shape}")
    return a


def slices_from_image(
    image: Any,
    *,
    max_slices: int | None = None,
    min_size: int = 32,
    seed: SeedLike = 0,
    policy: dict | None = None,
    modality: str | None = None,
    min_std: float = MIN_STD,
) -> list[Slice]:
    """Normalised, non-empty axial slices of one :class:`FPDenoiseLib.io.Image`.

    ``modality`` overrides ``image.modality``; images with modality "OT" whose values look like
    HU (air at about -1000) are treated as CT so NRRD/NIfTI CT gets the HU window.
    """
    source = str(image.source or "<array>")
    vol = _to_gray_volume(image.array, source)
    mod = guess_modality(vol, modality or image.modality)
    if min(vol.shape[1:]) < min_size:
        return []
    norm = Normalizer.for_array(vol, modality=mod, policy=policy)
    idx = np.arange(vol.shape[0])
    if max_slices is not None and len(idx) > max_slices:
        idx = np.sort(_rng(seed).choice(idx, size=max_slices, replace=False))
    patient = None
    for h in image.dicom_headers or []:
        patient = str(getattr(h, "PatientID", "") or "") or None
        break
    if patient is None:
        patient = Path(source).parent.name or source
    out = []
    for z in idx:
        sl = norm.forward(vol[int(z)])
        if not np.all(np.isfinite(sl)):
            sl = np.nan_to_num(sl, nan=0.0, posinf=0.0, neginf=0.0)
        if float(sl.std()) < min_std:
            continue
        out.append(Slice(np.ascontiguousarray(sl, dtype=np.float32), source, int(z), mod, norm, patient))
    return out


def load_clean_slices(
    paths_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    max_slices_per_volume: int | None = None,
    min_size: int = 32,
    seed: int = 0,
    policy: dict | None = None,
    modality: str | None = None,
    min_std: float = MIN_STD,
) -> list[Slice]:
    """Read every image below a folder (or the given files) and return its clean 2D slices.

    Volumes contribute their axial slices (at most ``max_slices_per_volume``, drawn with ``seed``
    reproducibly: the draw for one volume depends only on ``seed`` and its path). Slices smaller
    than ``min_size`` pixels on a side or nearly constant (normalised std < ``min_std``, e.g.
    air-only) are skipped. Unreadable files inside a folder are skipped with a warning; an
    explicitly named unreadable file raises. Normalisation: CT by the HU window, others by
    per-volume percentiles (``policy`` as in :class:`~FPDenoiseLib.intensity.Normalizer`).

    >>> slices = load_clean_slices("Resources/TrainingData", max_slices_per_volume=4)  # doctest: +SKIP
    >>> slices[0].array.dtype, slices[0].modality                                       # doctest: +SKIP
    (dtype('float32'), 'CT')
    """
    items = [paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike)) else list(paths_or_folder)
    if not items:
        raise InputError("no training data paths given")
    if any(not Path(it).name.endswith(PACK_SUFFIX) for it in items):
        from . import io as fio  # late: io imports heavy readers (a pack needs none)
    targets: list[tuple[Path, bool]] = []  # (path, explicitly named)
    for it in items:
        p = Path(it)
        if not p.exists():
            raise InputError(f"{p}: training data path does not exist")
        if p.name.endswith(PACK_SUFFIX):
            targets.append((p, True))
        elif p.is_dir():
            found = sorted(Path(f) for f in fio.find_images(p))
            targets += [(f, False) for f in found]
        else:
            targets.append((p, True))
    slices: list[Slice] = []
    skipped: list[str] = []
    for path, explicit in targets:
        if path.name.endswith(PACK_SUFFIX):
            slices += load_slice_pack(path)
            continue
        try:
            img = fio.read_image(path)
        except InputError as err:
            if explicit:
                raise
            skipped.append(str(path))
            warnings.warn(f"skipping unreadable training file: {err}", stacklevel=2)
            continue
        slices += slices_from_image(
            img,
            max_slices=max_slices_per_volume,
            min_size=min_size,
            seed=_stable_seed(seed, path.name, path.parent.name),
            policy=policy,
            modality=modality,
            min_std=min_std,
        )
    if not slices:
        where = ", ".join(str(i) for i in items)
        why = f" ({len(skipped)} unreadable)" if skipped else ""
        raise InputError(
            f"{where}: no usable training slices found{why} (need DICOM/NRRD/NIfTI/MHA/PNG/TIFF images "
            f">= {min_size} px that are not blank)"
        )
    return slices


# ----------------------------------------------------------------------------------------------
# Patch sampling
# ----------------------------------------------------------------------------------------------


def pad_to_min(a: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad a 2D array so both sides are at least ``size`` (repeats for tiny images)."""
    a = np.asarray(a)
    while a.shape[0] < size or a.shape[1] < size:
        py = min(max(0, size - a.shape[0]), max(a.shape[0] - 1, 0))
        px = min(max(0, size - a.shape[1]), max(a.shape[1] - 1, 0))
        if py == 0 and px == 0:  # 1-pixel side: reflection impossible, use edge
            a = np.pad(a, ((0, max(0, size - a.shape[0])), (0, max(0, size - a.shape[1]))), mode="edge")
            break
        a = np.pad(a, ((py // 2, py - py // 2), (px // 2, px - px // 2)), mode="reflect")
    return a


def _augment(p: np.ndarray, rot: int, flip: int) -> np.ndarray:
    if flip:
        p = p[:, ::-1]
    return np.rot90(p, int(rot)) if rot else p


def intensity_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    gamma: tuple[float, float] = (0.5, 2.0),
    invert_prob: float = 0.3,
    scale: tuple[float, float] = (0.7, 1.15),
) -> np.ndarray:
    """A clean image (normalised units, float32) under a random monotone change of contrast.

    Clean anatomy stays clean under any smooth change of its grey levels, but a noise estimator trained on a
    few patients' contrasts learns those contrasts: the shipped estimator read 5-10 % noise on clean T1 brains
    it had not seen (bright white matter at the top of the range), where the two training MRs are darker. This
    draws a gamma (log-uniform in ``gamma``) of the image over its 99.5th percentile, with ``invert_prob`` a
    reversed contrast inside the object (T1 versus T2: pixels above 5 % of the percentile, air stays dark),
    and a brightness ``scale``. Noise is added after it, so a noise map's target is unchanged in meaning.

    >>> rng = np.random.default_rng(0)
    >>> img = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    >>> out = intensity_augment(img, rng)
    >>> out.shape, out.dtype, bool(out.min() >= 0)
    ((8, 8), dtype('float32'), True)
    """
    c = np.clip(np.asarray(image, dtype=np.float32), 0, None)
    hi = max(float(np.percentile(c, 99.5)), 1e-3)
    u = np.clip(c / hi, 0, 1.5) ** float(np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1]))))
    if rng.random() < invert_prob:
        u = np.where(u > 0.05, np.clip(1.05 - u, 0, None), u)
    return (u * hi * rng.uniform(*scale)).astype(np.float32)


def _check_slices(slices: Sequence[Slice]) -> None:
    if len(slices) == 0:
        raise InputError("no training slices given to the patch sampler")


#: File-name ending of a slice pack (:func:`save_slice_pack`).
PACK_SUFFIX = ".slices.npz"


def save_slice_pack(slices: Sequence[Slice], path: str | os.PathLike, *, compression: str = "lzma") -> Path:
    """Write already-normalised slices to one compressed ``*.slices.npz`` (float16, order kept).

    A pack carries a training corpus to a machine that has no image readers (a GPU box without
    SimpleITK or pydicom): ``load_clean_slices([pack])`` returns the same slices in the same order,
    so ``build_bank`` cuts the same patches (values rounded to float16, about 1e-3 relative).
    ``compression``: "lzma" (default; the real corpus in 27.5 MB against 34.4 MB with "deflate", which
    is what lets it travel beside the repository under the device's 64 MiB) or "deflate" (for a
    Python built without ``lzma``). ``np.load`` reads either.

    >>> save_slice_pack(load_clean_slices("data/real/train", max_slices_per_volume=64), "corpus.slices.npz")  # doctest: +SKIP
    """
    import json

    from .io.atomic import atomic_path

    path = Path(path)
    if not path.name.endswith(PACK_SUFFIX):
        raise InputError(f"{path}: a slice pack's name must end in {PACK_SUFFIX}")
    if not slices:
        raise InputError("no slices to pack")
    methods = {"lzma": zipfile.ZIP_LZMA, "deflate": zipfile.ZIP_DEFLATED}
    if compression not in methods:
        raise InputError(f"compression must be one of {sorted(methods)}, got {compression!r}")
    meta = [{"source": s.source, "index": s.index, "modality": s.modality, "patient": s.patient} for s in slices]
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    arrays.update({f"s{i:05d}": np.asarray(s.array, dtype=np.float16) for i, s in enumerate(slices)})
    # an .npz is a zip of .npy files; np.savez_compressed knows only deflate, so the members are written here
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=methods[compression]) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr, allow_pickle=False)
    return path


def load_slice_pack(path: str | os.PathLike) -> list[Slice]:
    """Read a pack written by :func:`save_slice_pack` (float32 arrays, no normaliser)."""
    import json

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            return [Slice(z[f"s{i:05d}"].astype(np.float32), m["source"], int(m["index"]), m["modality"],
                          None, m.get("patient")) for i, m in enumerate(meta)]
    except (OSError, KeyError, ValueError, NotImplementedError, RuntimeError) as err:  # no lzma: NotImplementedError
        raise InputError(f"{path}: not a readable slice pack ({err})") from err


class PatchSampler:
    """Endless source of random training patches, ``(N, 1, P, P)`` float32 batches.

    Each patch comes from a uniformly chosen slice at a uniform position; with ``augment`` it is
    randomly flipped and rotated by multiples of 90 degrees. Slices smaller than the patch are
    reflect-padded. Deterministic for a given ``seed``; ``state_dict()`` / ``load_state_dict()``
    save and restore the RNG state and step count, so a resumed run draws the identical
    continuation.

    >>> s = Slice(np.random.default_rng(0).random((50, 70), dtype=np.float32), "x", 0, "OT")
    >>> sampler = PatchSampler([s], patch_size=32, batch_size=2, seed=1)
    >>> batch, info = sampler.sample_with_index()
    >>> batch.shape, sorted(info)
    ((2, 1, 32, 32), ['flip', 'rot', 'slice', 'x', 'y'])
    """

    def __init__(
        self,
        slices: Sequence[Slice],
        *,
        patch_size: int = 64,
        batch_size: int = 8,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        _check_slices(slices)
        if patch_size < 1 or batch_size < 1:
            raise InputError(f"patch_size and batch_size must be positive (got {patch_size}, {batch_size})")
        self.patch_size = int(patch_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.slices = list(slices)
        self._arrays = [
            pad_to_min(np.asarray(s.array, dtype=np.float32), self.patch_size) for s in self.slices
        ]
        self._rng = np.random.default_rng(self.seed)
        self.step = 0

    def __len__(self) -> int:
        return len(self._arrays)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.sample()

    def sample(self) -> np.ndarray:
        """Next batch ``(N, 1, P, P)`` float32."""
        return self.sample_with_index()[0]

    def sample_with_index(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Next batch and what was drawn: int arrays ``slice``, ``y``, ``x``, ``rot``, ``flip``
        (length N), enough to re-extract the same patches with :meth:`extract`."""
        n, p, rng = self.batch_size, self.patch_size, self._rng
        sid = rng.integers(0, len(self._arrays), size=n)
        ys = np.empty(n, dtype=np.int64)
        xs = np.empty(n, dtype=np.int64)
        for i, s in enumerate(sid):
            h, w = self._arrays[s].shape
            ys[i] = rng.integers(0, h - p + 1)
            xs[i] = rng.integers(0, w - p + 1)
        if self.augment:
            rot = rng.integers(0, 4, size=n)
            flip = rng.integers(0, 2, size=n)
        else:
            rot = np.zeros(n, dtype=np.int64)
            flip = np.zeros(n, dtype=np.int64)
        info = {
            "slice": sid.astype(np.int64),
            "y": ys,
            "x": xs,
            "rot": rot.astype(np.int64),
            "flip": flip.astype(np.int64),
        }
        self.step += 1
        return self.extract(info), info

    def extract(self, info: dict[str, np.ndarray]) -> np.ndarray:
        """Patches for an index dict as returned by :meth:`sample_with_index`."""
        p = self.patch_size
        out = np.empty((len(info["slice"]), 1, p, p), dtype=np.float32)
        for i in range(len(out)):
            a = self._arrays[int(info["slice"][i])]
            y, x = int(info["y"][i]), int(info["x"][i])
            out[i, 0] = _augment(a[y : y + p, x : x + p], int(info["rot"][i]), int(info["flip"][i]))
        return out

    def state_dict(self) -> dict:
        """JSON/torch-serialisable state: RNG state + step (+ settings, checked on load)."""
        return {
            "rng": self._rng.bit_generator.state,
            "step": self.step,
            "seed": self.seed,
            "patch_size": self.patch_size,
            "batch_size": self.batch_size,
            "augment": self.augment,
            "n_slices": len(self._arrays),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; raises InputError if it was made for other data/settings."""
        for k in ("patch_size", "batch_size", "n_slices"):
            mine = len(self._arrays) if k == "n_slices" else getattr(self, k)
            if k in state and int(state[k]) != mine:
                raise InputError(f"sampler state does not match: {k}={state[k]} in state, {mine} now")
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        self._rng = rng
        self.step = int(state.get("step", 0))


class FixedPatchSet:
    """A fixed bank of clean patches, extracted once, for per-patch caches.

    The FP loss needs GB(clean) of the frozen restoration net for every training patch; it never
    changes, so the training loop computes it once per bank entry and indexes it with the
    ``indices`` returned by :meth:`batches` / :meth:`sample`. Random flips / 90-degree rotations
    are applied ONCE at extraction (baked into :attr:`patches`, recorded in :attr:`info`), never
    on the fly: GB of a flipped patch is only approximately the flipped GB, so on-the-fly
    augmentation would mismatch the cache. Make the bank large instead.
    Near-blank patches (std < ``min_std``) are redrawn (up to 20 tries each).

    >>> s = Slice(np.random.default_rng(0).random((64, 64), dtype=np.float32), "x", 0, "OT")
    >>> bank = FixedPatchSet([s], n_patches=10, patch_size=16, seed=0)
    >>> idx, patches = next(bank.batches(4, rng=0))
    >>> patches.shape, bool(np.array_equal(patches, bank.patches[idx]))
    ((4, 1, 16, 16), True)
    """

    def __init__(
        self,
        slices: Sequence[Slice],
        n_patches: int,
        patch_size: int = 64,
        seed: int = 0,
        *,
        augment: bool = True,
        min_std: float = MIN_STD,
    ) -> None:
        _check_slices(slices)
        if n_patches < 1:
            raise InputError(f"n_patches must be positive (got {n_patches})")
        sampler = PatchSampler(slices, patch_size=patch_size, batch_size=1, seed=seed, augment=augment)
        self.patch_size = int(patch_size)
        self.seed = int(seed)
        patches = np.empty((n_patches, 1, patch_size, patch_size), dtype=np.float32)
        infos: dict[str, list[int]] = {k: [] for k in ("slice", "y", "x", "rot", "flip")}
        for i in range(n_patches):
            for _ in range(20):
                batch, info = sampler.sample_with_index()
                if float(batch.std()) >= min_std:
                    break
            patches[i] = batch[0]
            for k in infos:
                infos[k].append(int(info[k][0]))
        self.patches = patches
        self.info = {k: np.asarray(v, dtype=np.int64) for k, v in infos.items()}
        self.sources = [(s.source, s.index) for s in slices]

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self.patches[idx]

    def sample(self, batch_size: int, rng: SeedLike) -> tuple[np.ndarray, np.ndarray]:
        """One random batch (without replacement inside the batch): ``(indices, patches)``."""
        r = _rng(rng)
        idx = np.sort(r.choice(len(self), size=min(batch_size, len(self)), replace=False))
        return idx, self.patches[idx]

    def batches(self, batch_size: int, rng: SeedLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch in shuffled order: yields ``(indices, patches)``; the last batch may be short."""
        order = _rng(rng).permutation(len(self))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield idx, self.patches[idx]


# The phantoms and the dataset protocols live in their own modules; these names stay importable from
# here for code written against the old layout.
_MOVED = {
    "synthetic_ct_slice": "phantoms", "synthetic_ct_volume": "phantoms", "synthetic_xray": "phantoms",
    "split_by_patient": "protocols", "paper_protocol_slices": "protocols",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
