"""Reading and writing medical images: DICOM series/files, NRRD, NIfTI, MetaImage, PNG, TIFF.

Every reader returns an :class:`Image`: a ``(z, y, x)`` numpy array in original units (CT in HU)
plus ITK/LPS geometry. Every writer is atomic (temp name in the destination folder, then
``os.replace``; a DICOM series is written into a temp folder next to the target and renamed), so a
kill at any moment leaves either nothing / the old output or the complete new one.

Bad input raises :class:`~FPDenoiseLib.errors.InputError` with ``"<path>: <problem>"``; an output
that cannot be written raises :class:`~FPDenoiseLib.errors.OutputError`.

Example
-------
>>> img = read_image("ct_series/")                       # DICOM folder -> HU, LPS geometry
>>> out = dataclasses.replace(img, array=denoised)
>>> write_image(out, "ct_denoised/", like=img, description="FPDenoise denoised (model default)")
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError

__all__ = [
    "Image",
    "SeriesInfo",
    "read_image",
    "write_image",
    "find_images",
    "find_series",
    "atomic_path",
    "VOLUME_EXTENSIONS",
    "IMAGE_EXTENSIONS",
]

#: file suffixes read/written with SimpleITK (volume formats)
VOLUME_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: 2D raster formats (grayscale only)
RASTER_EXTENSIONS = (".png", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
#: every file suffix :func:`read_image` accepts (DICOM files are also recognised by content)
IMAGE_EXTENSIONS = VOLUME_EXTENSIONS + RASTER_EXTENSIONS + DICOM_EXTENSIONS

_FORMAT_BY_EXT = {
    ".nrrd": "nrrd", ".nhdr": "nrrd", ".nii": "nifti", ".nii.gz": "nifti", ".mha": "mha", ".mhd": "mha",
    ".png": "png", ".tif": "tiff", ".tiff": "tiff",
}
_XR_MODALITIES = {"CR", "DX", "DR", "MG", "XA", "RF", "IO", "PX", "XR", "RG"}
_TMP_TAG = ".fpdtmp-"
MIN_SIZE = 8  # smallest in-plane size (pixels) a network / noise model can work with

# SOP classes for DICOM written without a DICOM template
_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
_ENHANCED_TO_CLASSIC = {
    "1.2.840.10008.5.1.4.1.1.2.1": _CT_STORAGE,  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1": _MR_STORAGE,  # Enhanced MR
}

# install hints for compressed transfer syntaxes that pydicom cannot decode without plugins
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.80": "pyjpegls, or pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pyjpegls, or pylibjpeg and pylibjpeg-libjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg and pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg and pylibjpeg-openjpeg (or python-gdcm)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg and pylibjpeg-openjpeg>=2",
    "1.2.840.10008.1.2.4.202": "pylibjpeg and pylibjpeg-openjpeg>=2",
    "1.2.840.10008.1.2.4.203": "pylibjpeg and pylibjpeg-openjpeg>=2",
}


# --------------------------------------------------------------------------------------- Image
@dataclass
class Image:
    """An image in original units with ITK/LPS geometry.

    ``array`` is ``(z, y, x)`` (2D images are ``(1, y, x)`` with ``is_2d=True``); ``spacing`` and
    ``origin`` are (x, y, z) in mm; ``direction`` is the 3x3 row-major direction cosine matrix
    whose columns are the x, y and z axes in LPS. ``dicom_headers`` holds one pydicom Dataset per
    slice (pixel data removed) when the image was read from DICOM, so derived series can be written.

    >>> img = Image(np.zeros((1, 64, 64), np.uint8), (0.2, 0.2, 1.0), (0, 0, 0), IDENTITY, "XR", True)
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    modality: str = "OT"
    is_2d: bool = False
    source: str | None = None
    source_format: str = "nrrd"
    dicom_headers: list | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def series_uid(self) -> str | None:
        """SeriesInstanceUID of the DICOM source, if any."""
        if self.dicom_headers:
            return str(getattr(self.dicom_headers[0], "SeriesInstanceUID", "") or "") or None
        return None

    def with_array(self, array: np.ndarray, **changes) -> Image:
        """A copy with the same geometry (and DICOM headers) and a new array of the same shape."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise InputError(f"{self.source}: new array shape {array.shape} != image shape {self.array.shape}")
        kw = {f: getattr(self, f) for f in self.__dataclass_fields__}
        kw.update(array=array, **changes)
        return Image(**kw)


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class SeriesInfo:
    """One DICOM series found on disk (see :func:`find_series`)."""

    uid: str
    files: list[Path]
    folder: Path  # deepest folder holding all its files
    modality: str = ""
    description: str = ""
    series_number: str = ""
    patient_id: str = ""
    study_uid: str = ""

    @property
    def n_files(self) -> int:
        return len(self.files)

    def __str__(self) -> str:
        d = f" '{self.description}'" if self.description else ""
        return f"{self.uid} ({self.modality or '?'}{d}, {self.n_files} file(s) in {self.folder})"


# --------------------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    """Lower-case suffix, ``.nii.gz`` treated as one."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _is_hidden_or_tmp(path: Path) -> bool:
    return path.name.startswith(".") or _TMP_TAG in path.name


