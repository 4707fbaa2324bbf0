"""IO round trips on real files: DICOM series (pydicom-written), NRRD, NIfTI, MHA, PNG, TIFF."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from io_helpers import read_dicom_dir, rotation, tree_hash, write_ct_series
from PIL import Image as PILImage

from FPDenoiseLib.errors import InputError, OutputError
from FPDenoiseLib.io import Image, atomic_path, find_images, find_series, read_image, write_image

TESTDATA = Path(pydicom.__file__).parent / "data" / "test_files"  # bundled, never downloaded


def assert_geometry(img: Image, spacing, origin, direction, atol=1e-4):
    np.testing.assert_allclose(img.spacing, spacing, atol=atol)
    np.testing.assert_allclose(img.origin, origin, atol=atol)
    np.testing.assert_allclose(img.direction, direction, atol=atol)


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.fixture
def ct_series(tmp_path):
    hu, geom = write_ct_series(tmp_path / "ct", nz=5, ny=32, nx=32)
    return tmp_path / "ct", hu, geom


# ------------------------------------------------------------------------------------ DICOM
def test_read_dicom_series_sorts_by_position_and_applies_rescale(ct_series):
    folder, hu, g = ct_series
    before = tree_hash(folder)
    img = read_image(folder)
    assert img.array.dtype == np.int16 and img.array.shape == (5, 32, 32)
    np.testing.assert_array_equal(img.array, hu)
    assert img.array.min() == -1024
    assert_geometry(img, g["spacing"], g["origin"], g["direction"])
    assert img.modality == "CT" and img.source_format == "dicom" and not img.is_2d
    assert len(img.dicom_headers) == 5 and all("PixelData" not in h for h in img.dicom_headers)
    assert img.series_uid == g["series_uid"]
    # SimpleITK agrees on geometry and values
    ref = sitk_series(folder)
    np.testing.assert_allclose(ref.GetSpacing(), img.spacing, atol=1e-4)
    np.testing.assert_allclose(ref.GetOrigin(), img.origin, atol=1e-4)
    np.testing.assert_allclose(ref.GetDirection(), img.direction, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), hu)
    assert tree_hash(folder) == before  # input untouched


def test_derived_dicom_series_round_trip(ct_series, tmp_path):
    folder, hu, g = ct_series
    src = read_image(folder)
    den = src.array.copy()
    den[:, 10:20, 10:20] = -2000  # below the source's unsigned storage range: slope/intercept recomputed
    out = tmp_path / "denoised"
    write_image(src.with_array(den), out, like=src, description="FPDenoise denoised (model test-v1)")
    dss = read_dicom_dir(out)
    assert len(dss) == 5 and not [p for p in tmp_path.iterdir() if ".fpdtmp-" in p.name]
    src_sops = {h.SOPInstanceUID for h in src.dicom_headers}
    for ds in dss:
        assert ds.StudyInstanceUID == g["study_uid"] and ds.PatientID == "PID123"
        assert ds.PatientName == "Test^Phantom"
        assert ds.SeriesInstanceUID != g["series_uid"]
        assert ds.SOPInstanceUID not in src_sops
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "denoised" in ds.SeriesDescription and "test-v1" in ds.DerivationDescription
        assert ds.FrameOfReferenceUID == src.dicom_headers[0].FrameOfReferenceUID
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.BitsAllocated == 16 and ds.SourceImageSequence[0].ReferencedSOPInstanceUID in src_sops
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    assert len({ds.SOPInstanceUID for ds in dss}) == 5
    # pydicom: HU survive exactly through the modality LUT
    z = np.array([np.dot(np.array(ds.ImagePositionPatient, float), np.cross(ds.ImageOrientationPatient[:3],
                                                                             ds.ImageOrientationPatient[3:]))
                  for ds in dss])
    vol = np.stack([pydicom.pixels.apply_rescale(ds.pixel_array, ds) for ds in dss])[np.argsort(z)]
    np.testing.assert_array_equal(vol, den)
    # SimpleITK: identical geometry and values
    ref = sitk_series(out)
    np.testing.assert_allclose(ref.GetSpacing(), g["spacing"], atol=1e-4)
    np.testing.assert_allclose(ref.GetOrigin(), g["origin"], atol=1e-4)
    np.testing.assert_allclose(ref.GetDirection(), g["direction"], atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), den)
    # and our reader
    back = read_image(out)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, den)
    assert_geometry(back, g["spacing"], g["origin"], g["direction"])


def test_derived_dicom_keeps_template_rescale_when_it_fits(ct_series, tmp_path):
    folder, hu, _ = ct_series
    src = read_image(folder)
    write_image(src, tmp_path / "same", like=src)
    ds = read_dicom_dir(tmp_path / "same")[0]
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1 and ds.PixelRepresentation == 0
    np.testing.assert_array_equal(read_image(tmp_path / "same").array, hu)


def test_float_saliency_as_dicom_rescaled_int16(ct_series, tmp_path):
    folder, _, g = ct_series
    src = read_image(folder)
    sal = np.random.default_rng(1).random(src.array.shape).astype(np.float32) * 1e-3
    write_image(src.with_array(sal, modality="OT"), tmp_path / "sal", like=src, description="FPDenoise GB saliency")
    ds = read_dicom_dir(tmp_path / "sal")[0]
    assert ds.PixelRepresentation == 1 and float(ds.RescaleSlope) < 1e-6
    # the CT's window (40/400 HU) would show the map as one flat grey; the map is not in HU either
    assert "WindowCenter" not in ds and "WindowWidth" not in ds and ds.RescaleType != "HU"
    # the denoised image itself (same units) keeps the template's window
    write_image(src, tmp_path / "den", like=src, description="FPDenoise denoised")
    den = read_dicom_dir(tmp_path / "den")[0]
    assert den.WindowCenter == 40 and den.WindowWidth == 400 and den.RescaleType == "HU"
    back = read_image(tmp_path / "sal")
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, sal, atol=float(ds.RescaleSlope))
    assert_geometry(back, g["spacing"], g["origin"], g["direction"])


def test_dicom_from_non_dicom_source(tmp_path):
    rot = rotation(0.1, 0.2, -0.3)
    arr = np.random.default_rng(2).integers(-1024, 3000, (4, 16, 24)).astype(np.int16)
    img = Image(arr, (0.8, 0.6, 3.0), (10.0, -5.0, 7.5), tuple(rot.reshape(-1)), "CT")
    write_image(img, tmp_path / "vol.nrrd")
    nrrd = read_image(tmp_path / "vol.nrrd")
    write_image(nrrd, tmp_path / "dcm")  # no template: new study
    dss = read_dicom_dir(tmp_path / "dcm")
    assert dss[0].Modality == "CT" and dss[0].SOPClassUID == pydicom.uid.CTImageStorage
    assert len({d.StudyInstanceUID for d in dss}) == 1 and dss[0].PatientID
    back = read_image(tmp_path / "dcm")
    np.testing.assert_array_equal(back.array, arr)
    assert_geometry(back, img.spacing, img.origin, img.direction)
    ref = sitk_series(tmp_path / "dcm")
    np.testing.assert_allclose(ref.GetDirection(), img.direction, atol=1e-4)
    # MR and 2D X-ray -> single .dcm file
    mr = Image(np.arange(16 * 16, dtype=np.uint16).reshape(1, 16, 16) * 200, modality="MR", is_2d=True)
    write_image(mr, tmp_path / "mr.dcm")
    ds = pydicom.dcmread(tmp_path / "mr.dcm")
    assert ds.Modality == "MR" and ds.PixelRepresentation == 0  # > int16 range: stored unsigned
    back = read_image(tmp_path / "mr.dcm")
    np.testing.assert_array_equal(back.array, mr.array)
    assert back.is_2d and back.modality == "MR"
    xr = Image(np.full((1, 12, 10), 7, np.uint8), (0.15, 0.15, 1.0), modality="XR", is_2d=True)
    write_image(xr, tmp_path / "xr.dcm")
    back = read_image(tmp_path / "xr.dcm")
    assert back.modality == "XR" and back.is_2d and np.array_equal(back.array, xr.array)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "xr.dcm")))[0, 0, 0] == 7


def test_single_file_and_compressed_dicom():
    ct = read_image(TESTDATA / "CT_small.dcm")
    assert ct.is_2d and ct.array.shape == (1, 128, 128) and ct.modality == "CT"
    ref = pydicom.dcmread(TESTDATA / "CT_small.dcm")
    np.testing.assert_array_equal(ct.array[0], pydicom.pixels.apply_rescale(ref.pixel_array, ref))
    mr = read_image(TESTDATA / "MR_small.dcm")
    # JPEG-LS has no pydicom decoder here; SimpleITK/GDCM decodes it (lossless: identical values)
    jls = read_image(TESTDATA / "MR_small_jpeg_ls_lossless.dcm")
    np.testing.assert_array_equal(jls.array, mr.array)
    assert jls.array.dtype == mr.array.dtype
    np.testing.assert_array_equal(read_image(TESTDATA / "MR_small_jp2klossless.dcm").array, mr.array)
    np.testing.assert_array_equal(read_image(TESTDATA / "MR_small_bigendian.dcm").array, mr.array)


def test_multiframe_grayscale_dicom(tmp_path):
    frames = np.random.default_rng(3).integers(0, 1000, (3, 16, 16)).astype(np.uint16)
    ds = pydicom.dcmread(TESTDATA / "MR_small.dcm")
    ds.NumberOfFrames = 3
    ds.Rows = ds.Columns = 16
    ds.PixelRepresentation = 0
    ds.PixelData = frames.tobytes()
    ds.SpacingBetweenSlices = "2.0"
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    img = read_image(tmp_path / "mf.dcm")
    assert img.array.shape == (3, 16, 16) and not img.is_2d
    np.testing.assert_array_equal(img.array, frames)
    assert img.spacing[2] == pytest.approx(2.0)


def _enhanced_ct(path: Path, stored: np.ndarray, *, intercepts, shared_intercept=-1024.0) -> None:
    """An Enhanced CT multi-frame file as modern scanners write it: RescaleSlope/Intercept, PixelSpacing
    and ImagePositionPatient only in the (shared / per-frame) functional groups; frames stored top-down."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    nf, ny, nx = stored.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2.1", generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.PatientID = "CT", "P1"
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = ny, nx, nf
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    shared, pm, po, pvt = Dataset(), Dataset(), Dataset(), Dataset()
    pm.PixelSpacing, pm.SliceThickness = ["0.5", "0.6"], "2.0"
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = "1", str(shared_intercept), "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [pm], [po]
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(nf):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0, 0, -2.0 * k]  # top-down: read back in reverse frame order
        item.PlanePositionSequence = [pos]
        if intercepts[k] is not None:
            own = Dataset()
            own.RescaleSlope, own.RescaleIntercept = "1", str(intercepts[k])
            item.PixelValueTransformationSequence = [own]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multiframe_rescale_and_spacing_from_functional_groups(tmp_path):
    stored = np.random.default_rng(4).integers(0, 2000, (3, 16, 16)).astype(np.uint16)
    intercepts = [None, -1000.0, None]  # frame 2 overrides the shared -1024
    _enhanced_ct(tmp_path / "enh.dcm", stored, intercepts=intercepts)
    img = read_image(tmp_path / "enh.dcm")
    hu = stored.astype(np.int32) + np.array([-1024, -1000, -1024])[:, None, None]
    np.testing.assert_array_equal(img.array, hu[::-1])  # sorted bottom-up, each frame with its own rescale
    assert img.array.dtype == np.int16 and img.modality == "CT"
    assert img.spacing == pytest.approx((0.6, 0.5, 2.0))
    # the derived series keeps the HU and the pixel spacing (no 1.0 mm "unknown spacing" on re-reading)
    write_image(img, tmp_path / "out", like=img, description="denoised")
    ds = read_dicom_dir(tmp_path / "out")
    assert [float(v) for v in ds[0].PixelSpacing] == [0.5, 0.6]
    back = read_image(tmp_path / "out")
    np.testing.assert_array_equal(back.array, img.array)
    assert back.spacing == pytest.approx(img.spacing)


