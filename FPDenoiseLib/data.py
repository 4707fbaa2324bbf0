"""Training data: clean 2D slices from folders, patch sampling, the paper's dataset protocol, and
procedural CT / X-ray phantoms.

Everything here works in the library's normalised range (see :mod:`FPDenoiseLib.intensity`):
CT slices are mapped with the fixed HU window, X-ray / MR / other images with their own
percentiles. Every random choice takes a seed so that a run can be reproduced (and resumed).

>>> from FPDenoiseLib.data import synthetic_ct_slice, Slice, PatchSampler
>>> hu = synthetic_ct_slice("chest", size=128, seed=0)          # float32 HU
>>> s = Slice(array=(hu + 1024) / 4095, source="phantom", index=0, modality="CT")
>>> batch = next(iter(PatchSampler([s], patch_size=32, batch_size=4)))
>>> batch.shape
(4, 1, 32, 32)
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from scipy import ndimage

from .errors import InputError
from .intensity import Normalizer, guess_modality

# runtime alias: evaluated at import, so typing.Union (int | ... needs Python 3.10; Slicer 5.6/5.8 embed 3.9)
SeedLike = Union[int, np.random.Generator, None]  # noqa: UP007

__all__ = [
    "Slice",
    "load_clean_slices",
    "slices_from_image",
    "PatchSampler",
    "FixedPatchSet",
    "split_by_patient",
    "paper_protocol_slices",
    "synthetic_ct_slice",
    "synthetic_ct_volume",
    "synthetic_xray",
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
    from . import io as fio  # late: io imports heavy readers

    items = [paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike)) else list(paths_or_folder)
    if not items:
        raise InputError("no training data paths given")
    targets: list[tuple[Path, bool]] = []  # (path, explicitly named)
    for it in items:
        p = Path(it)
        if not p.exists():
            raise InputError(f"{p}: training data path does not exist")
        if p.is_dir():
            found = sorted(Path(f) for f in fio.find_images(p))
            targets += [(f, False) for f in found]
        else:
            targets.append((p, True))
    slices: list[Slice] = []
    skipped: list[str] = []
    for path, explicit in targets:
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


def _check_slices(slices: Sequence[Slice]) -> None:
    if len(slices) == 0:
        raise InputError("no training slices given to the patch sampler")


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


# ----------------------------------------------------------------------------------------------
# Paper protocol (issue 4): patient-level split of LIDC-IDRI / RSNA Pneumonia / LiTS
# ----------------------------------------------------------------------------------------------


def split_by_patient(
    items: Sequence[Any],
    key: Callable[[Any], Hashable],
    test_fraction: float,
    seed: SeedLike = 0,
) -> tuple[list[Any], list[Any]]:
    """Split ``items`` into ``(train, test)`` so that no patient (``key(item)``) is in both.

    Patients are shuffled with ``seed`` and assigned to test until the test set holds at least
    ``test_fraction`` of the items; both sides are non-empty whenever there are two or more
    patients and ``0 < test_fraction < 1``. Item order inside each side is kept.

    >>> tr, te = split_by_patient(list(range(10)), key=lambda i: i // 2, test_fraction=0.2, seed=0)
    >>> len(te), {i // 2 for i in tr} & {i // 2 for i in te}
    (2, set())
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise InputError(f"test_fraction must be in [0, 1] (got {test_fraction})")
    groups: dict[Hashable, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    patients = sorted(groups, key=str)
    if 0.0 < test_fraction < 1.0 and len(patients) < 2:
        raise InputError(f"cannot split by patient: only {len(patients)} patient(s) found")
    order = _rng(seed).permutation(len(patients))
    target = test_fraction * len(items)
    test_pat: set = set()
    n_test = 0
    for j in order:
        if n_test >= target or (test_fraction < 1.0 and len(test_pat) == len(patients) - 1):
            break
        if test_fraction <= 0.0:
            break
        test_pat.add(patients[j])
        n_test += len(groups[patients[j]])
    train = [it for it in items if key(it) not in test_pat]
    test = [it for it in items if key(it) in test_pat]
    return train, test


def _dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".dcm", ""))


def _lidc_candidates(root: Path) -> list[tuple[str, Path, int]]:
    """(patient, file, 0) for every CT DICOM file of LIDC-IDRI-*/<study>/<series>/*.dcm."""
    import pydicom

    out = []
    patients = sorted(p for p in root.iterdir() if p.is_dir() and p.name.upper().startswith("LIDC-IDRI"))
    if not patients:
        raise InputError(f"{root}: no LIDC-IDRI-XXXX patient folders found (LIDC layout)")
    for pat in patients:
        for series in sorted({f.parent for f in pat.rglob("*.dcm")}):
            files = _dcm_files(series)
            if not files:
                continue
            try:  # LIDC also holds CR/DX radiograph series: keep CT only (one header per series)
                mod = pydicom.dcmread(files[0], stop_before_pixels=True).get("Modality", "")
            except Exception:  # noqa: BLE001 - unreadable header: not a usable series
                continue
            if str(mod).upper() == "CT":
                out += [(pat.name, f, 0) for f in files if f.suffix.lower() == ".dcm"]
    return out


def _rsna_candidates(root: Path) -> list[tuple[str, Path, int]]:
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        raise InputError(f"{root}: no <patientId>.dcm files found (RSNA Pneumonia layout)")
    return [(f.stem, f, 0) for f in files]


def _lits_candidates(root: Path) -> list[tuple[str, Path, int]]:
    import SimpleITK as sitk

    vols = sorted(
        (p for p in root.rglob("volume-*") if p.name.endswith((".nii", ".nii.gz"))),
        key=lambda p: (len(p.name), p.name),
    )
    if not vols:
        raise InputError(f"{root}: no volume-N.nii files found (LiTS layout)")
    out = []
    for v in vols:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(v))
        try:
            reader.ReadImageInformation()  # header only: slice count without loading voxels
        except RuntimeError as err:
            raise InputError(f"{v}: cannot read NIfTI header ({str(err).strip().splitlines()[-1]})") from None
        nz = reader.GetSize()[2] if reader.GetDimension() >= 3 else 1
        pid = v.name.split(".")[0].split("-", 1)[1]
        out += [(pid, v, z) for z in range(nz)]
    return out


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    if a.shape == (size, size):
        return a.astype(np.float32)
    return resize(
        a.astype(np.float32), (size, size), order=1, anti_aliasing=True, preserve_range=True
    ).astype(np.float32)