def _looks_like_dicom(path: Path) -> bool:
    """Cheap content test: 'DICM' at byte 128, or a .dcm-like suffix (files without preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return _suffix(path) in DICOM_EXTENSIONS


def _short(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return (msg[:200] + "...") if len(msg) > 200 else (msg or type(err).__name__)


def _itk_msg(err: BaseException) -> str:
    """The useful part of an ITK/SimpleITK exception (drops source paths and object addresses)."""
    import re

    text = str(err)
    if "ERROR:" in text:
        text = text.split("ERROR:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return _short(err)
    first = re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", lines[0])
    last = re.sub(r"^\[\w+\]\s*", "", lines[-1]) if len(lines) > 1 else ""
    msg = first + (f" ... {last}" if last and last != first else "")
    return _short(msg)


def _check_array(arr: np.ndarray, where: str, *, min_size: int, allow_nonfinite: bool) -> None:
    if arr.ndim != 3:
        raise InputError(f"{where}: expected a 2D image or 3D volume, got array shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{where}: image is empty (shape {arr.shape})")
    if min(arr.shape[1:]) < min_size:
        raise InputError(
            f"{where}: image is {arr.shape[2]}x{arr.shape[1]} pixels in-plane; at least {min_size}x{min_size} is needed"
        )
    if arr.dtype.kind == "c":
        raise InputError(f"{where}: complex-valued data is not supported (use magnitude images)")
    if arr.dtype.kind == "f" and not allow_nonfinite:
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise InputError(f"{where}: contains {bad} NaN/inf voxel(s)")


# --------------------------------------------------------------------------------------- discovery
def _read_series_header(path: Path):
    import pydicom

    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            force=True,
            specific_tags=["SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber", "Rows",
                           "PatientID", "StudyInstanceUID", "SOPClassUID"],
        )
    except Exception:  # not DICOM / unreadable: discovery skips it, read_image reports it
        return None
    uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
    if not uid or "Rows" not in ds:  # no series or not an image object (SR, RTSTRUCT, ...)
        return None
    return ds


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _TMP_TAG not in d)
            for f in sorted(files):
                p = Path(root) / f
                if not _is_hidden_or_tmp(p):
                    yield p
    else:
        for p in sorted(folder.iterdir()):
            if p.is_file() and not _is_hidden_or_tmp(p):
                yield p


def find_series(folder: str | os.PathLike, *, recursive: bool = True) -> list[SeriesInfo]:
    """Group the DICOM image files below ``folder`` by SeriesInstanceUID.

    Handles PACS exports: nested folders, several series mixed in one folder, non-DICOM files
    beside them (ignored), files with or without a ``.dcm`` suffix. Non-image objects (SR, RTSTRUCT,
    presentation states) are skipped. Sorted by folder, then series number, then UID.

    >>> for s in find_series("pacs_export/"):
    ...     img = read_image(s.folder, series_uid=s.uid)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    groups: dict[str, SeriesInfo] = {}
    for p in _walk(folder, recursive):
        if not _looks_like_dicom(p):
            continue
        ds = _read_series_header(p)
        if ds is None:
            continue
        uid = str(ds.SeriesInstanceUID)
        info = groups.get(uid)
        if info is None:
            info = groups[uid] = SeriesInfo(
                uid=uid, files=[], folder=p.parent, modality=str(getattr(ds, "Modality", "") or ""),
                description=str(getattr(ds, "SeriesDescription", "") or ""),
                series_number=str(getattr(ds, "SeriesNumber", "") or ""),
                patient_id=str(getattr(ds, "PatientID", "") or ""),
                study_uid=str(getattr(ds, "StudyInstanceUID", "") or ""),
            )
        info.files.append(p)
    for info in groups.values():
        info.folder = Path(os.path.commonpath([str(f.parent) for f in info.files]))

    def key(s: SeriesInfo):
        try:
            num = int(float(s.series_number))
        except ValueError:
            num = 0
        return (str(s.folder), num, s.uid)

    return sorted(groups.values(), key=key)


def find_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Every readable image below ``folder``: volume/raster files and DICOM series.

    A DICOM series is listed as its folder when it is the only series in that folder, otherwise as
    its file when it is a single file (e.g. X-rays exported side by side), otherwise as the folder
    (several multi-file series mixed in one folder: use :func:`find_series` and
    ``read_image(folder, series_uid=...)``). ``.raw``/``.zraw`` data files of ``.mhd``/``.nhdr``
    headers are not listed.

    >>> find_images("data/")   # [Path('data/ct1'), Path('data/xr/chest.png'), ...]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    out: list[Path] = []
    for p in _walk(folder, recursive):
        ext = _suffix(p)
        if ext in VOLUME_EXTENSIONS or ext in RASTER_EXTENSIONS:
            out.append(p)
    series = find_series(folder, recursive=recursive)
    per_folder: dict[Path, int] = {}
    for s in series:
        for d in {f.parent for f in s.files}:
            per_folder[d] = per_folder.get(d, 0) + 1
    for s in series:
        parents = {f.parent for f in s.files}
        if len(parents) == 1 and per_folder[s.files[0].parent] > 1 and s.n_files == 1:
            out.append(s.files[0])
        else:
            out.append(s.folder)
    return sorted(set(out), key=str)