def test_dicom_without_preamble_and_meta_header(ct_series, tmp_path):
    """Bare data sets (no 128-byte preamble, no DICM, no meta header; implicit VR), named without a
    suffix as older scanners and some PACS exports write them: found in a folder and read like any DICOM."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    folder, hu, g = ct_series
    (tmp_path / "bare").mkdir()
    for i, f in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(f)
        del ds.file_meta
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, True
        write_dataset(buf, ds)
        (tmp_path / "bare" / f"I{i:04d}").write_bytes(buf.getvalue())
    img = read_image(tmp_path / "bare")
    np.testing.assert_array_equal(img.array, hu)
    assert_geometry(img, g["spacing"], g["origin"], g["direction"])
    one = read_image(tmp_path / "bare" / "I0000")
    assert one.is_2d and one.array.dtype == np.int16
    assert [s.uid for s in find_series(tmp_path / "bare")] == [g["series_uid"]]


def test_series_choice_in_mixed_folder(tmp_path):
    hu1, g1 = write_ct_series(tmp_path / "mix", nz=3, seed=1, prefix="A")
    hu2, g2 = write_ct_series(tmp_path / "mix", nz=4, seed=2, prefix="B", study_uid=g1["study_uid"])
    with pytest.raises(InputError, match="2 DICOM series") as ei:
        read_image(tmp_path / "mix")
    assert g1["series_uid"] in str(ei.value) and g2["series_uid"] in str(ei.value)
    np.testing.assert_array_equal(read_image(tmp_path / "mix", series_uid=g2["series_uid"]).array, hu2)
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "mix", series_uid="1.2.3")


# ------------------------------------------------------------------------------------ volumes
@pytest.mark.parametrize("ext", [".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".nhdr"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_volume_round_trip(tmp_path, ext, dtype):
    rot = rotation(0.4, 0.1, -0.2)
    arr = (np.random.default_rng(4).standard_normal((5, 32, 32)) * 500).astype(dtype)
    img = Image(arr, (0.5, 0.75, 2.0), (-100.0, 20.5, 3.25), tuple(rot.reshape(-1)), "CT")
    out = tmp_path / f"vol{ext}"
    assert write_image(img, out) == out
    back = read_image(out)
    assert back.array.dtype == arr.dtype
    np.testing.assert_array_equal(back.array, arr)
    assert_geometry(back, img.spacing, img.origin, img.direction, atol=1e-5)
    assert back.modality == ("OT" if ".nii" in ext else "CT")
    assert read_image(out, modality="CT").modality == "CT"
    # a detached header's data file gets its final name too (not a hidden temp name the header points to)
    data = {".mhd": ["vol.zraw"], ".nhdr": ["vol.raw.gz"]}.get(ext, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name] + data)
    write_image(img, out)  # overwriting replaces both files, leaves nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name] + data)


def test_2d_volume_formats_stay_2d(tmp_path):
    img = Image(np.arange(100, dtype=np.float32).reshape(1, 10, 10), (0.2, 0.3, 1.0), modality="XR", is_2d=True)
    write_image(img, tmp_path / "x.nrrd")
    back = read_image(tmp_path / "x.nrrd")
    assert back.is_2d and back.array.shape == (1, 10, 10)
    np.testing.assert_allclose(back.spacing, (0.2, 0.3, 1.0))


# ------------------------------------------------------------------------------------ PNG / TIFF
@pytest.mark.parametrize("dtype,hi", [(np.uint8, 255), (np.uint16, 65535)])
def test_png_round_trip(tmp_path, dtype, hi):
    arr = np.random.default_rng(5).integers(0, hi + 1, (1, 24, 40)).astype(dtype)
    PILImage.fromarray(arr[0]).save(tmp_path / "in.png")
    img = read_image(tmp_path / "in.png")
    assert img.is_2d and img.modality == "XR" and img.array.dtype == dtype
    np.testing.assert_array_equal(img.array, arr)
    write_image(img, tmp_path / "out.png")
    back = read_image(tmp_path / "out.png")
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, arr)


def test_png_write_float_and_overflow(tmp_path):
    like = Image(np.zeros((1, 8, 8), np.uint8), is_2d=True)
    f = Image(np.full((1, 8, 8), 100.4, np.float32), modality="XR", is_2d=True)
    write_image(f, tmp_path / "f.png", like=like)
    assert read_image(tmp_path / "f.png").array.dtype == np.uint8
    assert read_image(tmp_path / "f.png").array[0, 0, 0] == 100
    big = Image(np.full((1, 8, 8), 300.0, np.float32), modality="XR", is_2d=True)
    with pytest.raises(InputError, match=r"do not fit uint8"):
        write_image(big, tmp_path / "big.png", like=like)
    assert not (tmp_path / "big.png").exists()
    write_image(big, tmp_path / "big.png", like=like, clip=True)
    assert read_image(tmp_path / "big.png").array.max() == 255
    neg = Image(np.full((1, 8, 8), -5, np.int16), is_2d=True)
    with pytest.raises(InputError, match="uint16"):
        write_image(neg, tmp_path / "neg.png")


def test_png_float_saliency_is_stretched(tmp_path):
    sal = np.linspace(0, 2e-3, 64, dtype=np.float32).reshape(1, 8, 8)
    like = Image(np.zeros((1, 8, 8), np.uint8), is_2d=True)
    write_image(Image(sal, modality="OT", is_2d=True), tmp_path / "s.png", like=like)
    back = read_image(tmp_path / "s.png").array
    assert back.dtype == np.uint8 and back.min() == 0 and back.max() == 255
    np.testing.assert_allclose(back[0], sal[0] / 2e-3 * 255, atol=0.51)
    with pytest.raises(InputError):  # same map in image units (not "OT"): no silent stretch
        write_image(Image(sal * 1e6, modality="XR", is_2d=True), tmp_path / "x.png", like=like)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_tiff_round_trip(tmp_path, dtype):
    arr = (np.random.default_rng(6).random((1, 20, 30)) * 200).astype(dtype)
    img = Image(arr, (0.143, 0.15, 1.0), modality="XR", is_2d=True)
    write_image(img, tmp_path / "x.tif")
    back = read_image(tmp_path / "x.tif")
    assert back.array.dtype == dtype and back.is_2d
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.spacing[:2], (0.143, 0.15), rtol=1e-6)


def test_raster_refuses_volumes(tmp_path):
    vol = Image(np.zeros((3, 16, 16), np.uint8))
    for name in ("v.png", "v.tif"):
        with pytest.raises(InputError, match="3 slices"):
            write_image(vol, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ discovery
def test_find_series_and_images_nested_mixed(tmp_path):
    root = tmp_path / "pacs"
    _, g1 = write_ct_series(root / "p1" / "study" / "s1", nz=3, seed=1)
    _, g2 = write_ct_series(root / "p1" / "mixed", nz=3, seed=2, prefix="A")
    _, g3 = write_ct_series(root / "p1" / "mixed", nz=2, seed=3, prefix="B")
    # two single-file X-ray series side by side, without .dcm suffix
    for i in range(2):
        _, gx = write_ct_series(root / "xr", nz=1, seed=10 + i, prefix=f"X{i}_")
        (root / "xr" / f"X{i}_0000.dcm").rename(root / "xr" / f"IMG{i}")
    (root / "p1" / "README.txt").write_text("not an image")
    (root / "p1" / "study" / "s1" / "DICOMDIR.bak").write_bytes(b"\0" * 300)
    pydicom.dcmread(TESTDATA / "rtplan.dcm").save_as(root / "p1" / "rtplan.dcm")  # non-image DICOM
    Image(np.zeros((2, 8, 8), np.int16)).__class__  # noqa: B018
    write_image(Image(np.zeros((2, 8, 8), np.int16)), root / "vols" / "a.nii.gz")
    write_image(Image(np.zeros((1, 8, 8), np.uint8), is_2d=True), root / "vols" / "b.png")
    write_image(Image(np.zeros((2, 8, 8), np.int16)), root / "vols" / "c.mhd")

    series = find_series(root)
    uids = {s.uid for s in series}
    assert {g1["series_uid"], g2["series_uid"], g3["series_uid"]} <= uids and len(series) == 5
    by_uid = {s.uid: s for s in series}
    assert by_uid[g1["series_uid"]].n_files == 3 and by_uid[g3["series_uid"]].n_files == 2
    assert by_uid[g1["series_uid"]].folder == root / "p1" / "study" / "s1"
    for s in series:
        assert read_image(s.folder, series_uid=s.uid).array.shape[0] == s.n_files

    found = {str(p.relative_to(root)) for p in find_images(root)}
    assert found == {"p1/study/s1", "p1/mixed", "xr/IMG0", "xr/IMG1", "vols/a.nii.gz", "vols/b.png", "vols/c.mhd"}
    assert find_series(root / "vols") == []


# ------------------------------------------------------------------------------------ atomic / output safety
def test_atomic_path_cleans_up_on_error(tmp_path):
    target = tmp_path / "x.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


def test_refuses_to_overwrite_input(tmp_path, ct_series):
    folder, _, _ = ct_series
    before = tree_hash(folder)
    src = read_image(folder)
    with pytest.raises(OutputError, match="overwrite the input"):
        write_image(src, folder, like=src)
    with pytest.raises(OutputError, match="overwrite the input"):
        write_image(src, folder.parent, like=src)  # would replace the folder holding the input
    nrrd = tmp_path / "v.nrrd"
    write_image(src, nrrd)
    before_nrrd = tree_hash(nrrd)
    img = read_image(nrrd)
    with pytest.raises(OutputError):
        write_image(img, nrrd)
    assert tree_hash(folder) == before and tree_hash(nrrd) == before_nrrd


def test_existing_output_folder_needs_overwrite(tmp_path):
    img = Image(np.zeros((2, 8, 8), np.int16), modality="CT")
    out = tmp_path / "dcm"
    write_image(img, out)
    first = tree_hash(out)
    with pytest.raises(OutputError, match="exists"):
        write_image(img, out, overwrite=False)
    assert tree_hash(out) == first
    write_image(img.with_array(img.array + 5), out)
    assert tree_hash(out) != first and len(list(out.iterdir())) == 2
    assert np.all(read_image(out).array == 5)


_RLIMIT_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from FPDenoiseLib.io import Image, write_image
    from FPDenoiseLib.errors import OutputError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # let write() fail with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
    shape = (1, 64, 64) if sys.argv[1].endswith((".png", ".tif")) else (3, 32, 32)
    arr = np.random.default_rng(0).integers(0, 60000, shape).astype(np.uint16)
    img = Image(arr, modality="CT", is_2d=shape[0] == 1)
    try:
        write_image(img, sys.argv[1])
    except OutputError as e:
        print("OUTPUTERROR", e)
    """)


