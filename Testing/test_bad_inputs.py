"""Table-driven bad inputs for FPDenoiseLib.io: real corrupt files made in the test.

Every case must raise the library's exception type with a one-line message that names the file,
leave the output folder empty and the input byte-identical.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from io_helpers import ct_dataset, tree_hash, write_chest_cr, write_ct_series
from PIL import Image as PILImage
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from FPDenoiseLib.errors import FPDenoiseError, InputError, OutputError
from FPDenoiseLib.io import Image, UnknownSpacingWarning, read_image, write_image

TESTDATA = Path(pydicom.__file__).parent / "data" / "test_files"
IOP = (1, 0, 0, 0, 1, 0)


def _slice(shape=(16, 16), **kw):
    return ct_dataset(np.random.default_rng(0).integers(0, 2000, shape).astype(np.uint16), ipp=(0, 0, 0), iop=IOP,
                      **kw)


# ----------------------------------------------------------------------------- input builders
# each returns (path passed to read_image, path the message must name)
def missing(d: Path):
    return d / "nope.nrrd", d / "nope.nrrd"


def empty_folder(d: Path):
    (d / "empty").mkdir()
    return d / "empty", d / "empty"


def folder_without_images(d: Path):
    f = d / "docs"
    f.mkdir()
    (f / "notes.txt").write_text("report")
    (f / "table.csv").write_text("a,b\n1,2\n")
    (f / "sub").mkdir()
    (f / "sub" / "x.json").write_text("{}")
    return f, f


def truncated_dicom(d: Path):
    p = d / "slice.dcm"
    _slice().save_as(p, enforce_file_format=True)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.6)])
    return p, p


def truncated_slice_in_series(d: Path):
    write_ct_series(d / "series", nz=4)
    bad = sorted((d / "series").iterdir())[2]
    data = bad.read_bytes()
    bad.write_bytes(data[:-700])
    return d / "series", bad


def garbage_dcm(d: Path):
    p = d / "junk.dcm"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return p, p


def dicom_without_pixels(d: Path):
    p = d / "nopix.dcm"
    ds = _slice()
    del ds.PixelData
    ds.save_as(p, enforce_file_format=True)
    return p, p


def compressed_without_decoder(d: Path):
    """HTJ2K: pydicom needs pylibjpeg + pylibjpeg-openjpeg (not installed); the codestream is also
    unusable for the SimpleITK/GDCM fallback, so no installed decoder can read it."""
    p = d / "htj2k.dcm"
    ds = _slice()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    ds.save_as(p, enforce_file_format=True)
    return p, p


def rgb_dicom(d: Path):
    p = d / "rgb.dcm"
    ds = _slice()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8).tobytes()
    ds.save_as(p, enforce_file_format=True)
    return p, p


def multiframe_colour_dicom(d: Path):
    p = d / "mf_rgb.dcm"
    ds = _slice()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = 3
    ds.PixelData = np.random.default_rng(3).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8).tobytes()
    ds.save_as(p, enforce_file_format=True)
    return p, p


def rgb_png(d: Path):
    p = d / "colour.png"
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200  # red: a real colour image, not grey stored as RGB
    PILImage.fromarray(rgb).save(p)
    return p, p


def palette_png(d: Path):
    p = d / "palette.png"
    PILImage.fromarray(np.full((16, 16, 3), (10, 200, 30), np.uint8)).convert("P").save(p)
    return p, p


def rgb_tiff(d: Path):
    p = d / "colour.tif"
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 2] = 99
    tifffile.imwrite(p, rgb, photometric="rgb")
    return p, p


def multipage_tiff(d: Path):
    p = d / "stack.tif"
    pages = np.random.default_rng(4).integers(0, 4000, (3, 16, 16)).astype(np.uint16)
    tifffile.imwrite(p, pages, photometric="minisblack")
    return p, p


def rgb_nrrd(d: Path):
    p = d / "vec.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 16, 16, 3), np.uint8), isVector=True), str(p))
    return p, p


def nifti_4d(d: Path):
    p = d / "fmri.nii.gz"
    vols = [sitk.GetImageFromArray(np.full((4, 16, 16), t, np.float32)) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(vols), str(p))  # a real 4D (x, y, z, t) image
    return p, p


def one_pixel_png(d: Path):
    p = d / "dot.png"
    PILImage.fromarray(np.array([[7]], np.uint8)).save(p)
    return p, p


def one_pixel_dicom(d: Path):
    p = d / "dot.dcm"
    _slice(shape=(1, 1)).save_as(p, enforce_file_format=True)
    return p, p


def tiny_nrrd(d: Path):
    p = d / "tiny.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(p))
    return p, p


def nan_nrrd(d: Path):
    p = d / "nan.nrrd"
    a = np.zeros((2, 16, 16), np.float32)
    a[1, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    return p, p


def inf_mha(d: Path):
    p = d / "inf.mha"  # (ITK's NIfTI writer zeroes non-finite values, so MetaImage carries the inf)
    a = np.zeros((2, 16, 16), np.float64)
    a[0, 0, 0] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    return p, p


def non_uniform_spacing(d: Path):
    write_ct_series(d / "gap", nz=5, gap_at=3)  # slice 3 missing -> one double gap
    return d / "gap", d / "gap"


def duplicate_positions(d: Path):
    uid, study = generate_uid(), generate_uid()
    (d / "dup").mkdir()
    for i in range(3):
        _slice(series_uid=uid, study_uid=study, instance=i + 1).save_as(d / "dup" / f"{i}.dcm",
                                                                        enforce_file_format=True)
    return d / "dup", d / "dup"


def mixed_sizes_series(d: Path):
    uid, study = generate_uid(), generate_uid()
    (d / "mixed").mkdir()
    for i, shape in enumerate([(16, 16), (16, 16), (20, 16)]):
        ds = ct_dataset(np.zeros(shape, np.uint16), ipp=(0, 0, 2.0 * i), iop=IOP, series_uid=uid, study_uid=study)
        ds.save_as(d / "mixed" / f"{i}.dcm", enforce_file_format=True)
    return d / "mixed", d / "mixed"


def several_series_unchosen(d: Path):
    write_ct_series(d / "pacs", nz=2, seed=1, prefix="A")
    write_ct_series(d / "pacs", nz=2, seed=2, prefix="B")
    return d / "pacs", d / "pacs"


def unsupported_extension(d: Path):
    p = d / "photo.jpg"
    PILImage.fromarray(np.zeros((16, 16), np.uint8)).save(p, format="JPEG")
    return p, p


def empty_file(d: Path):
    p = d / "zero.nrrd"
    p.write_bytes(b"")
    return p, p


def corrupt_nrrd(d: Path):
    p = d / "broken.nrrd"
    p.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 16 16 4\nencoding: raw\n\n" + b"\0" * 100)
    return p, p


def corrupt_png(d: Path):
    p = d / "broken.png"
    buf = d / "ok.png"
    PILImage.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf)
    data = buf.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    buf.unlink()
    return p, p


READ_CASES = [
    (missing, "no such file"),
    (empty_folder, "empty"),
    (folder_without_images, "no readable"),
    (truncated_dicom, "truncated"),
    (truncated_slice_in_series, "truncated"),
    (garbage_dcm, "not a readable DICOM"),
    (dicom_without_pixels, "no pixel data"),
    (compressed_without_decoder, "install pylibjpeg and pylibjpeg-openjpeg"),
    (rgb_dicom, "colour"),
    (multiframe_colour_dicom, "multi-frame colour"),
    (rgb_png, "colour"),
    (palette_png, "colour"),
    (rgb_tiff, "colour"),
    (multipage_tiff, "multi-page"),
    (rgb_nrrd, "components"),
    (nifti_4d, "4D"),
    (one_pixel_png, "1x1 pixels"),
    (one_pixel_dicom, "1x1 pixels"),
    (tiny_nrrd, "at least 8x8"),
    (nan_nrrd, "NaN/inf"),
    (inf_mha, "NaN/inf"),
    (non_uniform_spacing, "non-uniform slice spacing"),
    (duplicate_positions, "same position"),
    (mixed_sizes_series, "different sizes"),
    (several_series_unchosen, "2 DICOM series"),
    (unsupported_extension, "unsupported file type"),
    (empty_file, "empty"),
    (corrupt_nrrd, "cannot read"),
    (corrupt_png, "cannot read"),
]


@pytest.mark.parametrize("make,expect", READ_CASES, ids=[c[0].__name__ for c in READ_CASES])
def test_bad_input(tmp_path, make, expect):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    path, offender = make(src_dir)
    before = tree_hash(src_dir)
    with pytest.raises(InputError) as ei:
        img = read_image(path)
        write_image(img, out_dir / "result.nrrd")  # never reached
    msg = str(ei.value)
    assert isinstance(ei.value, FPDenoiseError) and isinstance(ei.value, ValueError)
    assert str(offender) in msg, msg
    assert expect in msg, msg
    assert "\n" not in msg and len(msg) < 1500
    assert list(out_dir.iterdir()) == []
    assert tree_hash(src_dir) == before  # input untouched


# ----------------------------------------------------------------------------- quirky but valid DICOM
# Real-world files that must read (and write back) instead of failing: (builder, expected x/y spacing,
# spacing warning expected). Each builder returns (path, stored values as written).
def cr_monochrome1_zero_spacing(d: Path):
    """Issue 9's chest CR: MONOCHROME1, PixelSpacing [0, 0], no ImagerPixelSpacing."""
    return d / "cr.dcm", write_chest_cr(d / "cr.dcm")