# --------------------------------------------------------------------------------------- reading
def read_image(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    min_size: int = MIN_SIZE,
    allow_nonfinite: bool = False,
) -> Image:
    """Read a DICOM series folder, a DICOM file, or a NRRD/NIfTI/MetaImage/PNG/TIFF file.

    Parameters
    ----------
    path : file or folder. A folder is searched (recursively) for DICOM series.
    series_uid : which series to read when the folder holds several (otherwise InputError lists them).
    modality : override the modality ("CT", "MR", "XR", "OT"); non-DICOM volume files otherwise
        report "OT" unless written by FPDenoise (NRRD/MHA keep it in a metadata key).
    min_size : smallest accepted in-plane size in pixels.
    allow_nonfinite : accept NaN/inf voxels (default: InputError).

    Returns an :class:`Image`: CT in HU (RescaleSlope/Intercept applied: int16/int32 when integral,
    float32 otherwise), DICOM slices sorted along the slice normal, geometry in LPS.

    >>> img = read_image("chest.png");  img.array.shape, img.is_2d   # ((1, 512, 512), True)
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        img = _read_dicom_folder(p, series_uid)
    else:
        try:
            if p.stat().st_size == 0:
                raise InputError(f"{p}: file is empty")
        except OSError as err:
            raise InputError(f"{p}: cannot access ({_short(err)})") from err
        ext = _suffix(p)
        if ext in VOLUME_EXTENSIONS:
            img = _read_sitk(p)
        elif ext == ".png":
            img = _read_png(p)
        elif ext in (".tif", ".tiff"):
            img = _read_tiff(p)
        elif _looks_like_dicom(p):
            img = _read_dicom_files([p], p)
        else:
            raise InputError(
                f"{p}: unsupported file type '{ext or p.name}' (supported: DICOM, "
                + ", ".join(VOLUME_EXTENSIONS + RASTER_EXTENSIONS) + ")"
            )
    if modality:
        img.modality = _norm_modality(modality)
    _check_array(img.array, str(p), min_size=min_size, allow_nonfinite=allow_nonfinite)
    return img


def _norm_modality(m: str) -> str:
    m = (m or "").upper().strip()
    if m in ("CT", "MR", "OT"):
        return m
    if m in _XR_MODALITIES:
        return "XR"
    return "OT"  # NM, PT, US, RTDOSE...: no modality-specific handling


# ---- SimpleITK volume formats
def _read_sitk(p: Path) -> Image:
    import SimpleITK as sitk

    try:
        im = sitk.ReadImage(str(p))
    except RuntimeError as err:
        raise InputError(f"{p}: cannot read ({_itk_msg(err)})") from err
    if im.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{p}: has {im.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector); "
                         "only single-channel grayscale is supported")
    dim = im.GetDimension()
    size = im.GetSize()
    if dim > 3:
        if all(s == 1 for s in size[3:]):
            im = im[(slice(None),) * 3 + (0,) * (dim - 3)]
            dim = 3
        else:
            raise InputError(f"{p}: {dim}D data of size {size} is not supported (need 2D or 3D)")
    arr = sitk.GetArrayFromImage(im)
    if dim == 2:
        sx, sy = im.GetSpacing()
        ox, oy = im.GetOrigin()
        d = im.GetDirection()
        spacing, origin = (sx, sy, 1.0), (ox, oy, 0.0)
        direction = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
        arr = arr[None]
        is_2d = True
    else:
        spacing, origin, direction = im.GetSpacing(), im.GetOrigin(), im.GetDirection()
        is_2d = False
    mod = im.GetMetaData("FPDenoise_modality") if im.HasMetaDataKey("FPDenoise_modality") else "OT"
    return Image(arr, tuple(map(float, spacing)), tuple(map(float, origin)), tuple(map(float, direction)),
                 _norm_modality(mod), is_2d, str(p), _FORMAT_BY_EXT[_suffix(p)])


# ---- PNG / TIFF
def _gray_from_rgb(arr: np.ndarray, p: Path) -> np.ndarray:
    """RGB(A) whose colour channels are identical (grayscale saved as RGB) -> one channel."""
    c = arr[..., :3]
    if np.array_equal(c[..., 0], c[..., 1]) and np.array_equal(c[..., 0], c[..., 2]):
        return np.ascontiguousarray(c[..., 0])
    raise InputError(f"{p}: colour (RGB) image; only grayscale images are supported")


def _read_png(p: Path) -> Image:
    from PIL import Image as PILImage

    try:
        with PILImage.open(p) as im:
            im.load()
            n_frames = getattr(im, "n_frames", 1)
            mode = im.mode
            if n_frames > 1:
                raise InputError(f"{p}: animated PNG with {n_frames} frames is not supported")
            if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.array(im)
            elif mode == "1":
                arr = np.array(im, dtype=np.uint8) * 255
            elif mode in ("RGB", "RGBA", "LA", "P", "PA"):
                rgb = np.array(im.convert("RGB")) if mode in ("P", "PA") else np.array(im)
                arr = rgb[..., 0] if mode == "LA" else _gray_from_rgb(rgb, p)
            else:
                raise InputError(f"{p}: unsupported PNG pixel mode '{mode}'")
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{p}: cannot read PNG ({_short(err)})") from err
    if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # PIL opens some 16-bit PNGs as mode "I"
    return Image(arr[None], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY, "XR", True, str(p), "png")


def _read_tiff(p: Path) -> Image:
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            s = tf.series[0]
            axes, arr = s.axes, s.asarray()
            page = tf.pages[0]
            spacing = _tiff_spacing(page)
            desc = str(page.description or "")
    except Exception as err:
        raise InputError(f"{p}: cannot read TIFF ({_short(err)})") from err
    if "S" in axes and arr.shape[axes.index("S")] > 1:
        arr = np.moveaxis(arr, axes.index("S"), -1)
        if arr.ndim != 3:
            raise InputError(f"{p}: multi-page colour TIFF (axes {axes}, shape {arr.shape}) is not supported")
        arr = _gray_from_rgb(arr, p)
    else:
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise InputError(f"{p}: multi-page TIFF (axes {axes}, shape {s.shape}) is not supported; "
                             "save volumes as NRRD/NIfTI/MHA")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    mod = desc.split("modality=", 1)[1].split()[0] if desc.startswith("FPDenoise modality=") else "XR"
    return Image(np.ascontiguousarray(arr)[None], spacing, (0.0, 0.0, 0.0), IDENTITY, _norm_modality(mod), True,
                 str(p), "tiff")


def _tiff_spacing(page) -> tuple[float, float, float]:
    """Pixel size in mm from X/YResolution when the unit is cm or inch, else 1.0."""
    try:
        tags = page.tags
        # only centimetre resolutions are physical; inch resolutions are usually screen dpi
        if "ResolutionUnit" in tags and int(tags["ResolutionUnit"].value) == 3:
            xr, yr = tags["XResolution"].value, tags["YResolution"].value
            xr, yr = xr[0] / xr[1], yr[0] / yr[1]
            if xr > 0 and yr > 0:
                return (10.0 / xr, 10.0 / yr, 1.0)
    except Exception:  # missing / odd resolution tags: no physical size
        pass
    return (1.0, 1.0, 1.0)


# ---- DICOM
def _read_dicom_folder(folder: Path, series_uid: str | None) -> Image:
    try:
        entries = [e for e in folder.iterdir() if not _is_hidden_or_tmp(e)]
    except OSError as err:
        raise InputError(f"{folder}: cannot list folder ({_short(err)})") from err
    if not entries:
        raise InputError(f"{folder}: folder is empty")
    series = find_series(folder)
    if not series:
        candidates = [p for p in _walk(folder, True) if _suffix(p) in VOLUME_EXTENSIONS + RASTER_EXTENSIONS]
        if len(candidates) == 1:
            return read_image(candidates[0])
        dicom_like = [p for p in _walk(folder, True) if _looks_like_dicom(p)]
        if dicom_like:
            # the files look like DICOM but none is a readable image: name the first offender
            _read_dicom_files(dicom_like[:1], folder)
        extra = f" ({len(candidates)} image files: pass one of them)" if candidates else ""
        raise InputError(f"{folder}: no readable DICOM series found{extra}")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise InputError(f"{folder}: series {series_uid} not found; available: "
                             + "; ".join(str(s) for s in series))
        s = chosen[0]
    elif len(series) > 1:
        raise InputError(f"{folder}: holds {len(series)} DICOM series; choose one with series_uid=: "
                         + "; ".join(str(s) for s in series))
    else:
        s = series[0]
    return _read_dicom_files(s.files, folder)


def _decoder_hint(ts: str, err: BaseException) -> str:
    hint = _DECODER_HINTS.get(ts)
    lines = [ln.strip() for ln in str(err).splitlines() if "requires" in ln]
    if hint:
        return f"install {hint}"
    if lines:
        return "install one of: " + "; ".join(lines)
    return "no installed decoder supports it"


def _pixels(ds, f: Path) -> np.ndarray:
    """Stored pixel values (no rescale) as (frames, rows, cols); SimpleITK/GDCM fallback for codecs
    pydicom has no plugin for."""
    try:
        arr = ds.pixel_array
    except Exception as err:
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        compressed = ts in _DECODER_HINTS or "decompress" in str(err).lower() or "plugin" in str(err).lower()
        if not compressed:
            raise InputError(f"{f}: corrupt or truncated DICOM pixel data ({_short(err)})") from err
        try:
            arr = _pixels_sitk(ds, f)
        except Exception as err2:
            try:
                import pydicom.uid

                ts_name = pydicom.uid.UID(ts).name
            except Exception:
                ts_name = ts
            raise InputError(
                f"{f}: cannot decode compressed transfer syntax {ts_name} ({ts}) with the installed decoders; "
                f"{_decoder_hint(ts, err)} (SimpleITK/GDCM also failed: {_itk_msg(err2)[:120]})"
            ) from err
    arr = np.asarray(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and frames == 1 and arr.shape[0] != 1:
        raise InputError(f"{f}: colour / multi-sample pixel data (shape {arr.shape}) is not supported")
    elif arr.ndim != 3:
        raise InputError(f"{f}: multi-frame colour pixel data (shape {arr.shape}) is not supported")
    return arr


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Silence C-level writes to fd 2 (GDCM/OpenJPEG print 'Invalid marker size' etc. before the
    exception we report): the CLI promises exactly one error line."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _pixels_sitk(ds, f: Path) -> np.ndarray:
    import SimpleITK as sitk

    with warnings.catch_warnings(), _quiet_stderr_fd():
        warnings.simplefilter("ignore")
        im = sitk.ReadImage(str(f))
    if im.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{f}: colour pixel data is not supported")
    a = sitk.GetArrayFromImage(im).astype(np.float64)
    # GDCM applies the modality rescale; undo it so the stored values follow one code path
    m = float(getattr(ds, "RescaleSlope", 1) or 1)
    b = float(getattr(ds, "RescaleIntercept", 0) or 0)
    signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    bits = int(getattr(ds, "BitsAllocated", 16) or 16)
    dt = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}.get(
        (bits, signed), np.int32 if signed else np.uint32)
    return np.rint((a - b) / m).astype(dt)


def _dcmread(f: Path):
    import pydicom

    try:
        return pydicom.dcmread(f, force=True)
    except Exception as err:
        raise InputError(f"{f}: corrupt or truncated DICOM ({_short(err)})") from err


def _vec(ds, name, n, f, default=None):
    v = getattr(ds, name, None)
    if v is None or (hasattr(v, "__len__") and len(v) != n):
        if default is not None:
            return np.asarray(default, dtype=float)
        return None
    try:
        return np.asarray([float(x) for x in v], dtype=float)
    except (TypeError, ValueError) as err:
        raise InputError(f"{f}: invalid {name} {v!r}") from err


def _pixel_spacing(ds, f: Path) -> np.ndarray | None:
    """In-plane (row, column) spacing in mm, or None when unknown.

    Zero, negative or non-finite values are "unknown", not a spacing: real CR/DX exports carry
    ``PixelSpacing`` = [0, 0] for an uncalibrated detector, and SimpleITK refuses to write such an image
    ("Zero-valued spacing"). Then ``ImagerPixelSpacing`` (the detector's pitch) is the best estimate.
    """
    for name in ("PixelSpacing", "ImagerPixelSpacing"):
        ps = _vec(ds, name, 2, f)
        if ps is not None and bool(np.all(np.isfinite(ps))) and bool(np.all(ps > 0)):
            return ps
    return None


class UnknownSpacingWarning(UserWarning):
    """A DICOM image without a usable pixel spacing was read with 1.0 mm (see :func:`read_image`)."""


def _monochrome1_range(ds) -> tuple[float, float] | None:
    """``(lo, hi)`` modality values of the stored range of a MONOCHROME1 header, else None.

    MONOCHROME1 means "the minimum value is white". Readers here turn it into MONOCHROME2 meaning
    (``lo + hi - value``: bone bright, as the models were trained and as PNG panels and Slicer show
    intensities); the DICOM writer applies the same involution again for a MONOCHROME1 template, so
    a written file keeps the input's photometric meaning.
    """
    pi = str(getattr(ds, "PhotometricInterpretation", "") or "").strip().upper()
    if pi != "MONOCHROME1":
        return None
    bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
        smin, smax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        smin, smax = 0, 2**bits - 1
    m = float(getattr(ds, "RescaleSlope", 1) or 1)
    b = float(getattr(ds, "RescaleIntercept", 0) or 0)
    lo, hi = sorted((b + m * smin, b + m * smax))
    return lo, hi


def _flip_monochrome1(array: np.ndarray, lohi: tuple[float, float]) -> np.ndarray:
    """``lo + hi - array`` in the array's dtype when the result fits it exactly (it does for values in
    [lo, hi]), else float32."""
    lo, hi = lohi
    v = (lo + hi) - array.astype(np.float64)
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        if v.size == 0 or (v.min() >= info.min and v.max() <= info.max and lo + hi == int(lo + hi)):
            return v.astype(array.dtype)
        return v.astype(np.float32)
    return v.astype(array.dtype if array.dtype.kind == "f" else np.float32)


def _frame_geometry(ds, f: Path, n_frames: int):
    """(positions or None, iop, pixel_spacing, thickness) for one (possibly enhanced multi-frame) file."""
    iop = _vec(ds, "ImageOrientationPatient", 6, f)
    ps = _pixel_spacing(ds, f)
    thick = getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None)
    ipp = _vec(ds, "ImagePositionPatient", 3, f)
    positions = [ipp] * n_frames if ipp is not None and n_frames == 1 else None
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)

    def fg(item, seq, attr, n):
        s = getattr(item, seq, None)
        return _vec(s[0], attr, n, f) if s else None

    if shared:
        sh = shared[0]
        iop = fg(sh, "PlaneOrientationSequence", "ImageOrientationPatient", 6) if iop is None else iop
        pm = getattr(sh, "PixelMeasuresSequence", None)
        if pm:
            ps = _pixel_spacing(pm[0], f) if ps is None else ps
            thick = thick or getattr(pm[0], "SpacingBetweenSlices", None) or getattr(pm[0], "SliceThickness", None)
    if per_frame and len(per_frame) == n_frames:
        pos = [fg(it, "PlanePositionSequence", "ImagePositionPatient", 3) for it in per_frame]
        if all(x is not None for x in pos):
            positions = pos
        if iop is None:
            iop = fg(per_frame[0], "PlaneOrientationSequence", "ImageOrientationPatient", 6)
        if ps is None:
            pm = getattr(per_frame[0], "PixelMeasuresSequence", None)
            ps = _pixel_spacing(pm[0], f) if pm else None
    elif positions is None and ipp is not None:
        positions = None  # multi-frame without per-frame positions: origin + uniform spacing below
    return positions, iop, ps, thick, ipp


def _read_dicom_files(files: list[Path], where: Path) -> Image:
    slices = []  # (header, frames_array, positions, iop, ps, thick, ipp, slope, intercept)
    for f in files:
        ds = _dcmread(f)
        if "Rows" not in ds and "SOPClassUID" not in ds and "PixelData" not in ds:
            raise InputError(f"{f}: not a readable DICOM file (corrupt, or not DICOM)")
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise InputError(f"{f}: DICOM file has no pixel data (not an image, or truncated)")
        spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        pi = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper()
        if spp != 1 or not pi.startswith("MONOCHROME"):
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            kind = "multi-frame colour" if frames > 1 else "colour"
            raise InputError(f"{f}: {kind} DICOM ({pi}, {spp} samples/pixel) is not supported; grayscale only")
        arr = _pixels(ds, f)
        n = arr.shape[0]
        positions, iop, ps, thick, ipp = _frame_geometry(ds, f, n)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if "PixelData" in ds:
            del ds.PixelData
        slices.append([ds, arr, positions, iop, ps, thick, ipp, slope, inter])

    rows = {s[1].shape[1:] for s in slices}
    if len(rows) > 1:
        raise InputError(f"{where}: slices have different sizes {sorted(rows)}")
    multi = [s for s in slices if s[1].shape[0] > 1]
    if multi and len(slices) > 1:
        raise InputError(f"{where}: series mixes multi-frame and single-frame files; read the files one by one")

    first = slices[0]
    iop = first[3] if first[3] is not None else np.array([1.0, 0, 0, 0, 1.0, 0])
    for s in slices[1:]:
        if s[3] is not None and not np.allclose(s[3], iop, atol=1e-4):
            raise InputError(f"{where}: slices have different ImageOrientationPatient (mixed orientations)")
    r, c = iop[:3], iop[3:]
    nrm = np.cross(r, c)
    ps = first[4]
    if ps is None:
        # one line (the CLI prints warnings as "warning: ..."): measurements in mm are then nominal
        warnings.warn(f"{where}: no valid PixelSpacing/ImagerPixelSpacing; assuming 1.0 mm pixels",
                      UnknownSpacingWarning, stacklevel=3)
        ps = np.array([1.0, 1.0])
    thick = float(first[5]) if first[5] not in (None, "") else 1.0

    if len(slices) == 1:
        ds, arr, positions, *_ = first
        slope_i = np.full(arr.shape[0], first[7])
        inter_i = np.full(arr.shape[0], first[8])
        headers = [ds]
        if positions is not None and len(positions) == arr.shape[0] and arr.shape[0] > 1:
            order, dz, origin = _sort_positions(positions, nrm, where, [f"frame {i + 1}" for i in range(len(positions))])
            arr = arr[order]
        else:
            origin = first[6] if first[6] is not None else np.zeros(3)
            dz = thick
        stack = arr
    else:
        if any(s[2] is None for s in slices):
            # no positions: fall back to InstanceNumber order and the nominal thickness
            slices.sort(key=lambda s: int(getattr(s[0], "InstanceNumber", 0) or 0))
            order = list(range(len(slices)))
            dz = thick
            origin = slices[0][6] if slices[0][6] is not None else np.zeros(3)
        else:
            names = [str(Path(str(getattr(s[0], "filename", "")) or "?").name) for s in slices]
            order, dz, origin = _sort_positions([s[2][0] for s in slices], nrm, where, names)
        slices = [slices[i] for i in order]
        stack = np.concatenate([s[1] for s in slices], axis=0)
        slope_i = np.array([s[7] for s in slices])
        inter_i = np.array([s[8] for s in slices])
        headers = [s[0] for s in slices]

    array = _apply_rescale(stack, slope_i, inter_i)
    mono1 = _monochrome1_range(headers[0])
    if mono1 is not None:
        array = _flip_monochrome1(array, mono1)
    is_2d = stack.shape[0] == 1 and len(slices) == 1
    direction = (r[0], c[0], nrm[0], r[1], c[1], nrm[1], r[2], c[2], nrm[2])
    spacing = (float(ps[1]), float(ps[0]), float(dz) if dz else 1.0)
    mod = _norm_modality(str(getattr(headers[0], "Modality", "") or "OT"))
    src = str(files[0]) if len(files) == 1 and where == files[0] else str(where)
    return Image(array, spacing, tuple(float(x) for x in origin), tuple(float(x) for x in direction),
                 mod, is_2d, src, "dicom", headers)


def _sort_positions(positions, nrm, where, names):
    """Order slices along the normal; uniform spacing check. Returns (order, spacing, origin)."""
    pos = np.asarray(positions, dtype=float)
    d = pos @ nrm
    order = np.argsort(d, kind="stable")
    ds = d[order]
    gaps = np.diff(ds)
    if gaps.size == 0:
        return order, None, pos[order[0]]
    if np.any(gaps < 1e-4):
        i = int(np.argmin(gaps))
        raise InputError(f"{where}: two slices at the same position ({names[order[i]]} and {names[order[i + 1]]}, "
                         f"{ds[i]:.3f} mm along the normal; several acquisitions/echoes in one series?)")
    med = float(np.median(gaps))
    bad = np.abs(gaps - med) > max(1e-2 * med, 1e-3)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{where}: non-uniform slice spacing: gap of {gaps[i]:.3f} mm between {names[order[i]]} and "
            f"{names[order[i + 1]]} (typical gap {med:.3f} mm; missing slice?)"
        )
    return order, float(np.mean(gaps)), pos[order[0]]


def _apply_rescale(stack: np.ndarray, slope: np.ndarray, inter: np.ndarray) -> np.ndarray:
    """Modality LUT: value = stored * slope + intercept, per slice; integer output when exact."""
    if np.all(slope == 1) and np.all(inter == 0):
        return np.ascontiguousarray(stack)
    integral = np.all(slope == np.round(slope)) and np.all(inter == np.round(inter))
    if integral:
        v = stack.astype(np.int64) * slope.astype(np.int64)[:, None, None] + inter.astype(np.int64)[:, None, None]
        lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
        for dt in (np.int16, np.int32):
            if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                return v.astype(dt)
        return v.astype(np.float64)
    return (stack.astype(np.float64) * slope[:, None, None] + inter[:, None, None]).astype(np.float32)


# --------------------------------------------------------------------------------------- atomic
_DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "read-only file system", errno.ENOTDIR: "a parent is not a folder"}


def _output_error(path: Path, err: BaseException) -> OutputError:
    if isinstance(err, OutputError):
        return err
    reason = _DISK_ERRNOS.get(getattr(err, "errno", None) or -1)
    if reason is None:
        low = str(err).lower()
        if "no space" in low:
            reason = "disk full"
        elif "file too large" in low:
            reason = "file too large"
        elif "permission" in low:
            reason = "permission denied"
        else:
            reason = _short(err)
    return OutputError(f"{path}: cannot write ({reason})")


def _diagnose_write_error(path: Path, err: BaseException, nbytes: int) -> OutputError:
    """ITK exceptions carry no errno: reproduce the failure with a plain write of the same size to
    tell 'disk full' / 'file too large' / 'permission denied' apart from format problems."""
    probe = path.parent / f".probe{_TMP_TAG}{uuid.uuid4().hex[:10]}"
    try:
        with open(probe, "wb") as fh:
            chunk = b"\0" * (1 << 20)
            left = min(int(nbytes), 256 << 20)
            while left > 0:
                fh.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as oserr:
        return _output_error(path, oserr)
    finally:
        _remove(probe)
    return OutputError(f"{path}: cannot write ({_itk_msg(err)})")


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it is renamed onto ``path``.

    The temp name keeps the suffix (``.nii.gz`` too) so format-by-extension writers work. The
    caller may create a file or a folder there. On any exception the temp is removed and
    ``OSError``s (disk full, no permission...) become :class:`OutputError`. An existing non-empty
    destination folder is replaced only when ``overwrite`` (old one removed after the swap).

    >>> with atomic_path("out.nrrd") as tmp:
    ...     sitk.WriteImage(im, str(tmp))
    """
    path = Path(path)
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _output_error(path, err) from err
    tmp = path.parent / f".{stem}{_TMP_TAG}{uuid.uuid4().hex[:10]}{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"{path}: writer produced no output")
        if tmp.is_dir() and path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise OutputError(f"{path}: output folder exists and is not empty")
            old = path.parent / f".{stem}{_TMP_TAG}old-{uuid.uuid4().hex[:10]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.exists() and not overwrite:
                raise OutputError(f"{path}: output exists")
            os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError):
            if getattr(err, "errno", None) is None:  # e.g. a short write reported without errno
                raise _diagnose_write_error(path, err, 1 << 20) from err
            raise _output_error(path, err) from err
        raise