def paper_protocol_slices(
    dataset_dir: str | os.PathLike,
    layout: str,
    n_train: int = 5000,
    n_test: int = 500,
    size: int = 256,
    seed: int = 0,
    *,
    policy: dict | None = None,
    min_std: float = MIN_STD,
) -> tuple[list[Slice], list[Slice]]:
    """The paper's data protocol: ``n_train`` / ``n_test`` random 2D slices, ``size`` x ``size``,
    from a dataset in its distributed layout, split by patient (no patient in both).

    Layouts: ``"lidc"`` (LIDC-IDRI: ``LIDC-IDRI-XXXX/<study>/<series>/*.dcm``, CT series only),
    ``"rsna"`` (RSNA Pneumonia: flat folder of ``<patientId>.dcm`` CR radiographs), ``"lits"``
    (LiTS: ``volume-N.nii`` [+ ``segmentation-N.nii``, ignored]). Patients are split with
    ``test_fraction = n_test / (n_train + n_test)``; slices are then drawn without replacement
    inside each side (fewer are returned, with a warning, if a side has fewer usable slices).
    Only the drawn slices are read (LiTS: each drawn volume once). Blank slices are redrawn.

    >>> train, test = paper_protocol_slices("/data/LIDC-IDRI", "lidc", seed=0)  # doctest: +SKIP
    """
    from . import io as fio

    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder does not exist")
    finders = {"lidc": _lidc_candidates, "rsna": _rsna_candidates, "lits": _lits_candidates}
    if layout not in finders:
        raise InputError(f"unknown dataset layout {layout!r} (choose from {', '.join(finders)})")
    cands = finders[layout](root)
    if not cands:
        raise InputError(f"{root}: no usable images found for layout {layout!r}")
    frac = n_test / float(n_train + n_test) if (n_train + n_test) > 0 else 0.0
    rng = np.random.default_rng(seed)
    train_c, test_c = split_by_patient(cands, key=lambda c: c[0], test_fraction=frac, seed=rng)
    cache: dict[Path, Any] = {}

    def draw(pool: list, order: Sequence[int], n: int, name: str) -> list[Slice]:
        out: list[Slice] = []
        for j in order:
            if len(out) >= n:
                break
            pid, path, z = pool[int(j)]
            if layout == "lits":
                if path not in cache:
                    cache.clear()  # one volume in memory at a time; draws arrive grouped by volume
                    cache[path] = fio.read_image(path)
                img = cache[path]
                mod = "CT"
            else:
                try:
                    img = fio.read_image(path)
                except InputError as err:
                    warnings.warn(f"skipping unreadable file: {err}", stacklevel=3)
                    continue
                mod = "CT" if layout == "lidc" else "XR"
            vol = _to_gray_volume(img.array, str(path))
            a = _resize(vol[min(z, vol.shape[0] - 1)].astype(np.float32), size)
            norm = Normalizer.for_array(a, modality=mod, policy=policy)
            arr = norm.forward(a)
            if float(arr.std()) < min_std:
                continue
            out.append(Slice(arr, str(path), int(z), mod, norm, pid))
        if len(out) < n:
            warnings.warn(f"{root}: only {len(out)} usable {name} slices (asked for {n})", stacklevel=3)
        return out

    result = []
    for pool, n, name in ((train_c, n_train, "train"), (test_c, n_test, "test")):
        order = rng.permutation(len(pool))
        if layout == "lits":
            # Read each volume once: take the random draw (+ spare for blank slices), visit it
            # grouped by volume, then shuffle the result.
            take = order[: min(len(pool), int(n * 1.2) + 8)]
            take = sorted(take, key=lambda j: (str(pool[j][1]), pool[j][2]))
            got = draw(pool, take, n, name)
            got = [got[int(i)] for i in rng.permutation(len(got))]
        else:
            got = draw(pool, order, n, name)
        result.append(got)
    return result[0], result[1]


