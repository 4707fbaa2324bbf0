"""Reading DICOM: series folders and single/multi-frame files -> :class:`Image` in modality units."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError
from .atomic import _is_hidden_or_tmp
from .discovery import _looks_like_dicom, _walk, find_series
from .image import RASTER_EXTENSIONS, VOLUME_EXTENSIONS, Image, _itk_msg, _norm_modality, _short, _suffix

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
            from . import read_image  # the package's dispatcher (late: it imports this module)

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
        ds = pydicom.dcmread(f, force=True)
    except Exception as err:
        raise InputError(f"{f}: corrupt or truncated DICOM ({_short(err)})") from err
    if not getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None):
        # no meta header (a bare data set): the pixel decoder needs the encoding the file was read with
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        enc = getattr(ds, "original_encoding", None)
        implicit, little = enc if enc and enc[0] is not None else (ds.is_implicit_VR, ds.is_little_endian)
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


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
    """``(positions or None, iop, pixel_spacing, thickness, ipp)`` for one (possibly enhanced multi-frame) file;
    ``ipp`` is the file's own ImagePositionPatient (None when absent)."""
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
    # a multi-frame file without per-frame positions keeps positions None: the caller stacks its frames
    # from ``ipp`` with the nominal thickness
    return positions, iop, ps, thick, ipp


def _frame_rescale(ds, n_frames: int, f: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ``(slopes, intercepts)`` of the Modality LUT: the file's RescaleSlope/Intercept, else
    (enhanced CT/MR/PET multi-frame) the Pixel Value Transformation of each frame's functional groups,
    per frame or shared."""

    def pair(item) -> tuple[float, float] | None:
        if item is None or ("RescaleSlope" not in item and "RescaleIntercept" not in item):
            return None
        try:
            return float(getattr(item, "RescaleSlope", 1) or 1), float(getattr(item, "RescaleIntercept", 0) or 0)
        except (TypeError, ValueError) as err:
            raise InputError(f"{f}: invalid RescaleSlope/RescaleIntercept ({_short(err)})") from err

    def pvt(group) -> tuple[float, float] | None:
        seq = getattr(group, "PixelValueTransformationSequence", None)
        return pair(seq[0]) if seq else None

    top = pair(ds)
    if top is not None:
        per = [top] * n_frames
    else:
        shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
        default = (pvt(shared[0]) if shared else None) or (1.0, 0.0)
        groups = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
        if groups and len(groups) == n_frames:
            per = [pvt(g) or default for g in groups]
        else:
            per = [default] * n_frames
    return np.array([p[0] for p in per]), np.array([p[1] for p in per])


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
        slope, inter = _frame_rescale(ds, n, f)
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
        slope_i, inter_i = first[7], first[8]
        headers = [ds]
        if positions is not None and len(positions) == arr.shape[0] and arr.shape[0] > 1:
            order, dz, origin = _sort_positions(positions, nrm, where, [f"frame {i + 1}" for i in range(len(positions))])
            arr, slope_i, inter_i = arr[order], slope_i[order], inter_i[order]
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
        slope_i = np.concatenate([s[7] for s in slices])
        inter_i = np.concatenate([s[8] for s in slices])
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