# --------------------------------------------------------------------------------------- writing
def _is_dicom_target(path: Path, image: Image) -> bool:
    ext = _suffix(path)
    return ext == "" or ext in DICOM_EXTENSIONS or path.is_dir()


def _sources(image: Image, like: Image | None) -> list[Path]:
    out = []
    for im in (image, like):
        if im is not None and im.source:
            out.append(Path(im.source))
            for h in im.dicom_headers or []:
                fn = getattr(h, "filename", None)
                if isinstance(fn, str) and fn:
                    out.append(Path(fn))
    return out


def _refuse_input(path: Path, image: Image, like: Image | None) -> None:
    target = path.resolve()
    for src in _sources(image, like):
        try:
            s = src.resolve()
        except OSError:
            continue
        if s == target or target in s.parents:
            raise OutputError(f"{path}: output would overwrite the input {src}")


def write_image(
    image: Image,
    path: str | os.PathLike,
    *,
    like: Image | None = None,
    description: str = "",
    overwrite: bool = True,
    clip: bool = False,
    rescale: bool | None = None,
    series_number: int | None = None,
) -> Path:
    """Write ``image`` atomically; the format follows ``path``'s extension.

    * ``.nrrd``, ``.nii``/``.nii.gz``, ``.mha``/``.mhd`` (SimpleITK): dtype and geometry kept; the
      modality is stored in NRRD/MHA metadata.
    * ``.png`` (uint8/uint16) and ``.tif``/``.tiff`` (any numeric dtype, pixel size in mm stored
      as resolution): 2D only (``InputError`` for more than one slice). PNG: uint8/uint16 arrays are
      written as is; other dtypes are rounded and written as uint16 (uint8 if ``like`` was uint8)
      when they fit, else ``InputError`` — or clipped to the range if ``clip=True``. With
      ``rescale=True`` (default for float maps with modality "OT", e.g. saliency) values are
      min-max stretched to the full uint8/uint16 range instead.
    * a folder path (no suffix, or an existing folder) -> DICOM series, one file per slice; a
      ``.dcm`` path -> one DICOM file for a 2D image (a series folder of that name otherwise).
      With a DICOM ``like`` (or ``image.dicom_headers``) it is a derived series of the same
      study/patient/frame of reference: new Series/SOP Instance UIDs, ImageType DERIVED\\SECONDARY,
      SeriesDescription/DerivationDescription from ``description``. Values are stored as int16/uint16
      with the template's RescaleSlope/Intercept when they fit exactly, else with a recomputed
      slope/intercept (float maps, out-of-range values) — never wrapped around. Without a DICOM
      template a new study is created (CT/MR image storage, or secondary capture for XR/OT).

    Refuses to overwrite the input (``OutputError``); ``overwrite=False`` refuses any existing output.
    Returns the written path.

    >>> write_image(img.with_array(den), "out/", like=img, description="FPDenoise denoised (model default)")
    """
    path = Path(path)
    if not isinstance(image, Image):
        raise InputError(f"{path}: write_image needs an io.Image, got {type(image).__name__}")
    arr = np.asarray(image.array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.size == 0:
        raise InputError(f"{path}: cannot write array of shape {arr.shape} (need (z, y, x))")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError(f"{path}: image to write contains NaN/inf values")
    _refuse_input(path, image, like)
    if not overwrite and path.exists():
        raise OutputError(f"{path}: output exists (overwrite=False)")
    ext = _suffix(path)
    if ext in VOLUME_EXTENSIONS:
        _write_sitk(image, arr, path, overwrite)
    elif ext == ".png":
        if rescale is None:
            rescale = arr.dtype.kind == "f" and image.modality == "OT"
        _write_png(image, arr, path, like, clip, overwrite, rescale)
    elif ext in (".tif", ".tiff"):
        _write_tiff(image, arr, path, overwrite)
    elif _is_dicom_target(path, image):
        _write_dicom(image, arr, path, like=like, description=description, overwrite=overwrite,
                                 series_number=series_number, single_file=ext in DICOM_EXTENSIONS and arr.shape[0] == 1)
    else:
        raise InputError(f"{path}: unsupported output extension '{ext}' (use .nrrd, .nii, .nii.gz, .mha, .mhd, "
                         ".png, .tif, .dcm or a folder for a DICOM series)")
    return path


def _write_sitk(image: Image, arr: np.ndarray, path: Path, overwrite: bool) -> None:
    import SimpleITK as sitk

    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    d = tuple(float(x) for x in image.direction)
    flat = arr.shape[0] == 1 and image.is_2d and d[2] == 0 and d[5] == 0 and d[6] == 0 and d[7] == 0 \
        and abs(d[8] - 1) < 1e-9 and float(image.origin[2]) == 0.0
    if flat:  # keep 2D images 2D so they read back with is_2d=True
        im = sitk.GetImageFromArray(arr[0])
        im.SetSpacing(tuple(float(s) for s in image.spacing[:2]))
        im.SetOrigin(tuple(float(s) for s in image.origin[:2]))
        im.SetDirection((d[0], d[1], d[3], d[4]))
    else:
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing(tuple(float(s) for s in image.spacing))
        im.SetOrigin(tuple(float(s) for s in image.origin))
        im.SetDirection(d)
    im.SetMetaData("FPDenoise_modality", str(image.modality))
    if _suffix(path) == ".mhd":
        _write_mhd(im, path, overwrite, arr.nbytes)
        return
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            sitk.WriteImage(im, str(tmp), useCompression=_suffix(path) in (".nrrd", ".mha", ".nii.gz"))
        except RuntimeError as err:
            raise _diagnose_write_error(path, err, arr.nbytes) from err


def _write_mhd(im, path: Path, overwrite: bool, nbytes: int) -> None:
    """.mhd + .raw: written with their final names into a temp folder, then moved (data file first)."""
    import SimpleITK as sitk

    if path.exists() and not overwrite:
        raise OutputError(f"{path}: output exists (overwrite=False)")
    tmpdir = path.parent / f".{path.stem}{_TMP_TAG}{uuid.uuid4().hex[:10]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir.mkdir()
        sitk.WriteImage(im, str(tmpdir / path.name), useCompression=True)
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.suffix.lower() == ".mhd"):
            os.replace(f, path.parent / f.name)
    except OSError as err:
        raise _output_error(path, err) from err
    except RuntimeError as err:
        raise _diagnose_write_error(path, err, nbytes) from err
    finally:
        _remove(tmpdir)