@pytest.mark.parametrize("name", ["out.nrrd", "out.png", "dcm_out", "out.tif"])
def test_disk_full_leaves_nothing(tmp_path, name):
    """A real write failure (file-size limit -> EFBIG, like a full disk) gives OutputError, no partial file."""
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    r = subprocess.run([sys.executable, "-c", _RLIMIT_SCRIPT, str(out_dir / name)], capture_output=True, text=True,
                       timeout=120)
    assert "OUTPUTERROR" in r.stdout, r.stdout + r.stderr
    assert str(out_dir / name) in r.stdout and "too large" in r.stdout
    assert list(out_dir.iterdir()) == []


_PERM_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from FPDenoiseLib.errors import OutputError
    from FPDenoiseLib.io import Image, write_image
    names = ("x.nrrd", "dcm", "x.png", "x.mhd")
    img = Image(np.zeros((1, 8, 8), np.uint8), is_2d=True)
    if os.geteuid() == 0:  # root ignores directory modes: warm up lazy imports, then drop to 'nobody'
        for name in names:
            write_image(img, os.path.join(sys.argv[2], name))
        os.setgid(65534)
        os.setuid(65534)
    for name in names:
        try:
            write_image(img, os.path.join(sys.argv[1], name))
            print("WROTE", name)
        except OutputError as e:
            print("OUTPUTERROR", e)
    """)


def test_no_permission(tmp_path):
    img = Image(np.zeros((2, 8, 8), np.int16))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        write_image(img, blocker / "sub" / "x.nrrd")  # parent is a file
    # a read-only folder; pytest's tmp root is 0700 (unreachable for 'nobody'), so use a world-readable one
    base = Path(tempfile.mkdtemp(prefix="fpd-perm-"))
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        r = subprocess.run([sys.executable, "-c", _PERM_SCRIPT, str(ro), str(tmp_path)], capture_output=True, text=True, timeout=120)
        lines = r.stdout.splitlines()
        assert len(lines) == 4 and all("permission denied" in ln for ln in lines), r.stdout + r.stderr
        assert list(ro.iterdir()) == []
    finally:
        (base / "ro").chmod(0o755)
        shutil.rmtree(base)
