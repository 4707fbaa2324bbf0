"""The :class:`Image` container, the file formats' names and the checks every reader applies."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

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
MIN_SIZE = 8  # smallest in-plane size (pixels) a network / noise model can work with


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

# --------------------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    """Lower-case suffix, ``.nii.gz`` treated as one."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


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


def _norm_modality(m: str) -> str:
    m = (m or "").upper().strip()
    if m in ("CT", "MR", "OT"):
        return m
    if m in _XR_MODALITIES:
        return "XR"
    return "OT"  # NM, PT, US, RTDOSE...: no modality-specific handling