def _png_target_dtype(arr: np.ndarray, like: Image | None):
    if arr.dtype in (np.uint8, np.uint16):
        return arr.dtype
    if like is not None and np.asarray(like.array).dtype in (np.uint8, np.uint16):
        return np.asarray(like.array).dtype
    if arr.dtype == bool:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16)


def _to_uint(arr: np.ndarray, dt, path: Path, clip: bool) -> np.ndarray:
    dt = np.dtype(dt)
    if arr.dtype == dt:
        return arr
    if arr.dtype == bool:
        return arr.astype(dt) * np.iinfo(dt).max
    info = np.iinfo(dt)
    v = np.rint(arr.astype(np.float64)) if arr.dtype.kind == "f" else arr.astype(np.int64)
    lo, hi = float(v.min()), float(v.max())
    if lo < info.min or hi > info.max:
        if not clip:
            raise InputError(f"{path}: values [{lo:g}, {hi:g}] do not fit {dt.name} [{info.min}, {info.max}]; "
                             "rescale first, pass clip=True, or write .tif/.nrrd")
        v = np.clip(v, info.min, info.max)
    return v.astype(dt)


def _write_png(image: Image, arr: np.ndarray, path: Path, like: Image | None, clip: bool, overwrite: bool,
               rescale: bool = False) -> None:
    from PIL import Image as PILImage

    if arr.shape[0] != 1:
        raise InputError(f"{path}: PNG holds one 2D image but the image has {arr.shape[0]} slices; "
                         "write .nrrd/.nii.gz/.mha or a DICOM folder")
    dt = np.dtype(_png_target_dtype(arr, like))
    if rescale and arr.dtype != bool:
        a = arr[0].astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        out = np.rint((a - lo) / (hi - lo) * np.iinfo(dt).max).astype(dt) if hi > lo else np.zeros(a.shape, dt)
    else:
        out = _to_uint(arr[0], dt, path, clip)
    with atomic_path(path, overwrite=overwrite) as tmp:
        im = PILImage.fromarray(np.ascontiguousarray(out))
        im.save(tmp, format="PNG")


