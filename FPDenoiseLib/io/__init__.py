"""Reading and writing medical images: DICOM series/files, NRRD, NIfTI, MetaImage, PNG, TIFF.

Every reader returns an :class:`Image`: a ``(z, y, x)`` numpy array in original units (CT in HU)
plus ITK/LPS geometry. Every writer is atomic (temp name in the destination folder, then
``os.replace``; a DICOM series is written into a temp folder next to the target and renamed), so a
kill at any moment leaves either nothing / the old output or the complete new one.

Bad input raises :class:`~FPDenoiseLib.errors.InputError` with ``"<path>: <problem>"``; an output
that cannot be written raises :class:`~FPDenoiseLib.errors.OutputError`.

Example
-------
>>> img = read_image("ct_series/")                       # DICOM folder -> HU, LPS geometry  # doctest: +SKIP
>>> out = dataclasses.replace(img, array=denoised)  # doctest: +SKIP
>>> write_image(out, "ct_denoised/", like=img, description="FPDenoise denoised (model default)")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from .atomic import atomic_path
from .dicom_read import UnknownSpacingWarning, _read_dicom_files, _read_dicom_folder
from .dicom_write import _write_dicom
from .discovery import SeriesInfo, _looks_like_dicom, find_images, find_series
from .formats import _read_png, _read_sitk, _read_tiff, _write_png, _write_sitk, _write_tiff
from .image import (
    DICOM_EXTENSIONS,
    IDENTITY,
    IMAGE_EXTENSIONS,
    MIN_SIZE,
    RASTER_EXTENSIONS,
    VOLUME_EXTENSIONS,
    Image,
    _check_array,
    _norm_modality,
    _short,
    _suffix,
)

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
    "RASTER_EXTENSIONS",
    "DICOM_EXTENSIONS",
    "IDENTITY",
    "MIN_SIZE",
    "UnknownSpacingWarning",
]


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

    >>> img = read_image("chest.png");  img.array.shape, img.is_2d   # ((1, 512, 512), True)  # doctest: +SKIP
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

# --------------------------------------------------------------------------------------- writing
def _is_dicom_target(path: Path) -> bool:
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

    >>> write_image(img.with_array(den), "out/", like=img, description="FPDenoise denoised (model default)")  # doctest: +SKIP
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
        _write_png(arr, path, like, clip, overwrite, rescale)
    elif ext in (".tif", ".tiff"):
        _write_tiff(image, arr, path, overwrite)
    elif _is_dicom_target(path):
        _write_dicom(image, arr, path, like=like, description=description, overwrite=overwrite,
                     series_number=series_number, single_file=ext in DICOM_EXTENSIONS and arr.shape[0] == 1)
    else:
        raise InputError(f"{path}: unsupported output extension '{ext}' (use .nrrd, .nii, .nii.gz, .mha, .mhd, "
                         ".png, .tif, .dcm or a folder for a DICOM series)")
    return path
