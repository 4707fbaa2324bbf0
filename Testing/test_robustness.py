"""Bad inputs / outputs at the CLI level: the real ``fpdenoise denoise`` command over issue 5's list.

For every case: exit status != 0, exactly one line on stderr that names the offending file,
nothing written to the output folder, and the input byte-identical (sha256 of every file).
The library-level table (more read cases) is ``test_bad_inputs.py``; this one checks that the
command line turns each of them into a clean failure. Most cases run ``cli.main`` in-process;
"no write permission" (as user nobody when run as root) and "disk full" (RLIMIT_FSIZE -> EFBIG,
what a full disk looks like to a writer) run the CLI in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from io_helpers import ct_dataset, tree_hash, write_chest_cr, write_ct_series
from PIL import Image as PILImage
from pydicom.encaps import encapsulate

from FPDenoiseLib.checkpoint import save_checkpoint
from FPDenoiseLib.cli import main
from FPDenoiseLib.intensity import DEFAULT_POLICY
from FPDenoiseLib.models import UNet

torch.set_num_threads(1)
IOP = (1, 0, 0, 0, 1, 0)


def _model(path: Path) -> Path:
    torch.manual_seed(0)
    models = {"denoiser": UNet(base_channels=4, depth=2, residual=True),
              "restoration": UNet(base_channels=4, depth=2, residual=False)}
    return save_checkpoint(path, models, normalization=DEFAULT_POLICY, training={"name": "tiny"})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("model") / "tiny.pt")


def _slice(shape=(16, 16)):
    return ct_dataset(np.random.default_rng(0).integers(0, 2000, shape).astype(np.uint16), ipp=(0, 0, 0), iop=IOP)


# ---------------------------------------------------------------- cases: (input, output, offender)
def missing(d):
    return d / "nope.nrrd", d / "out" / "x.nrrd", d / "nope.nrrd"


def empty_folder(d):
    (d / "empty").mkdir()
    return d / "empty", d / "out" / "x", d / "empty"


def folder_without_images(d):
    (d / "docs").mkdir()
    (d / "docs" / "notes.txt").write_text("report")
    (d / "docs" / "scan.pdf").write_bytes(b"%PDF-1.4")
    return d / "docs", d / "out" / "x", d / "docs"


def truncated_dicom(d):
    p = d / "slice.dcm"
    _slice().save_as(p, enforce_file_format=True)
    p.write_bytes(p.read_bytes()[:300])
    return p, d / "out" / "x", p


def dicom_without_pixels(d):
    p = d / "nopix.dcm"
    ds = _slice()
    del ds.PixelData
    ds.save_as(p, enforce_file_format=True)
    return p, d / "out" / "x", p


def undecodable_compression(d):
    p = d / "htj2k.dcm"
    ds = _slice()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: no decoder installed
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    ds.save_as(p, enforce_file_format=True)
    return p, d / "out" / "x", p


def rgb_png(d):
    p = d / "colour.png"
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    PILImage.fromarray(rgb).save(p)
    return p, d / "out" / "x.png", p


def nifti_4d(d):
    p = d / "fmri.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(np.full((4, 16, 16), t, np.float32)) for t in range(3)]),
                    str(p))
    return p, d / "out" / "x.nii.gz", p


def one_pixel(d):
    p = d / "dot.png"
    PILImage.fromarray(np.array([[7]], np.uint8)).save(p)
    return p, d / "out" / "x.png", p


def nan_voxels(d):
    p = d / "nan.nrrd"
    a = np.zeros((2, 16, 16), np.float32)
    a[1, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(p))
    return p, d / "out" / "x.nrrd", p


def non_uniform_spacing(d):
    write_ct_series(d / "gap", nz=5, ny=16, nx=16, gap_at=3)
    return d / "gap", d / "out" / "x", d / "gap"


def unsupported_extension(d):
    p = d / "photo.jpg"
    PILImage.fromarray(np.zeros((16, 16), np.uint8)).save(p, format="JPEG")
    return p, d / "out" / "x.nrrd", p


def unsupported_output_extension(d):
    p = d / "v.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 16, 16), np.int16)), str(p))
    return p, d / "out" / "x.jpg", d / "out" / "x.jpg"


def output_is_input(d):
    p = d / "v.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 16, 16), np.int16)), str(p))
    return p, p, p


def output_folder_is_input_series(d):
    write_ct_series(d / "ct", nz=2, ny=16, nx=16)
    return d / "ct", d / "ct", d / "ct"


def integer_overflow_on_write(d):
    """CT in HU (negative values) to a PNG: cannot be stored without wrapping -> refused."""
    p = d / "ct.nrrd"
    img = sitk.GetImageFromArray(np.full((1, 16, 16), -1000, np.int16))
    sitk.WriteImage(img, str(p))
    return p, d / "out" / "x.png", d / "out" / "x.png"


CASES = [
    (missing, "no such file"),
    (empty_folder, "empty"),
    (folder_without_images, "no readable"),
    (truncated_dicom, ""),
    (dicom_without_pixels, "no pixel data"),
    (undecodable_compression, "pylibjpeg"),
    (rgb_png, "colour"),
    (nifti_4d, "4D"),
    (one_pixel, "1x1"),
    (nan_voxels, "NaN/inf"),
    (non_uniform_spacing, "non-uniform slice spacing"),
    (unsupported_extension, "unsupported file type"),
    (unsupported_output_extension, "unsupported output extension"),
    (output_is_input, "input"),
    (output_folder_is_input_series, "input"),
    (integer_overflow_on_write, "do not fit"),
]


@pytest.mark.parametrize("make,expect", CASES, ids=[c[0].__name__ for c in CASES])
def test_cli_bad_input(tmp_path, ckpt, capfd, make, expect):
    d = tmp_path / "in"
    d.mkdir()
    (d / "out").mkdir()
    inp, out, offender = make(d)
    before = tree_hash(d)
    rc = main(["denoise", str(inp), str(out), "--model", str(ckpt), "--device", "cpu", "--progress-lines"])
    err = capfd.readouterr().err  # fd level: C libraries' (GDCM, ITK) writes to stderr count too
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fpdenoise: error: ") and str(offender) in lines[0] and expect in lines[0], lines[0]
    assert tree_hash(d) == before  # input unmodified, nothing written (out/ stays empty)
    assert list((d / "out").iterdir()) == []


# ---------------------------------------------------------------- quirky but valid inputs: must succeed
# (input builder, output name, spacing warning expected). Issue 9's chest CR (MONOCHROME1, PixelSpacing
# [0, 0], no ImagerPixelSpacing) read and denoised, then ended in SimpleITK's "Zero-valued spacing" traceback.
QUIRK_CASES = [
    ("cr_monochrome1_zero_spacing", {}, True),
    ("cr_monochrome1_zero_spacing_with_imager", {"imager_pixel_spacing": ("0.139", "0.139")}, False),
]


@pytest.mark.parametrize("name,kw,warns", QUIRK_CASES, ids=[c[0] for c in QUIRK_CASES])
@pytest.mark.parametrize("out_name", ["den.nrrd", "den.png", "den.dcm"])
def test_cli_dicom_quirks_denoise(tmp_path, ckpt, capfd, name, kw, warns, out_name):
    src = tmp_path / "in" / "cr.dcm"
    stored = write_chest_cr(src, **kw)
    before = tree_hash(src.parent)
    out = tmp_path / "out" / out_name
    out.parent.mkdir()
    args = ["denoise", str(src), str(out), "--model", str(ckpt), "--device", "cpu"]
    if out_name.endswith(".nrrd"):
        # a real process: pytest records warnings in-process, the user sees the CLI's stderr
        r = subprocess.run([sys.executable, "-m", "FPDenoiseLib.cli", *args], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rc, err = r.returncode, r.stderr
        warn_lines = [ln for ln in err.splitlines() if "warning" in ln]
        assert len(warn_lines) == (1 if warns else 0), err
        if warns:
            assert warn_lines[0].startswith("fpdenoise: warning: ") and "1.0 mm" in warn_lines[0], err
    else:
        rc, err = main(args), capfd.readouterr().err
    assert rc == 0, err
    assert "Traceback" not in err and "Zero-valued spacing" not in err, err
    assert out.is_file()
    if out_name.endswith(".dcm"):  # same photometric meaning as the input: bone stored low
        ds = pydicom.dcmread(out)
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert int(ds.pixel_array[24, 20]) < int(ds.pixel_array[0, 0])
        assert abs(int(ds.pixel_array[24, 20]) - int(stored[24, 20])) < 400
    elif out_name.endswith(".png"):  # bone white in the PNG
        png = np.asarray(PILImage.open(out))
        assert png[24, 20] > png[0, 0]
    assert tree_hash(src.parent) == before


# ---------------------------------------------------------------- subprocess cases
_CHILD = textwrap.dedent("""
    import os, resource, signal, sys
    mode, argv = sys.argv[1], sys.argv[2:]
    import torch
    torch.set_num_threads(1)
    from FPDenoiseLib.cli import main
    if mode == "fsize":   # a disk that fills after 3 kB: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
    elif mode == "nobody" and os.geteuid() == 0:  # root ignores folder modes: become 'nobody'
        # warm every lazy import with one real run elsewhere ('nobody' cannot read root's stdlib)
        assert main([*argv[:2], os.environ["FPD_WARM_OUT"], *argv[3:]]) == 0
        os.setgid(65534)
        os.setuid(65534)
    sys.exit(main(argv))
    """)


def _shared_dir() -> Path:
    """A world-readable temp folder (pytest's tmp root is 0700: unreachable for 'nobody')."""
    base = Path(tempfile.mkdtemp(prefix="fpd-robust-"))
    base.chmod(0o755)
    return base


@pytest.mark.parametrize("mode,dicom", [("nobody", False), ("nobody", True), ("fsize", False), ("fsize", True)],
                         ids=["no-permission-nrrd", "no-permission-dicom", "disk-full-nrrd", "disk-full-dicom"])
def test_cli_unwritable_output(mode, dicom):
    import shutil

    base = _shared_dir()
    try:
        model = _model(base / "tiny.pt")
        src = base / "in"
        if dicom:
            write_ct_series(src, nz=3, ny=32, nx=32)
        else:
            src.parent.mkdir(exist_ok=True)
            sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 3000, (3, 32, 32))
                                                   .astype(np.int16)), str(base / "in.nrrd"))
            src = base / "in.nrrd"
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        out_dir = base / "out"
        out_dir.mkdir()
        if mode == "nobody":
            out_dir.chmod(0o555)
        out = out_dir / ("series" if dicom else "den.nrrd")
        before = tree_hash(src)
        r = subprocess.run([sys.executable, "-c", _CHILD, mode, "denoise", str(src), str(out), "--model", str(model),
                            "--device", "cpu", "--progress-lines"],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1",
                                "FPD_WARM_OUT": str(base / "warm" / out.name)})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1 and str(out) in lines[0], r.stderr
        want = "permission denied" if mode == "nobody" else "file too large"
        assert want in lines[0], lines[0]
        assert list(out_dir.iterdir()) == []  # no partial output, no temp leftovers
        assert tree_hash(src) == before
    finally:
        (base / "out").chmod(0o755) if (base / "out").exists() else None
        shutil.rmtree(base, ignore_errors=True)


def test_case_table_covers_issue_list():
    names = {c[0].__name__ for c in CASES}
    assert {"missing", "empty_folder", "folder_without_images", "truncated_dicom", "dicom_without_pixels",
            "undecodable_compression", "rgb_png", "nifti_4d", "one_pixel", "nan_voxels", "non_uniform_spacing",
            "unsupported_extension", "output_is_input", "integer_overflow_on_write"} <= names
    assert pydicom.__version__  # decoders: pydicom present; HTJ2K decoder (pylibjpeg) deliberately absent
