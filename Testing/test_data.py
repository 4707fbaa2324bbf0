"""Tests for FPDenoiseLib.data: slice loading from real files, patch sampling, the paper protocol
readers on small generated folders of the datasets' layouts, and the phantoms' physics."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from FPDenoiseLib.data import (
    FixedPatchSet,
    PatchSampler,
    Slice,
    load_clean_slices,
    pad_to_min,
    paper_protocol_slices,
    split_by_patient,
    synthetic_ct_slice,
    synthetic_ct_volume,
    synthetic_xray,
)
from FPDenoiseLib.errors import InputError
from FPDenoiseLib.intensity import DEFAULT_POLICY

LO, HI = DEFAULT_POLICY["ct_window"]


def _write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    modality="CT",
    patient="P1",
    series_uid=None,
    z=0.0,
    instance=1,
    slope=1.0,
    intercept=-1024.0,
) -> None:
    """A real, minimal single-frame DICOM file (explicit VR little endian) written with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient
    ds.PatientName = patient
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyDate = datetime.date.today().strftime("%Y%m%d")
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _dicom_series(folder: Path, hu: np.ndarray, patient: str = "P1") -> None:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    for z, sl in enumerate(hu):
        _write_dicom(
            folder / f"IM{z:03d}.dcm",
            (sl + 1024).astype(np.uint16),
            patient=patient,
            series_uid=uid,
            z=2.0 * z,
            instance=z + 1,
        )


def _write_nrrd(path: Path, arr: np.ndarray, modality: str | None = None) -> None:
    img = sitk.GetImageFromArray(arr)
    if modality:
        img.SetMetaData("FPDenoise_modality", modality)
    sitk.WriteImage(img, str(path), True)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    vol = synthetic_ct_volume("chest", n_slices=4, size=64, seed=3)
    vol[0] = -1000  # an air-only slice: must be skipped
    _dicom_series(root / "patientA" / "series1", np.rint(vol))
    _write_nrrd(
        root / "abdomen.nrrd", np.rint(synthetic_ct_slice("abdomen", 64, seed=4)).astype(np.int16)[None]
    )
    xr = synthetic_xray(64, seed=5)
    PILImage.fromarray(xr.astype(np.uint16)).save(root / "xray.png")
    return root


def test_load_folder_mixed_formats(mixed_folder: Path) -> None:
    slices = load_clean_slices(mixed_folder)
    by_src = {}
    for s in slices:
        by_src.setdefault(Path(s.source).name, []).append(s)
        assert s.array.dtype == np.float32 and s.array.ndim == 2
    assert set(by_src) == {"series1", "abdomen.nrrd", "xray.png"}
    # DICOM series: 4 slices, the air-only one skipped; CT -> HU window
    dcm = by_src["series1"]
    assert [s.index for s in dcm] == [1, 2, 3] and all(s.modality == "CT" for s in dcm)
    assert dcm[0].normalizer.kind == "window" and dcm[0].patient == "P1"
    air = dcm[0].array.min()
    assert abs(air - (-1000 - LO) / (HI - LO)) < 0.01  # air maps to (-1000 - lo) / (hi - lo)
    # NRRD without a modality tag but HU values: recognised as CT
    assert by_src["abdomen.nrrd"][0].modality == "CT"
    # PNG X-ray: percentile normalisation into ~[0, 1]
    xr = by_src["xray.png"][0]
    assert xr.modality == "XR" and xr.normalizer.kind == "percentile"
    assert np.percentile(xr.array, 0.5) == pytest.approx(0.0, abs=1e-3)
    assert np.percentile(xr.array, 99.5) == pytest.approx(1.0, abs=1e-3)


def test_load_max_slices_reproducible_and_errors(mixed_folder: Path, tmp_path: Path) -> None:
    a = load_clean_slices(mixed_folder, max_slices_per_volume=2, seed=7)
    b = load_clean_slices(mixed_folder, max_slices_per_volume=2, seed=7)
    assert [(s.source, s.index) for s in a] == [(s.source, s.index) for s in b]
    assert sum(Path(s.source).name == "series1" for s in a) <= 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    with pytest.raises(InputError, match="no usable training slices"):
        load_clean_slices(empty)
    with pytest.raises(InputError, match="does not exist"):
        load_clean_slices(tmp_path / "missing")
    with pytest.raises(InputError, match="no usable"):  # images smaller than min_size
        load_clean_slices(mixed_folder / "xray.png", min_size=128)


def _slices(n=3, seed=0) -> list[Slice]:
    rng = np.random.default_rng(seed)
    shapes = [(80, 100), (70, 70), (20, 30)][:n]  # the last is smaller than the patch
    return [Slice(rng.random(s, dtype=np.float32), f"s{i}", 0, "OT") for i, s in enumerate(shapes)]