# ----------------------------------------------------------------------------------------------
# Procedural phantoms (redistributable training data; no download)
# ----------------------------------------------------------------------------------------------


def _field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian random field, zero mean, unit std, correlation length ~``sigma`` px."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


class _Canvas:
    """Normalised coordinates: x, y in [-1, 1] (y grows downward = posterior / inferior)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.n = size
        self.rng = rng
        c = (np.arange(size) + 0.5) / size * 2 - 1
        self.y, self.x = np.meshgrid(c, c, indexing="ij")
        self.px = 2.0 / size  # one pixel in normalised units
        self._warp = _field((size, size), size / 24, rng)

    def ellipse(
        self, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0, warp: float = 0.0
    ) -> np.ndarray:
        """Boolean ellipse whose boundary is perturbed by a smooth field (``warp`` ~ relative)."""
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u, v = (ca * dx + sa * dy) / rx, (-sa * dx + ca * dy) / ry
        r = u * u + v * v
        if warp:
            r = r * (1 + warp * self._warp)
        return r < 1.0

    def dist(self, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> np.ndarray:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u, v = (ca * dx + sa * dy) / rx, (-sa * dx + ca * dy) / ry
        return np.sqrt(u * u + v * v)

    def tree(
        self, mask: np.ndarray, roots: list[tuple[float, float]], n_branches: int, width_px: float
    ) -> np.ndarray:
        """Soft map (0..1) of random branching vessels that start at ``roots`` and stay in ``mask``."""
        from skimage.draw import line

        rng, n = self.rng, self.n
        out = np.zeros((n, n), dtype=np.float32)
        for _ in range(n_branches):
            ry, rx = roots[int(rng.integers(len(roots)))]
            y, x = (ry + 1) / 2 * n, (rx + 1) / 2 * n
            ang = rng.uniform(0, 2 * math.pi)
            w = width_px * rng.uniform(0.6, 1.3)
            for _step in range(int(rng.integers(6, 16))):
                ang += rng.normal(0, 0.35)
                length = rng.uniform(0.02, 0.06) * n
                y2, x2 = y + length * math.sin(ang), x + length * math.cos(ang)
                if not (0 <= y2 < n and 0 <= x2 < n) or not mask[int(y2), int(x2)]:
                    ang += math.pi / 2
                    continue
                seg = np.zeros((n, n), dtype=bool)
                rr, cc = line(int(y), int(x), int(y2), int(x2))
                seg[rr, cc] = True
                rad = max(w / 2, 0.5)
                d = ndimage.distance_transform_edt(~seg)
                out = np.maximum(out, np.clip(rad + 0.5 - d, 0, 1))
                y, x, w = y2, x2, w * 0.9
        return out * mask


def _bone(cv: _Canvas, m: np.ndarray, cortex_px: float, rng: np.random.Generator, hu: np.ndarray) -> None:
    """Cortical shell (1000-1800 HU) around trabecular interior (~300 HU with texture)."""
    inner = ndimage.binary_erosion(m, iterations=max(1, int(round(cortex_px))))
    tex = _field(m.shape, 1.2, rng)
    hu[m] = rng.uniform(1000, 1800) + 120 * tex[m]
    hu[inner] = rng.uniform(220, 380) + 60 * tex[inner]


def _lung_texture(cv: _Canvas, lung: np.ndarray, hu: np.ndarray, rng: np.random.Generator) -> None:
    n = cv.n
    hu[lung] = -850 + 45 * _field((n, n), 1.5, rng)[lung] + 25 * _field((n, n), n / 20, rng)[lung]


def synthetic_ct_slice(kind: str = "chest", size: int = 256, seed: SeedLike = None) -> np.ndarray:
    """A procedural axial CT slice in HU, ``(size, size)`` float32.

    ``kind`` is "head", "chest" or "abdomen". Tissues have realistic densities (air -1000, lung
    -850 +- 60 with vessels and bronchi, fat -100, muscle / soft tissue ~40, liver ~60, contrast
    vessels 150-300, cortical bone 1000-1800 around ~300 HU trabecular bone, brain GM / WM 40 / 25,
    CSF 5), smooth random organ shapes, fine tissue texture, sharp boundaries and small
    high-contrast details (vessels, nodules, calcifications), blurred by a ~0.6 px PSF.
    Layout varies with ``seed``; it is an anatomical caricature, not an atlas.

    >>> hu = synthetic_ct_slice("chest", size=128, seed=0)
    >>> hu.dtype, bool(hu.min() < -900), bool(hu.max() > 700)
    (dtype('float32'), True, True)
    """
    kinds = {"head": _ct_head, "chest": _ct_chest, "abdomen": _ct_abdomen}
    if kind not in kinds:
        raise InputError(f"unknown phantom kind {kind!r} (choose from {', '.join(kinds)})")
    if size < 32:
        raise InputError(f"phantom size must be >= 32 (got {size})")
    rng = _rng(seed)
    cv = _Canvas(int(size), rng)
    hu = kinds[kind](cv, rng)
    hu = ndimage.gaussian_filter(hu, 0.6)  # scanner PSF: partial-volume edges, still sharp
    return np.clip(hu, -1024, 3071).astype(np.float32)


def _soft(cv: _Canvas, rng: np.random.Generator, mean: float, amp: float = 8.0) -> np.ndarray:
    n = cv.n
    return mean + amp * (0.7 * _field((n, n), 1.3, rng) + 0.7 * _field((n, n), n / 30, rng))


def _body_common(cv: _Canvas, rng: np.random.Generator, ry: float, rx: float, fat_frac: float):
    n = cv.n
    hu = np.full((n, n), -1000.0) + 3 * rng.standard_normal((n, n))  # air (with a trace of texture)
    cy = rng.uniform(-0.04, 0.04)
    body = cv.ellipse(cy, 0.0, ry, rx, rng.uniform(-0.05, 0.05), warp=0.04)
    fat = _soft(cv, rng, -100, 10)
    hu[body] = fat[body]
    muscle = cv.ellipse(cy, 0.0, ry * (1 - fat_frac), rx * (1 - fat_frac), 0, warp=0.05)
    hu[muscle] = _soft(cv, rng, 45, 8)[muscle]
    # skin: thin dense rim
    skin = body & ~ndimage.binary_erosion(body, iterations=max(1, n // 200))
    hu[skin] = 30
    # patient table below the body
    ty = cy + ry + 0.06
    table = (np.abs(cv.y - (ty + 0.04 * cv.x**2)) < 0.012) & (np.abs(cv.x) < 0.9)
    hu[table] = 250
    return hu, body, muscle, cy


def _ct_chest(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    ry, rx = rng.uniform(0.5, 0.62), rng.uniform(0.8, 0.92)
    hu, body, muscle, cy = _body_common(cv, rng, ry, rx, rng.uniform(0.06, 0.14))
    inner_ry, inner_rx = ry * 0.78, rx * 0.8
    # lungs
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lung = cv.ellipse(
            cy - 0.02,
            side * inner_rx * 0.5,
            inner_ry * rng.uniform(0.85, 0.95),
            inner_rx * rng.uniform(0.4, 0.47),
            side * rng.uniform(0.0, 0.2),
            warp=0.08,
        )
        lungs |= lung
    med = cv.ellipse(cy + 0.02, rng.uniform(-0.05, 0.05), inner_ry * 0.75, inner_rx * 0.22, 0, warp=0.05)
    spine_c = (cy + ry * 0.72, 0.0)
    spine_zone = cv.ellipse(spine_c[0], 0.0, 0.16, 0.14)
    lungs &= ~med & ~spine_zone & muscle
    _lung_texture(cv, lungs, hu, rng)
    # pulmonary vessels (soft tissue density) and bronchi
    hila = [(cy, -0.12), (cy, 0.12)]
    ves = cv.tree(lungs, hila, 12, max(1.0, cv.n / 110))
    hu = hu * (1 - ves) + (40 + 20 * rng.random()) * ves
    for _ in range(int(rng.integers(3, 7))):  # bronchi: air lumen with a soft-tissue wall
        ys, xs = np.nonzero(lungs)
        k = int(rng.integers(len(ys)))
        r = rng.uniform(1.5, 4.0) * cv.px
        d = cv.dist(cv.y[ys[k], xs[k]], cv.x[ys[k], xs[k]], r, r * rng.uniform(0.7, 1.3))
        hu[(d < 1.6) & (d >= 1.0) & lungs] = 20
        hu[(d < 1.0) & lungs] = -960
    for _ in range(int(rng.integers(0, 3))):  # nodules
        ys, xs = np.nonzero(lungs)
        k = int(rng.integers(len(ys)))
        r = rng.uniform(2, 7) * cv.px
        nod = cv.ellipse(cv.y[ys[k], xs[k]], cv.x[ys[k], xs[k]], r, r * rng.uniform(0.8, 1.2), warp=0.2)
        hu[nod] = rng.uniform(20, 60)
    # mediastinum: heart with contrast-filled chambers, aorta, fat
    hu[med] = _soft(cv, rng, -90, 10)[med]
    hcx = rng.uniform(0.02, 0.12)
    heart = cv.ellipse(cy + 0.05, hcx, inner_ry * 0.45, inner_rx * 0.3, rng.uniform(-0.5, -0.2), warp=0.04)
    hu[heart & muscle] = _soft(cv, rng, 45, 6)[heart & muscle]
    contrast = rng.uniform(150, 300)
    for _ in range(2):
        ch = (
            cv.ellipse(
                cy + 0.05 + rng.uniform(-0.06, 0.06),
                hcx + rng.uniform(-0.08, 0.08),
                inner_ry * 0.15,
                inner_rx * 0.1,
                rng.uniform(0, 3),
                warp=0.1,
            )
            & heart
        )
        hu[ch] = contrast + 8 * _field(ch.shape, 2, rng)[ch]
    for ay, ax, r in ((cy - inner_ry * 0.35, -0.02, 0.06), (spine_c[0] - 0.17, 0.07, 0.05)):
        ao = cv.ellipse(ay, ax, r * 0.95, r) & muscle
        hu[ao] = contrast + 10 * rng.standard_normal()
        wall = ao & ~ndimage.binary_erosion(ao, iterations=1)
        hu[wall & (rng.random() < 0.3)] = 600  # occasional calcified wall
    # spine: vertebral body + canal + posterior elements
    vb = cv.ellipse(spine_c[0], 0.0, 0.09, 0.1, 0, warp=0.03)
    _bone(cv, vb, max(1, cv.n / 128), rng, hu)
    canal = cv.ellipse(spine_c[0] + 0.14, 0.0, 0.045, 0.04)
    post = cv.ellipse(spine_c[0] + 0.15, 0.0, 0.1, 0.13) & ~canal & ~vb & body
    _bone(cv, post & ~cv.ellipse(spine_c[0] + 0.15, 0.0, 0.06, 0.09), 1, rng, hu)
    hu[canal] = 20
    # ribs around the chest wall, sternum in front
    for ang in np.linspace(0.25, math.pi - 0.25, int(rng.integers(8, 12))):
        for side in (-1, 1):
            a = ang + rng.normal(0, 0.05)  # angle from anterior midline
            py = cy - ry * 0.86 * math.cos(a)
            px = side * rx * 0.86 * math.sin(a)
            rib = cv.ellipse(py, px, 0.028, 0.045, a * side, warp=0.05)
            _bone(cv, rib, 1, rng, hu)
    st = cv.ellipse(cy - ry * 0.9, 0.0, 0.035, 0.08, 0, warp=0.05)
    _bone(cv, st, 1, rng, hu)
    return hu


def _ct_abdomen(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    ry, rx = rng.uniform(0.55, 0.68), rng.uniform(0.78, 0.92)
    hu, body, muscle, cy = _body_common(cv, rng, ry, rx, rng.uniform(0.08, 0.2))
    iry, irx = ry * 0.82, rx * 0.82
    cavity = cv.ellipse(cy - 0.02, 0.0, iry, irx, 0, warp=0.05)
    hu[cavity] = _soft(cv, rng, -95, 12)[cavity]  # visceral fat between organs
    contrast = rng.uniform(150, 260)
    # liver (image left = patient right) with enhancing vessels, occasional lesion
    liver = (
        cv.ellipse(cy - 0.1, -irx * 0.45, iry * 0.75, irx * 0.5, rng.uniform(-0.3, 0.2), warp=0.12) & cavity
    )
    hu[liver] = _soft(cv, rng, rng.uniform(55, 70), 6)[liver]
    lv = cv.tree(liver, [(cy - 0.05, -irx * 0.25)], 8, max(1.0, cv.n / 90))
    hu = hu * (1 - lv) + (contrast * 0.8) * lv
    if rng.random() < 0.6:
        ys, xs = np.nonzero(liver)
        k = int(rng.integers(len(ys)))
        les = cv.ellipse(cv.y[ys[k], xs[k]], cv.x[ys[k], xs[k]], 0.05, 0.06, 0, warp=0.2) & liver
        hu[les] = rng.uniform(10, 35)
    spleen = cv.ellipse(cy + 0.05, irx * 0.6, iry * 0.35, irx * 0.22, 0.6, warp=0.1) & cavity
    hu[spleen] = _soft(cv, rng, 50, 6)[spleen]
    # spine, psoas, aorta, IVC, kidneys
    sy = cy + iry * 0.62
    for side in (-1, 1):
        ps = cv.ellipse(sy + 0.02, side * 0.2, 0.09, 0.07, side * 0.3, warp=0.05) & cavity
        hu[ps] = _soft(cv, rng, 50, 6)[ps]
        kid = cv.ellipse(sy - 0.08, side * 0.38, 0.13, 0.08, side * -0.4, warp=0.06) & cavity & ~liver
        hu[kid] = contrast * 0.9 + 8 * _field(kid.shape, 2, rng)[kid]
        med = cv.ellipse(sy - 0.08, side * 0.38, 0.07, 0.035, side * -0.4, warp=0.2) & kid
        hu[med] = contrast * 0.55
    ao = cv.ellipse(sy - 0.18, 0.06, 0.045, 0.045)
    hu[ao] = contrast + 10 * rng.standard_normal()
    ivc = cv.ellipse(sy - 0.17, -0.12, 0.04, 0.06, 0, warp=0.05)
    hu[ivc] = contrast * 0.7
    vb = cv.ellipse(sy, 0.0, 0.1, 0.11, 0, warp=0.03)
    _bone(cv, vb, max(1, cv.n / 128), rng, hu)
    canal = cv.ellipse(sy + 0.15, 0.0, 0.05, 0.045)
    post = cv.ellipse(sy + 0.16, 0.0, 0.1, 0.14) & ~canal & ~vb & body
    _bone(cv, post & ~cv.ellipse(sy + 0.17, 0.0, 0.06, 0.1), 1, rng, hu)
    hu[canal] = 20
    # bowel loops: soft wall, fluid or gas content (some with air-fluid level)
    free = cavity & ~liver & ~spleen & ~cv.ellipse(sy, 0, 0.25, 0.5)
    for _ in range(int(rng.integers(6, 12))):
        ys, xs = np.nonzero(free)
        if len(ys) == 0:
            break
        k = int(rng.integers(len(ys)))
        r = rng.uniform(0.03, 0.08)
        by, bx = cv.y[ys[k], xs[k]], cv.x[ys[k], xs[k]]
        loop = cv.ellipse(by, bx, r, r * rng.uniform(0.7, 1.4), rng.uniform(0, 3), warp=0.1) & free
        lumen = ndimage.binary_erosion(loop, iterations=max(1, cv.n // 128))
        hu[loop] = 40
        kind = rng.random()
        if kind < 0.35:
            hu[lumen] = -1000 + 10 * rng.standard_normal()
        elif kind < 0.6:
            hu[lumen] = 10
            hu[lumen & (cv.y < by)] = -1000  # air-fluid level
        else:
            hu[lumen] = rng.uniform(10, 40) + 6 * _field(loop.shape, 2, rng)[lumen]
        free &= ~loop
    # lower ribs laterally
    for side in (-1, 1):
        for a in rng.uniform(0.6, 1.4, size=2):
            rib = cv.ellipse(
                cy + math.cos(a) * ry * 0.85 * 0.3,
                side * rx * 0.87 * math.sin(a),
                0.03,
                0.05,
                side * a,
                warp=0.05,
            )
            _bone(cv, rib & body, 1, rng, hu)
    return hu


def _ct_head(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    n = cv.n
    hu = np.full((n, n), -1000.0) + 3 * rng.standard_normal((n, n))
    ry, rx = rng.uniform(0.78, 0.9), rng.uniform(0.62, 0.74)
    cy = rng.uniform(-0.03, 0.03)
    scalp = cv.ellipse(cy, 0, ry, rx, rng.uniform(-0.06, 0.06), warp=0.02)
    hu[scalp] = _soft(cv, rng, 30, 10)[scalp]
    t = rng.uniform(0.05, 0.08)
    skull = cv.ellipse(cy, 0, ry - 0.04, rx - 0.04, 0, warp=0.02)
    _bone(cv, skull, max(1, n / 170), rng, hu)
    # diploe of the skull: brighter than trabecular bone elsewhere
    brain = cv.ellipse(cy, 0, ry - 0.04 - t, rx - 0.04 - t, 0, warp=0.02)
    dip = skull & ~brain & ndimage.binary_erosion(skull & ~brain, iterations=max(1, n // 170))
    hu[dip] = rng.uniform(450, 750) + 80 * _field((n, n), 1.5, rng)[dip]
    # CSF rim, then GM ribbon folded by a thresholded random field (gyri), WM core
    hu[brain] = 5
    inner = ndimage.binary_erosion(brain, iterations=max(1, n // 110))
    gyri = _field((n, n), n / 40, rng)
    dist_in = ndimage.distance_transform_edt(inner) / n
    wm = inner & (dist_in + 0.02 * gyri > rng.uniform(0.045, 0.065))
    sulci = inner & ~wm & (_field((n, n), n / 60, rng) > 1.2)
    hu[inner] = _soft(cv, rng, 40, 3)[inner]
    hu[wm] = _soft(cv, rng, 26, 2.5)[wm]
    hu[sulci] = 6
    # deep grey nuclei, ventricles, falx, occasional calcification
    for side in (-1, 1):
        bg = cv.ellipse(cy + 0.05, side * 0.16, 0.1, 0.05, side * 0.3, warp=0.1) & wm
        hu[bg] = 38
        vent = cv.ellipse(
            cy - 0.05 + rng.uniform(-0.05, 0.05), side * 0.07, 0.2, 0.045, side * -0.15, warp=0.15
        )
        hu[vent & inner] = 5 + 2 * rng.standard_normal()
        if rng.random() < 0.7:  # choroid plexus calcification
            cal = cv.ellipse(cy + 0.08, side * 0.09, 0.015, 0.012)
            hu[cal & inner] = rng.uniform(120, 300)
    falx = (np.abs(cv.x - 0.004 * cv.y) < 0.6 * cv.px + 0.003) & inner & (np.abs(cv.y - cy) > 0.25)
    hu[falx] = 60
    return hu


def synthetic_ct_volume(
    kind: str = "chest", n_slices: int = 8, size: int = 256, seed: SeedLike = None
) -> np.ndarray:
    """A ``(z, y, x)`` float32 HU volume of one phantom anatomy, coherent along z.

    Every slice is the same phantom layout (one seed) under a slow zoom / shift (organs grow and
    move a little from slice to slice), plus fresh per-slice fine texture so neighbouring slices
    are similar but not identical, as in a real CT series.

    >>> synthetic_ct_volume("chest", n_slices=2, size=64, seed=0).shape
    (2, 64, 64)
    """
    rng = _rng(seed)
    base = int(rng.integers(2**31))
    out = np.empty((n_slices, size, size), dtype=np.float32)
    for z in range(n_slices):
        # identical layout (same seed) with a slow zoom: consecutive slices are coherent
        img = synthetic_ct_slice(kind, size, base)
        zoom = 1.0 + 0.015 * (z - n_slices / 2)
        shift_px = 0.5 * (z - n_slices / 2)
        m = np.array([[1 / zoom, 0], [0, 1 / zoom]])
        c = np.array([size / 2, size / 2])
        off = c - m @ c + np.array([shift_px, 0])
        out[z] = ndimage.affine_transform(img, m, offset=off, order=1, mode="nearest")
        # fresh fine texture per slice so slices are not identical copies
        t = ndimage.gaussian_filter(np.random.default_rng(base + z + 1).standard_normal((size, size)), 1.2)
        out[z] += (4.0 / (t.std() + 1e-9)) * t * (out[z] > -500)
    return np.clip(out, -1024, 3071)


def synthetic_xray(size: int = 256, seed: SeedLike = None) -> np.ndarray:
    """A procedural PA chest radiograph, ``(size, size)`` float32 in 12-bit-like "counts"
    (about 100..4000, bone / mediastinum bright as in processed MONOCHROME2 radiographs).

    Built as a projection: pixel value is linear in the attenuation line integral through a body
    (ellipsoidal thickness), minus air in the lung fields, plus heart / mediastinum / diaphragm,
    spine, clavicles and posterior ribs (tubular bone: bright cortical edges), pulmonary vessels;
    direct exposure outside the body is dark, with collimator edges.

    >>> xr = synthetic_xray(128, seed=0)
    >>> xr.shape, bool(xr.max() - xr.min() > 1500)
    ((128, 128), True)
    """
    if size < 32:
        raise InputError(f"phantom size must be >= 32 (got {size})")
    rng = _rng(seed)
    cv = _Canvas(int(size), rng)
    n = cv.n
    mu_soft, mu_bone = 1.0, 2.6
    # body thickness: an elliptic cylinder seen from the front (shoulders wider at the top)
    rx = rng.uniform(0.78, 0.9) * (1 + 0.08 * (cv.y < -0.6))
    body_t = np.sqrt(np.clip(1 - (cv.x / rx) ** 2, 0, None))
    body_t *= cv.y > rng.uniform(-1.0, -0.92)
    neck = (np.abs(cv.x) < 0.2) | (cv.y > -0.82)
    body_t *= neck
    proj = mu_soft * body_t * (1 + 0.04 * _field((n, n), n / 12, rng))
    # lung fields remove tissue; diaphragm domes bound them below
    lungs = np.zeros((n, n))
    for side in (-1, 1):
        cx = side * rng.uniform(0.33, 0.4)
        dome = 0.45 + 0.08 * side * -1 * 0 + rng.uniform(-0.05, 0.05) - 0.25 * ((cv.x - cx) / 0.35) ** 2
        lung = cv.ellipse(-0.1, cx, 0.68, 0.28, side * 0.08, warp=0.05) & (cv.y < dome)
        dl = ndimage.distance_transform_edt(lung) / n
        lungs += np.clip(dl * 9, 0, 0.75) * (1 + 0.05 * _field((n, n), n / 16, rng))
    proj -= mu_soft * lungs
    # heart (left of patient = image right), mediastinum, spine
    heart = cv.ellipse(0.3, 0.12, 0.27, 0.3, 0.3, warp=0.05)
    proj += 0.35 * mu_soft * ndimage.gaussian_filter(heart.astype(float), 1.5)
    med = np.abs(cv.x - 0.01 * cv.y) < 0.12
    proj += 0.25 * ndimage.gaussian_filter(med.astype(float), 2.0)
    spine = np.abs(cv.x) < 0.07
    vert = spine & (np.sin((cv.y + rng.uniform(0, 1)) * math.pi * 9) > -0.85)
    proj += (
        0.15
        * mu_bone
        * ndimage.gaussian_filter(vert.astype(float), 0.8)
        * np.sqrt(np.clip(1 - (cv.x / 0.07) ** 2, 0, None))
    )

    def tube(poly_y: np.ndarray, poly_x: np.ndarray, radius: float, strength: float) -> np.ndarray:
        from skimage.draw import line

        m = np.zeros((n, n), dtype=bool)
        iy = np.clip(((poly_y + 1) / 2 * n).astype(int), 0, n - 1)
        ix = np.clip(((poly_x + 1) / 2 * n).astype(int), 0, n - 1)
        for k in range(len(iy) - 1):
            rr, cc = line(iy[k], ix[k], iy[k + 1], ix[k + 1])
            m[rr, cc] = True
        d = ndimage.distance_transform_edt(~m) / (radius * n / 2)
        outer = np.sqrt(np.clip(1 - d**2, 0, None))
        inner = np.sqrt(np.clip(0.6**2 - d**2, 0, None))
        return strength * (outer - 0.7 * inner)  # cortical shell: bright edges

    t = np.linspace(0, 1, 40)
    bones = np.zeros((n, n))
    n_ribs = int(rng.integers(9, 12))
    spacing, bend, reach = 1.15 / n_ribs, rng.uniform(0.06, 0.14), rng.uniform(0.55, 0.68)
    for i in range(n_ribs):  # posterior ribs
        y0 = -0.64 + i * spacing + rng.normal(0, 0.01)
        for side in (-1, 1):
            px = side * (0.07 + reach * t)
            py = y0 - bend * np.sin(math.pi * t * 0.8) + rng.uniform(0.12, 0.2) * t**2
            bones += tube(py, px, 0.02 * rng.uniform(0.85, 1.15), 0.2)
    for side in (-1, 1):  # clavicles
        px = side * (0.05 + 0.5 * t)
        py = -0.68 - 0.06 * t + 0.05 * np.sin(math.pi * t)
        bones += tube(py, px, 0.03, 0.3)
    proj += mu_bone * bones * (body_t > 0)
    # pulmonary vessels fanning out from the hila
    lung_mask = lungs > 0.02
    ves = cv.tree(lung_mask, [(-0.05, -0.12), (-0.05, 0.15)], 16, max(1.0, n / 100))
    proj += 0.12 * ndimage.gaussian_filter(ves, 0.8)
    proj = ndimage.gaussian_filter(proj, 0.7)  # detector blur
    lo, hi = rng.uniform(80, 200), rng.uniform(3400, 3900)
    img = lo + (hi - lo) * proj / max(float(proj.max()), 1e-6)
    # collimator: rectangular exposed field, unexposed edges bright
    c = rng.uniform(0.0, 0.04, size=4)
    coll = (cv.x < -1 + c[0]) | (cv.x > 1 - c[1]) | (cv.y < -1 + c[2]) | (cv.y > 1 - c[3])
    img[coll] = hi * 0.98
    return img.astype(np.float32)


def iter_synthetic(kinds: Iterable[str], n: int, size: int, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """``n`` phantoms cycling through ``kinds`` (CT kinds and "xray"), reproducible from ``seed``."""
    kinds = list(kinds)
    for i in range(n):
        k = kinds[i % len(kinds)]
        s = _stable_seed(seed, k, i)
        yield k, (synthetic_xray(size, s) if k == "xray" else synthetic_ct_slice(k, size, s))