def _write_tiff(image: Image, arr: np.ndarray, path: Path, overwrite: bool) -> None:
    import tifffile

    if arr.shape[0] != 1:
        raise InputError(f"{path}: TIFF output is 2D only but the image has {arr.shape[0]} slices; "
                         "write .nrrd/.nii.gz/.mha or a DICOM folder")
    a = arr[0]
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    sx, sy = float(image.spacing[0]), float(image.spacing[1])
    with atomic_path(path, overwrite=overwrite) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(a), resolution=(10.0 / sx, 10.0 / sy),
                         resolutionunit="CENTIMETER", description=f"FPDenoise modality={image.modality}",
                         metadata=None)


def _now() -> tuple[str, str]:
    t = _dt.datetime.now()
    return t.strftime("%Y%m%d"), t.strftime("%H%M%S.%f")


# ---- DICOM writing
_DROP_TAGS = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence", "FrameIncrementPointer", "LargestImagePixelValue", "SmallestImagePixelValue",
    "LargestPixelValueInSeries", "SmallestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "IconImageSequence", "DataSetTrailingPadding", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData", "PlanarConfiguration", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", "SourceImageSequence", "ModalityLUTSequence",
)


def _ds(x: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    x = float(x)
    if x == 0 or abs(x) < 1e-12:
        return "0"
    if x == round(x) and abs(x) < 1e15:
        return str(int(round(x)))
    return format_number_as_ds(x)


def _encode_values(arr: np.ndarray, tmpl) -> tuple[np.ndarray, str, str, int]:
    """Stored 16-bit values + (slope, intercept) DS strings + PixelRepresentation so that
    ``stored * slope + intercept`` gives back ``arr`` (exactly for integral data that fits,
    within slope/2 otherwise). Never wraps around."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    v = arr.astype(np.float64)
    integral = arr.dtype.kind in "iu" or bool(np.all(v == np.rint(v)))
    lo, hi = float(v.min()), float(v.max())
    ranges = {1: (-32768, 32767), 0: (0, 65535)}
    if tmpl is not None and integral:
        m = float(getattr(tmpl, "RescaleSlope", 1) or 1)
        b = float(getattr(tmpl, "RescaleIntercept", 0) or 0)
        pr = int(getattr(tmpl, "PixelRepresentation", 0) or 0)
        if m != 0:
            s = (v - b) / m
            rmin, rmax = ranges[pr]
            if np.all(s == np.rint(s)) and s.min() >= rmin and s.max() <= rmax:
                return s.astype(np.int16 if pr else np.uint16), _ds(m), _ds(b), pr
    if integral and lo >= -32768 and hi <= 32767:
        return v.astype(np.int16), "1", "0", 1
    if integral and lo >= 0 and hi <= 65535:
        return v.astype(np.uint16), "1", "0", 0
    # floats (saliency maps) or values beyond 16 bits: linear rescale onto int16
    m_s = _ds((hi - lo) / 65534.0) if hi > lo else "1"
    b_s = _ds((hi + lo) / 2.0)
    m, b = float(m_s), float(b_s)
    s = np.clip(np.rint((v - b) / m), -32768, 32767)
    return s.astype(np.int16), m_s, b_s, 1


def _encode_photometric(arr: np.ndarray, base) -> tuple[np.ndarray, str, str, int, int, str]:
    """:func:`_encode_values` plus ``(BitsStored, PhotometricInterpretation)`` for the written file.

    A MONOCHROME1 template keeps MONOCHROME1: the in-memory MONOCHROME2 values are flipped back over
    the template's stored range (same BitsStored, slope and intercept, so the window tags copied from
    the template keep their meaning and a re-read flips to the same values). When the result does not
    fit that range, MONOCHROME2 with the in-memory values is written instead: it displays the same.
    """
    arr = np.asarray(arr)
    mono1 = _monochrome1_range(base) if base is not None else None
    if mono1 is not None and arr.dtype.kind in "iu":
        flipped = _flip_monochrome1(arr, mono1)
        stored, slope, inter, pixrep = _encode_values(flipped, base)
        bits = int(getattr(base, "BitsStored", 0) or 16)
        same_rescale = (float(slope) == float(getattr(base, "RescaleSlope", 1) or 1)
                        and float(inter) == float(getattr(base, "RescaleIntercept", 0) or 0)
                        and pixrep == int(getattr(base, "PixelRepresentation", 0) or 0))
        smin, smax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if pixrep else (0, 2**bits - 1)
        if same_rescale and 1 <= bits <= 16 and (stored.size == 0 or (stored.min() >= smin and stored.max() <= smax)):
            return stored, slope, inter, pixrep, bits, "MONOCHROME1"
    stored, slope, inter, pixrep = _encode_values(arr, base)
    return stored, slope, inter, pixrep, 16, "MONOCHROME2"


def _new_dicom_base(image: Image, modality: str):
    """Minimal patient/study/equipment header for a DICOM written from a non-DICOM source."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    date, time = _now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Anonymous^FPDenoise"
    ds.PatientID = "FPDENOISE"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "FPDenoise"
    ds.PatientOrientation = ""
    if modality == "CT":
        ds.SOPClassUID, ds.Modality = _CT_STORAGE, "CT"
        ds.KVP = ""
        ds.AcquisitionNumber = ""
        ds.RescaleType = "HU"
    elif modality == "MR":
        ds.SOPClassUID, ds.Modality = _MR_STORAGE, "MR"
        ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"
        ds.ScanOptions, ds.MRAcquisitionType = "", "3D" if image.array.shape[0] > 1 else "2D"
        ds.EchoTime = ds.RepetitionTime = ds.EchoTrainLength = ""
        ds.MagneticFieldStrength = ""
    else:
        ds.SOPClassUID = _SC_STORAGE
        ds.Modality = "DX" if modality == "XR" else "OT"
        ds.ConversionType = "WSD"
    ds.SliceThickness = _ds(image.spacing[2])
    return ds