def test_patch_sampler_shapes_determinism_resume() -> None:
    sl = _slices()
    s1 = PatchSampler(sl, patch_size=32, batch_size=5, seed=11)
    s2 = PatchSampler(sl, patch_size=32, batch_size=5, seed=11)
    b1 = [s1.sample() for _ in range(3)]
    assert b1[0].shape == (5, 1, 32, 32) and b1[0].dtype == np.float32
    assert all(np.array_equal(x, y) for x, y in zip(b1, [s2.sample() for _ in range(3)]))
    state = s1.state_dict()
    cont = [s1.sample() for _ in range(4)]
    s3 = PatchSampler(sl, patch_size=32, batch_size=5, seed=999)  # seed is overridden by the state
    s3.load_state_dict(state)
    assert s3.step == 3
    assert all(np.array_equal(x, y) for x, y in zip(cont, [s3.sample() for _ in range(4)]))
    assert not np.array_equal(PatchSampler(sl, patch_size=32, batch_size=5, seed=12).sample(), b1[0])
    with pytest.raises(InputError, match="does not match"):
        PatchSampler(sl, patch_size=16, batch_size=5).load_state_dict(state)


def test_patch_sampler_index_extract_and_augment() -> None:
    sl = _slices()
    s = PatchSampler(sl, patch_size=32, batch_size=64, seed=1)
    batch, info = s.sample_with_index()
    assert np.array_equal(s.extract(info), batch)
    assert set(np.unique(info["rot"])) == {0, 1, 2, 3} and set(np.unique(info["flip"])) == {0, 1}
    # every patch is a (rotated/flipped) crop of its slice: check one un-augmented patch exactly
    plain = PatchSampler(sl, patch_size=32, batch_size=8, seed=2, augment=False)
    b, inf = plain.sample_with_index()
    k = int(np.argmax([sl[i].array.shape[0] >= 32 for i in inf["slice"]]))
    src = sl[int(inf["slice"][k])].array
    y, x = int(inf["y"][k]), int(inf["x"][k])
    assert np.array_equal(b[k, 0], src[y : y + 32, x : x + 32])


def test_pad_small_slices_reflect() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = pad_to_min(a, 10)
    assert p.shape[0] >= 10 and p.shape[1] >= 10
    assert set(np.unique(p)) <= set(np.unique(a))  # reflection only reuses existing values
    assert pad_to_min(np.ones((1, 1)), 4).shape == (4, 4)
    big = np.zeros((40, 50))
    assert pad_to_min(big, 32) is big or pad_to_min(big, 32).shape == (40, 50)


def test_fixed_patch_set() -> None:
    sl = _slices()
    bank = FixedPatchSet(sl, n_patches=20, patch_size=16, seed=3)
    again = FixedPatchSet(sl, n_patches=20, patch_size=16, seed=3)
    assert bank.patches.shape == (20, 1, 16, 16) and np.array_equal(bank.patches, again.patches)
    seen = []
    for idx, p in bank.batches(6, rng=0):
        assert np.array_equal(p, bank.patches[idx])
        seen += list(idx)
    assert sorted(seen) == list(range(20))  # one epoch visits every entry once
    idx, p = bank.sample(4, rng=np.random.default_rng(1))
    assert len(set(idx.tolist())) == 4 and np.array_equal(p, bank[idx])
    # blank slices give no blank patches when a textured one exists
    flat = Slice(np.zeros((40, 40), np.float32), "air", 0, "CT")
    bank2 = FixedPatchSet([flat, sl[0]], n_patches=10, patch_size=16, seed=0)
    assert (bank2.patches.reshape(10, -1).std(axis=1) > 1e-3).all()


def test_split_by_patient_no_overlap() -> None:
    items = [(f"p{i % 7}", i) for i in range(50)]
    tr, te = split_by_patient(items, key=lambda t: t[0], test_fraction=0.2, seed=0)
    assert len(tr) + len(te) == 50 and tr and te
    assert not ({t[0] for t in tr} & {t[0] for t in te})
    assert len(te) >= 10
    assert split_by_patient(items, key=lambda t: t[0], test_fraction=0.2, seed=0) == (tr, te)
    with pytest.raises(InputError, match="only 1 patient"):
        split_by_patient([("a", 1), ("a", 2)], key=lambda t: t[0], test_fraction=0.5, seed=0)


