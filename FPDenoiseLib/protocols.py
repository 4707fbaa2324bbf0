"""The paper's dataset protocols: LIDC-IDRI, RSNA Pneumonia and LiTS in their distributed layouts,
split by patient (no patient on both sides), random 2D slices resized to a square.

>>> from FPDenoiseLib.protocols import paper_protocol_slices
>>> train, test = paper_protocol_slices("/data/LIDC-IDRI", "lidc", seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import MIN_STD, SeedLike, Slice, _rng, _to_gray_volume
from .errors import InputError
from .intensity import Normalizer

__all__ = ["split_by_patient", "paper_protocol_slices"]


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