def _write_dicom(image: Image, arr: np.ndarray, path: Path, *, like: Image | None, description: str,
                 overwrite: bool, series_number: int | None, single_file: bool) -> None:
    import copy

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    nz = arr.shape[0]
    headers = (like.dicom_headers if like is not None and like.dicom_headers else None) or image.dicom_headers
    per_slice = bool(headers) and len(headers) == nz
    base = None if not headers else headers[0]
    stored, slope, inter, pixrep, bits_stored, photometric = _encode_photometric(arr, base)

    d = np.asarray(image.direction, dtype=float).reshape(3, 3)
    row, col, nrm = d[:, 0], d[:, 1], d[:, 2]
    sx, sy, sz = (float(x) for x in image.spacing)
    origin = np.asarray(image.origin, dtype=float)
    desc = description.strip() or "FPDenoise denoised"
    series_uid = generate_uid()
    date, time = _now()
    new_base = _new_dicom_base(image, image.modality) if base is None else None
    src_series = str(getattr(base, "SeriesInstanceUID", "") or "") if base is not None else ""
    if base is not None:
        try:
            default_number = int(getattr(base, "SeriesNumber", 0) or 0) + 1000
        except (TypeError, ValueError):
            default_number = 1000
    else:
        default_number = 1
    datasets = []
    for k in range(nz):
        tmpl = headers[k] if per_slice else base
        if tmpl is not None:
            ds = copy.deepcopy(tmpl)
            for name in _DROP_TAGS:
                if name in ds:
                    delattr(ds, name)
            for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x60FF]:  # overlays
                del ds[tag]
            sop_class = str(getattr(ds, "SOPClassUID", "") or _SC_STORAGE)
            if sop_class in _ENHANCED_TO_CLASSIC:
                sop_class = _ENHANCED_TO_CLASSIC[sop_class]
            elif int(getattr(tmpl, "NumberOfFrames", 1) or 1) > 1:
                sop_class = _SC_STORAGE
            ds.SOPClassUID = sop_class
            it = [str(x) for x in (ds.ImageType if "ImageType" in ds else [])]
            ds.ImageType = ["DERIVED", "SECONDARY"] + it[2:]
            if per_slice and "SOPInstanceUID" in tmpl:
                ref = Dataset()
                ref.ReferencedSOPClassUID = str(tmpl.SOPClassUID)
                ref.ReferencedSOPInstanceUID = str(tmpl.SOPInstanceUID)
                ds.SourceImageSequence = [ref]
            has_plane = "ImageOrientationPatient" in tmpl or "ImagePositionPatient" in tmpl or nz > 1
            has_plane = has_plane or int(getattr(tmpl, "NumberOfFrames", 1) or 1) > 1
        else:
            ds = copy.deepcopy(new_base)
            ds.ImageType = ["DERIVED", "SECONDARY"]
            has_plane = True
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = str(series_number if series_number is not None else default_number)
        ds.InstanceNumber = str(k + 1)
        ds.SeriesDescription = desc[:64]
        ds.DerivationDescription = (desc + (f" (from series {src_series})" if src_series else ""))[:1024]
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = pixrep
        ds.RescaleSlope, ds.RescaleIntercept = slope, inter
        if has_plane:
            ipp = origin + k * sz * nrm
            ds.ImagePositionPatient = [_ds(x) for x in ipp]
            ds.ImageOrientationPatient = [_ds(x) for x in (*row, *col)]
            if "SliceLocation" in ds:
                ds.SliceLocation = _ds(float(ipp @ nrm))
            if nz > 1 or "SliceThickness" not in ds:
                ds.SliceThickness = _ds(sz)
            if "SpacingBetweenSlices" in ds or nz > 1:
                ds.SpacingBetweenSlices = _ds(sz)
        tmpl_ps = None if tmpl is None else _vec(tmpl, "PixelSpacing", 2, path)
        if tmpl is None or (tmpl_ps is not None and bool(np.all(tmpl_ps > 0))):
            ds.PixelSpacing = [_ds(sy), _ds(sx)]
        elif "ImagerPixelSpacing" in ds and "PixelSpacing" not in ds:
            ds.ImagerPixelSpacing = [_ds(sy), _ds(sx)]
        # else: the source's spacing was unknown (read as ImagerPixelSpacing or 1.0 mm): its tags are
        # kept as they were, so an assumption never becomes a calibration in a patient file

        plane = np.ascontiguousarray(stored[k]).astype(stored.dtype.newbyteorder("<"), copy=False)
        ds.PixelData = plane.tobytes()
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        datasets.append(ds)

    def save(ds, fn: Path) -> None:
        if int(pydicom.__version__.split(".")[0]) >= 3:
            pydicom.dcmwrite(fn, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
        else:  # pydicom 2.4: the newest for Python 3.9 (Slicer 5.6/5.8); encoding set on the dataset
            ds.is_little_endian, ds.is_implicit_VR = True, False
            pydicom.dcmwrite(fn, ds, write_like_original=False)

    if single_file:
        with atomic_path(path, overwrite=overwrite) as tmp:
            save(datasets[0], tmp)
        return
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder (a DICOM series is written as a folder)")
    if path.is_dir():
        # only a previous DICOM series may be replaced: never swap away a folder holding other data
        others = [e.name for e in path.iterdir() if e.is_dir() or not _looks_like_dicom(e)]
        if others:
            raise OutputError(f"{path}: output folder holds non-DICOM content ({', '.join(sorted(others)[:3])}); "
                              "choose an empty or new folder")
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        for k, ds in enumerate(datasets):
            save(ds, tmp / f"IM{k + 1:05d}.dcm")