def cr_zero_spacing_with_imager_spacing(d: Path):
    """PixelSpacing [0, 0] but the detector pitch (ImagerPixelSpacing) given: that is the estimate."""
    return d / "cr.dcm", write_chest_cr(d / "cr.dcm", imager_pixel_spacing=("0.139", "0.143"))


def cr_negative_spacing(d: Path):
    return d / "cr.dcm", write_chest_cr(d / "cr.dcm", pixel_spacing=("-0.2", "0.2"))


def cr_no_spacing_tags(d: Path):
    return d / "cr.dcm", write_chest_cr(d / "cr.dcm", pixel_spacing=None)


QUIRK_CASES = [
    (cr_monochrome1_zero_spacing, (1.0, 1.0), True),
    (cr_zero_spacing_with_imager_spacing, (0.143, 0.139), False),
    (cr_negative_spacing, (1.0, 1.0), True),
    (cr_no_spacing_tags, (1.0, 1.0), True),
]


@pytest.mark.parametrize("make,spacing,warns", QUIRK_CASES, ids=[c[0].__name__ for c in QUIRK_CASES])
def test_dicom_quirk_reads_and_writes(tmp_path, make, spacing, warns):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    path, stored = make(src)
    before = tree_hash(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = read_image(path)
    spacing_warnings = [w for w in caught if issubclass(w.category, UnknownSpacingWarning)]
    assert len(spacing_warnings) == (1 if warns else 0), [str(w.message) for w in caught]
    if warns:
        assert str(path) in str(spacing_warnings[0].message) and "\n" not in str(spacing_warnings[0].message)
    assert img.spacing[:2] == pytest.approx(spacing)
    ds = pydicom.dcmread(path)
    bone, air = (24, 20), (0, 0)
    # bone white (MONOCHROME1 is flipped to MONOCHROME2 meaning on reading; the PNG panels show the array)
    assert img.array[0][bone] > img.array[0][air]
    if ds.PhotometricInterpretation == "MONOCHROME1":
        np.testing.assert_array_equal(img.array[0], 4095 - stored.astype(np.int64))
    else:
        np.testing.assert_array_equal(img.array[0], stored)
    # SimpleITK writers (NRRD, PNG) used to fail here with "Zero-valued spacing"
    write_image(img, out / "x.nrrd")
    assert sitk.ReadImage(str(out / "x.nrrd")).GetSpacing()[:2] == pytest.approx(spacing)
    write_image(img, out / "x.png")
    # DICOM output keeps the input's photometric meaning and its (unknown) spacing tags
    write_image(img, out / "x.dcm", like=img)
    back = pydicom.dcmread(out / "x.dcm")
    assert back.PhotometricInterpretation == ds.PhotometricInterpretation
    np.testing.assert_array_equal(back.pixel_array, stored)
    assert [float(v) for v in back.get("PixelSpacing", [])] == [float(v) for v in ds.get("PixelSpacing", [])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownSpacingWarning)
        np.testing.assert_array_equal(read_image(out / "x.dcm").array, img.array)
    assert tree_hash(src) == before


def test_bad_input_table_is_complete():
    """Every builder above is exercised (guards against a case silently dropped from the table)."""
    builders = {n for n, f in globals().items() if callable(f) and getattr(f, "__module__", "") == __name__
                and f.__code__.co_argcount == 1 and f.__code__.co_varnames[:1] == ("d",)}
    assert builders == {c[0].__name__ for c in READ_CASES + QUIRK_CASES}


# ----------------------------------------------------------------------------- write side
def _img(shape=(2, 16, 16), dtype=np.int16, value=0, **kw):
    return Image(np.full(shape, value, dtype), **kw)


def out_equals_input(d: Path, out: Path):
    p = d / "vol.nrrd"
    write_image(_img(), p)
    write_image(read_image(p), p)


def out_folder_holds_input(d: Path, out: Path):
    write_ct_series(d / "series", nz=2)
    img = read_image(d / "series")
    write_image(img, d, like=img)


def png_overflow(d: Path, out: Path):
    write_image(_img((1, 16, 16), np.float32, 70000.0, modality="XR", is_2d=True), out / "x.png")


def png_negative(d: Path, out: Path):
    write_image(_img((1, 16, 16), np.int16, -3, is_2d=True), out / "x.png")


def png_volume(d: Path, out: Path):
    write_image(_img((3, 16, 16), np.uint8), out / "x.png")


def tiff_volume(d: Path, out: Path):
    write_image(_img((3, 16, 16), np.uint8), out / "x.tif")


def nan_on_write(d: Path, out: Path):
    write_image(_img(dtype=np.float32, value=np.nan), out / "x.nrrd")


def unsupported_output(d: Path, out: Path):
    write_image(_img(), out / "x.jpg")


def existing_output_no_overwrite(d: Path, out: Path):
    p = d / "prev.nrrd"
    write_image(_img(), p)
    write_image(_img(value=3), p, overwrite=False)


def dicom_over_foreign_folder(d: Path, out: Path):
    """A DICOM series never replaces a folder holding other data (e.g. a mistyped home folder)."""
    (out / "notes.txt").write_text("keep me")
    try:
        write_image(_img(modality="CT"), out)
    finally:
        assert (out / "notes.txt").read_text() == "keep me"
        (out / "notes.txt").unlink()  # so the generic 'output folder left empty' check applies


def parent_is_a_file(d: Path, out: Path):
    (d / "blocker").write_text("x")
    write_image(_img(), d / "blocker" / "x.nrrd")


_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from FPDenoiseLib.errors import OutputError
    from FPDenoiseLib.io import Image, write_image
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, resource.RLIM_INFINITY))
    try:
        write_image(Image(np.arange(4 * 32 * 32, dtype=np.int16).reshape(4, 32, 32), modality="CT"), sys.argv[1])
    except OutputError as e:
        raise SystemExit("OutputError: " + str(e))
    """)


def disk_full_dicom(d: Path, out: Path):
    """Real failing writes (RLIMIT_FSIZE -> EFBIG, as when the disk fills) in a subprocess."""
    r = subprocess.run([sys.executable, "-c", _LIMIT, str(out / "series")], capture_output=True, text=True,
                       timeout=120)
    if r.stderr.startswith("OutputError: "):
        raise OutputError(r.stderr.strip().split("OutputError: ", 1)[1])
    raise AssertionError(r.stdout + r.stderr)


def disk_full_nrrd(d: Path, out: Path):
    r = subprocess.run([sys.executable, "-c", _LIMIT, str(out / "vol.nrrd")], capture_output=True, text=True,
                       timeout=120)
    if r.stderr.startswith("OutputError: "):
        raise OutputError(r.stderr.strip().split("OutputError: ", 1)[1])
    raise AssertionError(r.stdout + r.stderr)


WRITE_CASES = [
    (out_equals_input, OutputError, "overwrite the input", "vol.nrrd"),
    (out_folder_holds_input, OutputError, "overwrite the input", "in"),
    (png_overflow, InputError, "do not fit", "x.png"),
    (png_negative, InputError, "do not fit", "x.png"),
    (png_volume, InputError, "3 slices", "x.png"),
    (tiff_volume, InputError, "3 slices", "x.tif"),
    (nan_on_write, InputError, "NaN/inf", "x.nrrd"),
    (unsupported_output, InputError, "unsupported output extension", "x.jpg"),
    (existing_output_no_overwrite, OutputError, "exists", "prev.nrrd"),
    (parent_is_a_file, OutputError, "cannot write", "x.nrrd"),
    (dicom_over_foreign_folder, OutputError, "non-DICOM content", "out"),
    (disk_full_dicom, OutputError, "file too large", "series"),
    (disk_full_nrrd, OutputError, "file too large", "vol.nrrd"),
]


@pytest.mark.parametrize("action,exc,expect,named", WRITE_CASES, ids=[c[0].__name__ for c in WRITE_CASES])
def test_bad_output(tmp_path, action, exc, expect, named):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    with pytest.raises(exc) as ei:
        # inputs made inside the action are hashed by comparing the tree before the failing call
        action(src_dir, out_dir)
    msg = str(ei.value)
    assert named in msg and expect in msg, msg
    assert "\n" not in msg
    assert list(out_dir.iterdir()) == [], list(out_dir.iterdir())
    leftovers = [p for p in tmp_path.rglob("*") if ".fpdtmp-" in p.name]
    assert leftovers == []


def test_refused_overwrite_keeps_input_bytes(tmp_path):
    p = tmp_path / "vol.nrrd"
    write_image(_img(value=5), p)
    before = tree_hash(p)
    with pytest.raises(OutputError):
        write_image(read_image(p).with_array(np.zeros((2, 16, 16), np.int16)), p)
    assert tree_hash(p) == before


def test_dicom_int_overflow_is_rescaled_not_wrapped(tmp_path):
    """Values beyond int16/uint16 written as DICOM get a recomputed slope instead of wrapping."""
    arr = np.array([-100000, 0, 250000], np.int32)[:, None, None] * np.ones((3, 16, 16), np.int32)
    write_image(Image(arr, modality="CT"), tmp_path / "big")
    back = read_image(tmp_path / "big")
    ds = pydicom.dcmread(sorted((tmp_path / "big").iterdir())[0])
    assert float(ds.RescaleSlope) > 1
    np.testing.assert_allclose(back.array, arr, atol=float(ds.RescaleSlope))


def test_explicit_series_member_uncompressed_still_reads(tmp_path):
    """Sanity for the table: the uncorrupted twin of each DICOM case reads fine."""
    p = tmp_path / "ok.dcm"
    ds = _slice()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(p, enforce_file_format=True)
    assert read_image(p).array.shape == (1, 16, 16)
