"""Real DICOM files for the IO tests, written with pydicom (no mocks), and small test images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def rotation(ax: float = 0.3, ay: float = -0.2, az: float = 0.5) -> np.ndarray:
    """A proper rotation matrix (columns = row, column and slice-normal directions)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def ct_dataset(stored: np.ndarray, *, ipp, iop, pixel_spacing=(0.7, 0.9), thickness=2.5, intercept=-1024.0,
               slope=1.0, series_uid=None, study_uid=None, instance=1, modality="CT", signed=False,
               sop_class=CTImageStorage, frame_uid=None) -> Dataset:
    """One classic CT slice (uncompressed, explicit VR LE) with the given stored values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "PID123"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = frame_uid or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "S1", "ACC1"
    ds.Modality = modality
    ds.SeriesNumber = 3
    ds.SeriesDescription = "Abdomen 2.5mm"
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    ds.PixelSpacing = [str(pixel_spacing[0]), str(pixel_spacing[1])]
    ds.SliceThickness = str(thickness)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = str(intercept)
    ds.RescaleSlope = str(slope)
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def write_ct_series(folder: Path, *, nz=5, ny=32, nx=32, spacing=(0.9, 0.7, 2.5), origin=(-12.5, 30.0, 101.25),
                    rot=None, intercept=-1024.0, seed=0, series_uid=None, study_uid=None, names="reverse",
                    gap_at: int | None = None, prefix="IM") -> tuple[np.ndarray, dict]:
    """Write a CT series (one file per slice) and return (expected HU (z, y, x) int16, geometry).

    Files are named in reverse slice order and InstanceNumbers scrambled, so sorting must use
    ImagePositionPatient. ``gap_at`` shifts every slice from that index on by an extra spacing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rot = rotation() if rot is None else rot
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 2500, size=(nz, ny, nx)).astype(np.uint16)
    stored[:, :4, :4] = 0  # air at -1024 HU
    r, c, n = rot[:, 0], rot[:, 1], rot[:, 2]
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    order = list(range(nz))[::-1] if names == "reverse" else list(range(nz))
    for fi, k in enumerate(order):
        kk = k + (1 if gap_at is not None and k >= gap_at else 0)
        ipp = np.asarray(origin) + kk * spacing[2] * n
        ds = ct_dataset(stored[k], ipp=ipp, iop=(*r, *c), pixel_spacing=(spacing[1], spacing[0]),
                        thickness=spacing[2], intercept=intercept, series_uid=series_uid, study_uid=study_uid,
                        instance=(7 * k) % nz + 1, frame_uid=frame_uid)
        ds.save_as(folder / f"{prefix}{fi:04d}.dcm", enforce_file_format=True)
    hu = (stored.astype(np.int32) + int(intercept)).astype(np.int16)
    geom = {"spacing": spacing, "origin": tuple(origin), "direction": tuple(rot.reshape(-1)),
            "series_uid": series_uid, "study_uid": study_uid}
    return hu, geom


def tree_hash(path: Path) -> dict[str, str]:
    """sha256 of every file below ``path`` (or of the file itself), keyed by relative path."""
    path = Path(path)
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def read_dicom_dir(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(Path(folder).iterdir())]


def write_chest_cr(path: Path, *, photometric: str = "MONOCHROME1", pixel_spacing=("0", "0"),
                   imager_pixel_spacing=None, ny: int = 48, nx: int = 40) -> np.ndarray:
    """A chest CR like the public conformance file of issue 9 (12-bit, MONOCHROME1, ``PixelSpacing``
    present but ``[0, 0]``, no ``ImagerPixelSpacing``); returns the stored values.

    Written uncompressed (explicit VR LE): the real file is JPEG 2000, but decoding that needs an
    optional plugin (pylibjpeg-openjpeg / GDCM), and the quirks under test are header-level, not
    codec-level. Air is stored high and a "bone" disc low, as MONOCHROME1 stores them (min = white).
    ``pixel_spacing=None`` leaves the tag out.
    """
    y, x = np.mgrid[:ny, :nx]
    stored = np.full((ny, nx), 3800, np.uint16)  # air: black in MONOCHROME1
    stored[((y - ny / 2) / (ny * 0.4)) ** 2 + ((x - nx / 2) / (nx * 0.35)) ** 2 < 1] = 2500  # soft tissue
    stored[np.hypot(y - ny / 2, x - nx / 2) < ny * 0.12] = 300  # bone: white in MONOCHROME1
    stored = stored + np.random.default_rng(3).integers(0, 60, stored.shape).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.PatientName, ds.PatientID = "Chest^CR", "CR001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined = "CHEST"
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_pixel_spacing)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return stored


def noisy_ct_phantom(n: int = 64, *, sd_hu: float = 60.0, correlated: bool = True, seed: int = 0) -> np.ndarray:
    """A disc of soft tissue (40 HU) in air (-1000 HU), float32 HU, with noise of SD ``sd_hu`` inside the body:
    a CT scanner's kind (filtered back-projection noise of a sharp kernel, ``ct_correlated`` at a cutoff of
    0.5 cycles/pixel) or white Gaussian noise."""
    from FPDenoiseLib.noise import CTCorrelatedNoise

    yy, xx = np.mgrid[:n, :n]
    body = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.44 * n) ** 2
    if correlated:
        noise = CTCorrelatedNoise(sigma=sd_hu, cutoff=0.5, seed=seed)(np.zeros((n, n), np.float32))
    else:
        noise = np.random.default_rng(seed).normal(0.0, sd_hu, (n, n))
    return np.where(body, 40.0 + noise, -1000.0).astype(np.float32)


def real_ct_with_white_noise(fraction: float = 0.02, *, seed: int = 0) -> np.ndarray:
    """The committed real chest CT slice (HU) with white Gaussian noise of SD ``fraction`` of its range (float64):
    what ``Denoiser("auto")`` hands to the white-noise CT model."""
    from FPDenoiseLib.inference import resources_dir
    from FPDenoiseLib.io import read_image

    real = np.asarray(read_image(resources_dir() / "TestData" / "real_ct_lung1_slice.nrrd").array,
                      dtype=np.float32).squeeze()
    return real + np.random.default_rng(seed).normal(0.0, fraction * float(real.max() - real.min()), real.shape)