def test_paper_layout_lidc(tmp_path: Path) -> None:
    for p in range(4):
        vol = np.rint(synthetic_ct_volume("chest", n_slices=3, size=48, seed=p))
        _dicom_series(
            tmp_path / f"LIDC-IDRI-{p + 1:04d}" / "1.3.6.1.study" / "1.3.6.1.series",
            vol,
            patient=f"LIDC-IDRI-{p + 1:04d}",
        )
    # LIDC also has radiograph series and XML annotations: must be ignored
    cr = tmp_path / "LIDC-IDRI-0001" / "1.3.6.1.study" / "cr"
    cr.mkdir()
    _write_dicom(cr / "1.dcm", np.full((48, 48), 500), modality="CR", patient="LIDC-IDRI-0001")
    (tmp_path / "LIDC-IDRI-0001" / "1.3.6.1.study" / "1.3.6.1.series" / "069.xml").write_text("<x/>")
    train, test = paper_protocol_slices(tmp_path, "lidc", n_train=6, n_test=3, size=32, seed=0)
    assert len(train) == 6 and len(test) == 3
    assert all(s.array.shape == (32, 32) and s.modality == "CT" for s in train + test)
    assert not ({s.patient for s in train} & {s.patient for s in test})
    assert "cr" not in {Path(s.source).parent.name for s in train + test}
    again = paper_protocol_slices(tmp_path, "lidc", n_train=6, n_test=3, size=32, seed=0)
    assert [s.source for s in again[0]] == [s.source for s in train]


def test_paper_layout_rsna(tmp_path: Path) -> None:
    for i in range(6):
        xr = synthetic_xray(40, seed=i)
        _write_dicom(
            tmp_path / f"0004cfab-14fd-4e49-80ba-63a80b6bddd{i}.dcm",
            xr,
            modality="CR",
            patient=f"pat{i}",
            slope=1.0,
            intercept=0.0,
        )
    train, test = paper_protocol_slices(tmp_path, "rsna", n_train=4, n_test=2, size=24, seed=1)
    assert len(train) == 4 and len(test) == 2
    assert all(s.array.shape == (24, 24) and s.modality == "XR" for s in train + test)
    assert not ({s.patient for s in train} & {s.patient for s in test})


def test_paper_layout_lits(tmp_path: Path) -> None:
    for i in range(3):
        vol = np.rint(synthetic_ct_volume("abdomen", n_slices=4, size=40, seed=i)).astype(np.int16)
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / f"volume-{i}.nii"))
        sitk.WriteImage(
            sitk.GetImageFromArray((vol > 100).astype(np.uint8)), str(tmp_path / f"segmentation-{i}.nii")
        )
    train, test = paper_protocol_slices(tmp_path, "lits", n_train=5, n_test=2, size=32, seed=0)
    assert len(train) == 5 and len(test) == 2
    assert all("volume-" in Path(s.source).name for s in train + test)
    assert all(s.modality == "CT" and s.array.shape == (32, 32) for s in train)
    assert not ({s.patient for s in train} & {s.patient for s in test})
    with pytest.raises(InputError, match="LIDC"):
        paper_protocol_slices(tmp_path, "lidc")
    with pytest.raises(InputError, match="unknown dataset layout"):
        paper_protocol_slices(tmp_path, "kaggle")


@pytest.mark.parametrize("seed", [0, 1])
def test_phantom_hu_ranges(seed: int) -> None:
    chest = synthetic_ct_slice("chest", 128, seed=seed)
    assert chest.dtype == np.float32 and chest.shape == (128, 128)
    assert (chest < -990).mean() > 0.1  # air around the body
    lung = (chest > -950) & (chest < -700)
    assert lung.mean() > 0.08  # lung parenchyma present in a plausible HU band
    assert -900 < np.median(chest[lung]) < -780
    assert (chest > 700).sum() > 50  # cortical bone (ribs, spine)
    assert ((chest > 0) & (chest < 80)).mean() > 0.05  # soft tissue
    abd = synthetic_ct_slice("abdomen", 128, seed=seed)
    assert ((abd > -150) & (abd < -50)).mean() > 0.05  # fat
    assert ((abd > 40) & (abd < 80)).mean() > 0.05  # liver / muscle
    assert ((abd > 140) & (abd < 320)).sum() > 30  # contrast vessels / kidneys
    head = synthetic_ct_slice("head", 128, seed=seed)
    brain = (head > 15) & (head < 50)
    assert brain.mean() > 0.15 and (head > 1000).sum() > 100  # brain + skull
    np.testing.assert_array_equal(head, synthetic_ct_slice("head", 128, seed=seed))
    assert not np.array_equal(head, synthetic_ct_slice("head", 128, seed=seed + 10))
    with pytest.raises(InputError):
        synthetic_ct_slice("knee", 64, seed=0)


def test_xray_phantom_and_volume() -> None:
    xr = synthetic_xray(96, seed=0)
    assert xr.shape == (96, 96) and xr.min() >= 0 and xr.max() < 4096 and np.ptp(xr) > 1500
    # lung fields are darker than the mediastinum/spine column at the same height
    mid = xr[40:50]
    assert mid[:, 44:52].mean() > mid[:, 20:30].mean() + 200
    vol = synthetic_ct_volume("chest", n_slices=3, size=64, seed=0)
    assert vol.shape == (3, 64, 64)
    assert not np.array_equal(vol[0], vol[1])
    assert np.corrcoef(vol[0].ravel(), vol[1].ravel())[0, 1] > 0.9  # coherent neighbours


def test_docstring_examples() -> None:
    import doctest

    import FPDenoiseLib.data as mod

    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 5 and res.failed == 0
