"""``fpdenoise denoise`` end to end on real DICOM: derived series out, saliency series, and the
batch/PACS mode (many series, nested folders, junk beside them, resumable, ``--series``).

The CLI runs in-process (``cli.main([...])``); the model is a tiny real checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from io_helpers import noisy_ct_phantom, read_dicom_dir, real_ct_with_white_noise, tree_hash, write_ct_series

from FPDenoiseLib.checkpoint import save_checkpoint
from FPDenoiseLib.cli import main, series_output_name
from FPDenoiseLib.inference import Denoiser
from FPDenoiseLib.intensity import DEFAULT_POLICY
from FPDenoiseLib.io import find_series, read_image
from FPDenoiseLib.models import UNet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    models = {"denoiser": UNet(base_channels=4, depth=2, residual=True),
              "restoration": UNet(base_channels=4, depth=2, residual=False)}
    with torch.no_grad():  # the residual U-Net starts as identity: perturb it so outputs differ
        for p in models["denoiser"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", models, normalization=DEFAULT_POLICY,
                           training={"name": "tiny-test"})


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_dicom_series_in_derived_series_out(tmp_path, ckpt, capsys):
    hu, g = write_ct_series(tmp_path / "ct", nz=4, ny=32, nx=32)
    before = tree_hash(tmp_path / "ct")
    out, sal = tmp_path / "den", tmp_path / "sal"
    rc, stdout, err = _run(capsys, "denoise", tmp_path / "ct", out, "--model", ckpt, "--device", "cpu",
                           "--saliency-dir", sal, "--progress-lines")
    assert rc == 0, err
    assert tree_hash(tmp_path / "ct") == before  # input untouched

    src = read_dicom_dir(tmp_path / "ct")
    dst = read_dicom_dir(out)
    assert len(dst) == len(src) == 4
    src_sops = {str(d.SOPInstanceUID) for d in src}
    uids = {str(d.SeriesInstanceUID) for d in dst}
    assert len(uids) == 1 and uids.isdisjoint({g["series_uid"]})
    assert len({str(d.SOPInstanceUID) for d in dst}) == 4 and src_sops.isdisjoint(str(d.SOPInstanceUID) for d in dst)
    for d in dst:
        assert str(d.StudyInstanceUID) == g["study_uid"]
        assert str(d.PatientID) == "PID123" and str(d.PatientName) == "Test^Phantom"
        assert list(d.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "denoised" in d.SeriesDescription and "tiny-test" in d.SeriesDescription
        assert "tiny-test" in d.DerivationDescription
        assert str(d.FrameOfReferenceUID) == str(src[0].FrameOfReferenceUID)

    # HU survive: exactly what the library's Denoiser gives for the input array
    expected = Denoiser(ckpt, device="cpu").denoise_array(read_image(tmp_path / "ct").array, modality="CT")
    back = read_image(out)
    assert back.array.dtype == expected.dtype
    np.testing.assert_array_equal(back.array, expected)
    assert not np.array_equal(expected, hu)  # the model did change the image
    # geometry identical, read back by SimpleITK (GDCM) independently of our reader
    s_in, s_out = sitk_series(tmp_path / "ct"), sitk_series(out)
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(s_out, get)(), getattr(s_in, get)(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(s_out), expected)

    # saliency + feature change: three more derived series of the same study, each with its own UID
    sal_dirs = sorted(p for p in sal.iterdir())
    assert [p.name for p in sal_dirs] == ["den_feature_change", "den_saliency_denoised", "den_saliency_input"]
    sal_uids = set()
    for p in sal_dirs:
        ds = read_dicom_dir(p)
        assert len(ds) == 4 and {str(d.StudyInstanceUID) for d in ds} == {g["study_uid"]}
        assert "saliency" in ds[0].SeriesDescription or "feature change" in ds[0].SeriesDescription
        sal_uids |= {str(d.SeriesInstanceUID) for d in ds}
    assert len(sal_uids) == 3 and sal_uids.isdisjoint(uids | {g["series_uid"]})
    assert str(out) in stdout


def test_saliency_as_nrrd(tmp_path, ckpt, capsys):
    write_ct_series(tmp_path / "ct", nz=3, ny=24, nx=24)
    rc, _, err = _run(capsys, "denoise", tmp_path / "ct", tmp_path / "den", "--model", ckpt, "--device", "cpu",
                      "--saliency-dir", tmp_path / "sal", "--saliency-format", "nrrd", "--progress-lines")
    assert rc == 0, err
    names = sorted(p.name for p in (tmp_path / "sal").iterdir())
    assert names == ["den_feature_change.nrrd", "den_saliency_denoised.nrrd", "den_saliency_input.nrrd"]
    ref = read_image(tmp_path / "ct")
    for name in names:
        s = read_image(tmp_path / "sal" / name)
        assert s.array.shape == ref.array.shape and s.array.dtype == np.float32
        np.testing.assert_allclose(s.origin, ref.origin, atol=1e-4)
        np.testing.assert_allclose(s.direction, ref.direction, atol=1e-6)
    # The change map is |GB(out) - GB(in)| of the signed maps: bounded by |GB(out)| + |GB(in)|.
    change, s_in, s_out = (read_image(tmp_path / "sal" / n).array for n in names)
    assert change.max() > 0 and (change <= s_in + s_out + 1e-5).all()


def _pacs(root: Path) -> dict:
    """A PACS export: nested series, two series mixed in one folder, junk files, a volume file,
    and one broken series (truncated slice)."""
    _, g1 = write_ct_series(root / "PAT1" / "STUDY1" / "SER1", nz=3, ny=24, nx=24, seed=1)
    _, g2 = write_ct_series(root / "mixed", nz=2, ny=24, nx=24, seed=2, prefix="A")
    _, g3 = write_ct_series(root / "mixed", nz=3, ny=24, nx=24, seed=3, prefix="B")
    _, gb = write_ct_series(root / "broken", nz=3, ny=24, nx=24, seed=4)
    bad = sorted((root / "broken").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:-500])
    (root / "README.txt").write_text("export notes")
    (root / "mixed" / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    (root / "vols").mkdir()
    vol = sitk.GetImageFromArray(np.random.default_rng(5).integers(-1000, 1000, (2, 24, 24)).astype(np.int16))
    vol.SetSpacing((0.5, 0.5, 2.0))
    sitk.WriteImage(vol, str(root / "vols" / "extra.nrrd"))
    return {"good": [g1["series_uid"], g2["series_uid"], g3["series_uid"]], "bad": gb["series_uid"]}


def test_batch_pacs_export_resumable(tmp_path, ckpt, capsys):
    root = tmp_path / "pacs"
    uids = _pacs(root)
    before = tree_hash(root)
    out = root / "denoised"  # inside the input tree: must not be picked up as input on re-runs
    args = ["denoise", root, out, "--model", ckpt, "--device", "cpu", "--progress-lines"]
    rc, stdout, err = _run(capsys, *args)
    assert rc == 1, err  # one series is broken -> non-zero, but every other one was done
    assert "summary: 4 done, 0 skipped, 1 failed (of 5" in err, err
    assert f"failed: series {uids['bad']}" in err and "truncated" in err
    names = {series_output_name(s): s.uid for s in find_series(root) if s.uid in uids["good"]}
    assert len(names) == 3
    got = sorted(p.name for p in out.iterdir())
    assert got == sorted([*names, "vols_extra.nrrd"])
    for name, uid in names.items():
        ds = read_dicom_dir(out / name)
        src = read_image(root, series_uid=uid)
        assert len(ds) == src.array.shape[0] and all(str(d.SeriesInstanceUID) != uid for d in ds)
        assert name.startswith("PID123_3_")
    assert read_image(out / "vols_extra.nrrd").array.shape == (2, 24, 24)
    after = tree_hash(root)
    assert {k: v for k, v in after.items() if "/denoised/" not in k} == before  # inputs untouched

    # re-run: everything done is skipped (resumable), the broken series fails again
    rc, _, err = _run(capsys, *args)
    assert rc == 1 and "summary: 0 done, 4 skipped, 1 failed (of 5" in err, err
    # a half-finished run: only the missing output is redone
    shutil.rmtree(out / sorted(names)[0])
    rc, _, err = _run(capsys, *args)
    assert "summary: 1 done, 3 skipped, 1 failed" in err, err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_batch_series_filter_and_unknown_uid(tmp_path, ckpt, capsys):
    root = tmp_path / "pacs"
    uids = _pacs(root)
    want = uids["good"][1]
    rc, _, err = _run(capsys, "denoise", root, tmp_path / "one", "--series", want, "--model", ckpt,
                      "--device", "cpu", "--progress-lines")
    assert rc == 0 and "summary: 1 done, 0 skipped, 0 failed (of 1" in err, err
    (only,) = list((tmp_path / "one").iterdir())
    ds = pydicom.dcmread(sorted(only.iterdir())[0])
    assert str(ds.SeriesInstanceUID) != want and "denoised" in ds.SeriesDescription
    assert len(list(only.iterdir())) == 2  # series A had 2 slices
    # one chosen series into one file
    rc, _, err = _run(capsys, "denoise", root, tmp_path / "one.nrrd", "--series", want, "--model", ckpt,
                      "--device", "cpu", "--progress-lines")
    assert rc == 0 and read_image(tmp_path / "one.nrrd").array.shape == (2, 24, 24), err
    rc, _, err = _run(capsys, "denoise", root, tmp_path / "none", "--series", "1.2.3.4", "--model", ckpt,
                      "--device", "cpu")
    assert rc == 2 and err.count("\n") == 1 and "1.2.3.4" in err and not (tmp_path / "none").exists()


def test_folder_into_a_file_name(tmp_path, ckpt, capsys):
    """OUT with a file extension is never turned into a batch folder of that name: a folder holding one
    volume is denoised into that file; one holding several series is refused (nothing written)."""
    (tmp_path / "one").mkdir()
    vol = sitk.GetImageFromArray(np.random.default_rng(7).integers(0, 3000, (2, 24, 24)).astype(np.int16))
    sitk.WriteImage(vol, str(tmp_path / "one" / "v.nrrd"))
    rc, stdout, err = _run(capsys, "denoise", tmp_path / "one", tmp_path / "o.nrrd", "--model", ckpt,
                           "--device", "cpu", "--progress-lines")
    assert rc == 0 and (tmp_path / "o.nrrd").is_file(), err
    assert read_image(tmp_path / "o.nrrd").array.shape == (2, 24, 24)
    write_ct_series(tmp_path / "two", nz=2, ny=24, nx=24, seed=1, prefix="A")
    write_ct_series(tmp_path / "two", nz=2, ny=24, nx=24, seed=2, prefix="B")
    rc, _, err = _run(capsys, "denoise", tmp_path / "two", tmp_path / "t.nrrd", "--model", ckpt, "--device", "cpu")
    assert rc == 2 and err.count("\n") == 1 and "2 series/volumes" in err and "--series" in err, err
    assert not (tmp_path / "t.nrrd").exists()


def test_saliency_dir_inside_the_dicom_output_is_refused_first(tmp_path, ckpt, capsys):
    """The derived series folder holds only its slices: maps inside it used to be written, then the
    series refused ("non-DICOM content") after all the work; now refused up front, nothing written."""
    write_ct_series(tmp_path / "ct", nz=2, ny=24, nx=24)
    for sal in (tmp_path / "den" / "maps", tmp_path / "den"):
        rc, _, err = _run(capsys, "denoise", tmp_path / "ct", tmp_path / "den", "--saliency-dir", sal,
                          "--model", ckpt, "--device", "cpu", "--progress-lines")
        assert rc == 2 and err.count("\n") == 1 and "--saliency-dir" in err, err
        assert not (tmp_path / "den").exists()
    rc, _, err = _run(capsys, "denoise", tmp_path / "ct", tmp_path / "den", "--saliency-dir", tmp_path / "maps",
                      "--model", ckpt, "--device", "cpu", "--progress-lines")
    assert rc == 0 and len(read_dicom_dir(tmp_path / "den")) == 2, err


def test_batch_output_names_never_shared(tmp_path, ckpt, capsys):
    """Two inputs never map to one output name (the second was "skipped (output exists)" and never
    denoised): long names sharing the first 40 characters, and a/b.nrrd beside a_b.nrrd."""
    root = tmp_path / "vols"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(8)
    names = ["patient_0001_ct_abdomen_portal_venous_phase_1.nrrd", "patient_0001_ct_abdomen_portal_venous_phase_2.nrrd",
             "a/b.nrrd", "a_b.nrrd", "plain.nrrd"]
    for n in names:
        sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 3000, (1, 16, 16)).astype(np.int16)), str(root / n))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "denoise", root, out, "--model", ckpt, "--device", "cpu", "--progress-lines")
    assert rc == 0 and "5 done, 0 skipped" in err, err
    got = sorted(p.name for p in out.iterdir())
    assert len(got) == 5 and "plain.nrrd" in got, got  # a unique, short name is kept as it was
    rc, _, err = _run(capsys, "denoise", root, out, "--model", ckpt, "--device", "cpu", "--progress-lines")
    assert rc == 0 and "0 done, 5 skipped" in err, err  # stable names: resumable


def test_single_file_behaviour_unchanged(tmp_path, ckpt, capsys):
    vol = sitk.GetImageFromArray(np.random.default_rng(6).integers(0, 3000, (2, 24, 24)).astype(np.int16))
    sitk.WriteImage(vol, str(tmp_path / "v.nrrd"))
    rc, stdout, err = _run(capsys, "denoise", tmp_path / "v.nrrd", tmp_path / "o.nrrd", "--model", ckpt,
                           "--device", "cpu", "--progress-lines")
    assert rc == 0, err
    assert stdout.strip().splitlines()[-1] == str(tmp_path / "o.nrrd")
    img = read_image(tmp_path / "v.nrrd")
    np.testing.assert_array_equal(read_image(tmp_path / "o.nrrd").array,
                                  Denoiser(ckpt, device="cpu").denoise_array(img.array, modality=img.modality))


def test_shipped_model_by_name_on_the_command_line(tmp_path, capsys):
    """`--model ct_texture` picks the shipped CT model (output = that model's); an unknown name that is no
    file is a one-line error and writes nothing."""
    vol = np.random.default_rng(7).normal(40, 30, (2, 40, 48)).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.7, 2.0))
    sitk.WriteImage(img, str(tmp_path / "ct.nrrd"))
    rc, _, err = _run(capsys, "denoise", tmp_path / "ct.nrrd", tmp_path / "o.nrrd", "--model", "ct_texture",
                      "--device", "cpu")
    assert rc == 0, err
    src = read_image(tmp_path / "ct.nrrd")
    want = Denoiser("ct_texture", device="cpu").denoise_array(src.array, modality=src.modality)
    np.testing.assert_array_equal(read_image(tmp_path / "o.nrrd").array, want)
    assert not np.array_equal(want, Denoiser(device="cpu").denoise_array(src.array, modality=src.modality))
    rc, _, err = _run(capsys, "denoise", tmp_path / "ct.nrrd", tmp_path / "bad.nrrd", "--model", "ct_textur",
                      "--device", "cpu")
    assert rc == 2 and "ct_textur" in err and "not found" in err and not (tmp_path / "bad.nrrd").exists()


def test_cli_model_auto_takes_the_ct_model_only_for_a_ct_scanner_noise(tmp_path, capsys):
    """`--model auto` over a folder: the CT with a scanner's correlated noise goes through the CT model (its
    output is that model's, the log and the summary say so), a real CT slice with white Gaussian noise
    everywhere through the white-noise CT model, the phantom with white noise in the body only (air noise-free:
    not white over the slice) through the default."""
    import json

    from FPDenoiseLib.io import Image, write_image

    (tmp_path / "in").mkdir()
    gauss = real_ct_with_white_noise(0.02, seed=5)
    vols = {"corr": noisy_ct_phantom(96, seed=5), "white": noisy_ct_phantom(96, correlated=False, seed=5),
            "gauss": gauss}
    for name, arr in vols.items():
        write_image(Image(np.rint(arr[None]).astype(np.int16), (0.7, 0.7, 2.0), (0, 0, 0), modality="CT"),
                    tmp_path / "in" / f"{name}.nrrd")
    rc, _, err = _run(capsys, "denoise", tmp_path / "in", tmp_path / "out", "--model", "auto", "--device", "cpu",
                      "--summary-json", tmp_path / "s.json")
    assert rc == 0, err
    assert "corr.nrrd: note: auto: the CT scanner-noise model" in err and "white.nrrd: note" not in err, err
    assert "white.nrrd: auto: the default model (default)" in err and "corr.nrrd: auto: the default" not in err, err
    assert "gauss.nrrd: note: auto: the white-noise CT model" in err, err
    for name, model in (("corr", "ct_texture"), ("white", "default"), ("gauss", "gaussian_ct")):
        src = read_image(tmp_path / "in" / f"{name}.nrrd")
        want = Denoiser(model, device="cpu").denoise_array(src.array, modality="CT")
        np.testing.assert_array_equal(read_image(tmp_path / "out" / f"{name}.nrrd").array, want)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["model"].startswith("auto (")
    used = {Path(it["output"]).name: it.get("model") for it in summary["items"]}
    assert used == {"corr.nrrd": "ct_texture", "white.nrrd": "default", "gauss.nrrd": "gaussian_ct"}, used
    rc, _, err = _run(capsys, "benchmark", "--data", tmp_path / "in", "--out", tmp_path / "b", "--model", "auto")
    assert rc == 2 and "--model auto picks a model per CT volume" in err and not (tmp_path / "b" / "results.csv").exists()


def test_cli_starts_on_auto_as_the_guis_do(tmp_path, capsys):
    """Without --model, `denoise` and `demo` choose per CT volume as the Slicer module and the browser viewer
    start: a real CT slice with white Gaussian noise goes through the white-noise CT model (the note and the
    summary say so); --model default keeps the all-type model."""
    import json

    from FPDenoiseLib.io import Image, write_image

    gauss = real_ct_with_white_noise(0.02, seed=6)
    write_image(Image(np.rint(gauss[None]).astype(np.int16), (0.7, 0.7, 2.0), (0, 0, 0), modality="CT"),
                tmp_path / "g.nrrd")
    src = read_image(tmp_path / "g.nrrd")
    for model, argv in (("gaussian_ct", ()), ("default", ("--model", "default"))):
        out = tmp_path / f"{model}.nrrd"
        rc, _, err = _run(capsys, "denoise", tmp_path / "g.nrrd", out, "--device", "cpu", *argv,
                          "--summary-json", tmp_path / f"{model}.json")
        assert rc == 0, err
        assert ("note: auto: the white-noise CT model" in err) == (model == "gaussian_ct"), err
        want = Denoiser(model, device="cpu").denoise_array(src.array, modality="CT")
        np.testing.assert_array_equal(read_image(out).array, want)
        summary = json.loads((tmp_path / f"{model}.json").read_text())
        assert summary["items"][0]["model"] == model
        assert summary["precision"] == Denoiser(model, device="cpu").precision  # auto: bf16 where the CPU has it
    rc, _, err = _run(capsys, "denoise", tmp_path / "g.nrrd", tmp_path / "fp32.nrrd", "--device", "cpu",
                      "--model", "default", "--precision", "fp32", "--summary-json", tmp_path / "fp32.json")
    assert rc == 0 and json.loads((tmp_path / "fp32.json").read_text())["precision"] == "fp32", err
    want = Denoiser("default", device="cpu", precision="fp32").denoise_array(src.array, modality="CT")
    np.testing.assert_array_equal(read_image(tmp_path / "fp32.nrrd").array, want)
    # the README's main job: the bundled sample with simulated Gaussian noise
    stats = {}
    for model, argv in (("gaussian_ct", ()), ("default", ("--model", "default"))):
        rc, out, err = _run(capsys, "demo", "--out", tmp_path / f"demo_{model}", "--device", "cpu", *argv)
        assert rc == 0, err
        line = next(s for s in out.splitlines() if s.startswith("gaussian level"))
        assert line.endswith(f"model {model}"), line
        noisy_db, den_db = (float(v) for v in re.findall(r"([0-9.]+) dB", line))
        assert den_db > noisy_db + 8.0, line
        stats[model] = den_db
        assert (tmp_path / f"demo_{model}" / "panel.png").stat().st_size > 0
    assert stats["gaussian_ct"] > stats["default"], stats


def test_cli_notes_the_ct_model_for_a_noisy_ct(tmp_path, capsys):
    """The default model on a CT with a scanner's kernel-correlated noise prints a one-line note naming --model
    ct_texture (the Slicer module's background path shows the CLI's lines in its log); a clean CT and a CT
    with as much white noise (which the default removes) get none."""
    from FPDenoiseLib.io import Image, write_image

    for name, arr in (("noisy", noisy_ct_phantom(96, seed=3)), ("clean", noisy_ct_phantom(96, sd_hu=0.0)),
                      ("white", noisy_ct_phantom(96, correlated=False, seed=3))):
        # an FPDenoise NRRD keeps its modality (CT)
        write_image(Image(np.rint(arr[None]).astype(np.int16), (0.7, 0.7, 2.0), (0, 0, 0), modality="CT"),
                    tmp_path / f"{name}.nrrd")
        rc, _, err = _run(capsys, "denoise", tmp_path / f"{name}.nrrd", tmp_path / f"{name}_d.nrrd", "--device", "cpu",
                          "--model", "default")
        assert rc == 0, err
        assert ("note: the CT scanner-noise model" in err and "--model ct_texture" in err) == (name == "noisy"), (
            name, err)
