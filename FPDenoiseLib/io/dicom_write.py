"""Writing DICOM: a derived series of the template's study (or a new study), one file per slice."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from ..errors import OutputError
from .atomic import atomic_path
from .dicom_read import _flip_monochrome1, _monochrome1_range, _vec
from .discovery import _looks_like_dicom
from .image import Image, _norm_modality

# SOP classes for DICOM written without a DICOM template
_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
_ENHANCED_TO_CLASSIC = {
    "1.2.840.10008.5.1.4.1.1.2.1": _CT_STORAGE,  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1": _MR_STORAGE,  # Enhanced MR
}


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

# display (VOI LUT) tags: meaningful only for values in the template's units
_VOI_TAGS = ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence")


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
    from pydicom.uid import generate_uid

    nz = arr.shape[0]
    headers = (like.dicom_headers if like is not None and like.dicom_headers else None) or image.dicom_headers
    per_slice = bool(headers) and len(headers) == nz
    base = None if not headers else headers[0]
    stored, slope, inter, pixrep, bits_stored, photometric = _encode_photometric(arr, base)

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
    # a map of another quantity (saliency, feature change: modality "OT") on an image template: the
    # template's window and rescale type describe its units (HU...) and would show the map as one grey
    other_units = base is not None and image.modality != _norm_modality(str(getattr(base, "Modality", "") or "OT"))
    datasets = []
    for k in range(nz):
        tmpl = headers[k] if per_slice else base
        ds, has_plane = _derived_header(tmpl, new_base, per_slice, nz)
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = str(series_number if series_number is not None else default_number)
        ds.InstanceNumber = str(k + 1)
        ds.SeriesDescription = desc[:64]
        ds.DerivationDescription = (desc + (f" (from series {src_series})" if src_series else ""))[:1024]
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        _set_geometry(ds, tmpl, image, k, nz, has_plane, path)
        _set_pixels(ds, stored[k], photometric, bits_stored, pixrep, slope, inter)
        if other_units:
            for name in _VOI_TAGS:
                if name in ds:
                    delattr(ds, name)
            if "RescaleType" in ds:
                ds.RescaleType = "US"  # unspecified
        datasets.append(ds)
    _save_series(datasets, path, overwrite, single_file)


def _derived_header(tmpl, new_base, per_slice: bool, nz: int):
    """A copy of the template slice's header made into a derived image (pixel, frame and overlay tags
    dropped; enhanced / multi-frame SOP classes turned into classic ones), or of ``new_base`` without
    a template. Returns ``(dataset, has_plane)``: whether to write the image-plane tags."""
    import copy

    from pydicom.dataset import Dataset

    if tmpl is None:
        ds = copy.deepcopy(new_base)
        ds.ImageType = ["DERIVED", "SECONDARY"]
        return ds, True
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
    return ds, has_plane


def _set_geometry(ds, tmpl, image: Image, k: int, nz: int, has_plane: bool, path: Path) -> None:
    """Image-plane tags of slice ``k`` from the image's LPS geometry, and its pixel spacing."""
    d = np.asarray(image.direction, dtype=float).reshape(3, 3)
    row, col, nrm = d[:, 0], d[:, 1], d[:, 2]
    sx, sy, sz = (float(x) for x in image.spacing)
    if has_plane:
        ipp = np.asarray(image.origin, dtype=float) + k * sz * nrm
        ds.ImagePositionPatient = [_ds(x) for x in ipp]
        ds.ImageOrientationPatient = [_ds(x) for x in (*row, *col)]
        if "SliceLocation" in ds:
            ds.SliceLocation = _ds(float(ipp @ nrm))
        if nz > 1 or "SliceThickness" not in ds:
            ds.SliceThickness = _ds(sz)
        if "SpacingBetweenSlices" in ds or nz > 1:
            ds.SpacingBetweenSlices = _ds(sz)
    tmpl_ps = None if tmpl is None else _template_pixel_spacing(tmpl, path)
    if tmpl is None or (tmpl_ps is not None and bool(np.all(tmpl_ps > 0))):
        ds.PixelSpacing = [_ds(sy), _ds(sx)]
    elif "ImagerPixelSpacing" in ds and "PixelSpacing" not in ds:
        ds.ImagerPixelSpacing = [_ds(sy), _ds(sx)]
    # else: the source's spacing was unknown (read as ImagerPixelSpacing or 1.0 mm): its tags are
    # kept as they were, so an assumption never becomes a calibration in a patient file


def _template_pixel_spacing(tmpl, path: Path) -> np.ndarray | None:
    """The template's PixelSpacing: top level, else (enhanced multi-frame) its Pixel Measures functional group."""
    ps = _vec(tmpl, "PixelSpacing", 2, path)
    for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if ps is not None:
            break
        groups = getattr(tmpl, name, None)
        pm = getattr(groups[0], "PixelMeasuresSequence", None) if groups else None
        ps = _vec(pm[0], "PixelSpacing", 2, path) if pm else None
    return ps


def _set_pixels(ds, plane: np.ndarray, photometric: str, bits_stored: int, pixrep: int, slope: str,
                inter: str) -> None:
    """Pixel module, rescale and pixel data of one slice (16 bits allocated, explicit VR little endian)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = pixrep
    ds.RescaleSlope, ds.RescaleIntercept = slope, inter
    plane = np.ascontiguousarray(plane).astype(plane.dtype.newbyteorder("<"), copy=False)
    ds.PixelData = plane.tobytes()
    ds["PixelData"].VR = "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\0" * 128


def _save(ds, fn: Path) -> None:
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(fn, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:  # pydicom 2.4: the newest for Python 3.9 (Slicer 5.6/5.8); encoding set on the dataset
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(fn, ds, write_like_original=False)


def _save_series(datasets: list, path: Path, overwrite: bool, single_file: bool) -> None:
    """One file, or a folder of ``IM00001.dcm``...; atomically, replacing only a previous DICOM series."""
    if single_file:
        with atomic_path(path, overwrite=overwrite) as tmp:
            _save(datasets[0], tmp)
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
            _save(ds, tmp / f"IM{k + 1:05d}.dcm")
