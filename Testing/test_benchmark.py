"""Benchmark: end-to-end on tiny generated data (real NRRD/NIfTI files, a real tiny checkpoint).

Checks the output files, the paper-style table layout, that the metrics in results.csv equal
direct scikit-image / numpy computations on independently rebuilt inputs, resume, the CLI and
--protocol wiring, and a baseline sanity property (median beats the noisy input on salt & pepper).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from FPDenoiseLib.baselines import BASELINES
from FPDenoiseLib.benchmark import (
    RESULT_FIELDS,
    load_benchmark_images,
    make_noisy,
    read_results,
    render_summary_md,
    run_benchmark,
    summarize,
)
from FPDenoiseLib.checkpoint import save_checkpoint
from FPDenoiseLib.cli import main as cli_main
from FPDenoiseLib.data import paper_protocol_slices, synthetic_ct_slice
from FPDenoiseLib.errors import InputError
from FPDenoiseLib.inference import Denoiser
from FPDenoiseLib.models import UNet
from FPDenoiseLib.xai import guided_backprop

NOISES = ["gaussian", "salt_pepper"]
METHODS = ["ours", "median", "wavelet"]


def _write_ct(path: Path, n: int, seed: int, size: int = 64) -> None:
    vol = np.stack([synthetic_ct_slice("chest", size=size, seed=seed + i) for i in range(n)])
    img = sitk.GetImageFromArray(np.round(vol).astype(np.int16))
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    data.mkdir()
    _write_ct(data / "ct.nrrd", 3, seed=1)
    torch.manual_seed(1)  # a tiny untrained net with live ReLUs (GB maps not all zero); checked below
    ckpt = save_checkpoint(
        root / "tiny.pt",
        {"denoiser": UNet(base_channels=4, depth=2), "restoration": UNet(base_channels=4, depth=2, residual=False)},
        normalization={"ct_window": [-1024.0, 3071.0], "percentiles": [0.5, 99.5]},
        training={"name": "tiny", "loss": "fp"},
    )
    out = root / "out"
    argv = ["benchmark", "--data", str(data), "--out", str(out), "--model", str(ckpt), "--noises", *NOISES,
            "--methods", *METHODS, "--max-images", "3", "--seed", "7", "--device", "cpu", "--no-progress"]
    assert cli_main(argv) == 0
    return {"root": root, "data": data, "ckpt": ckpt, "out": out, "argv": argv}


def test_files_and_rows(setup):
    out = setup["out"]
    for name in ("results.csv", "summary.md", "run.json", "psnr_boxplot.png", *(f"fig_{n}.png" for n in NOISES)):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "fig_gaussian.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_results(out / "results.csv")
    assert len(rows) == 3 * len(NOISES) * len(METHODS)
    assert {(r["noise"], r["method"]) for r in rows} == {(n, m) for n in NOISES for m in METHODS}
    info = json.loads((out / "run.json").read_text())
    assert info["seed"] == 7 and len(info["images"]) == 3 and info["noises"] == NOISES
    assert set(info["methods"]) == set(METHODS) and "median" in info["baseline_params"]
    assert info["versions"]["torch"] and info["versions"]["scikit-image"] and info["device"] == "cpu"
    assert info["total_seconds"] > 0
    assert info["methods"]["ours"]["precision"] == "fp32"  # "auto": a UNet has no float32 input layers
    # no temp files left behind by the atomic writes
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _first_table(md: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Metric | Noise |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip().strip("|").split("|")])
    return table


def test_summary_table_layout(setup):
    md = (setup["out"] / "summary.md").read_text()
    table = _first_table(md)
    assert table[0] == ["Metric", "Noise", *METHODS]
    body = table[2:]
    assert [r[1] for r in body] == NOISES + NOISES  # rows: noise types, PSNR block then SSIM block
    assert [r[0] for r in body] == ["PSNR", ""] + ["SSIM", ""]
    rows = read_results(setup["out"] / "results.csv")
    for block, (col, fmt) in enumerate((("psnr_db", ".2f"), ("ssim", ".3f"))):
        for j, noise in enumerate(NOISES):
            cells = body[block * len(NOISES) + j][2:]
            means = [float(np.mean([r[col] for r in rows if r["noise"] == noise and r["method"] == m])) for m in METHODS]
            shown = [float(c.strip("*")) for c in cells]
            assert shown == [float(format(v, fmt)) for v in means]
            bold = [c.startswith("**") for c in cells]
            assert bold[int(np.argmax(means))] and sum(bold) >= 1
            assert all(not b or format(v, fmt) == format(max(means), fmt) for b, v in zip(bold, means))
    for section in ("95% confidence interval", "Feature-preservation score", "## Speed", "not tuned"):
        assert section in md
    assert re.search(r"\| ours \| 6 \| [\d.]+ \[[\d.]+, [\d.]+\]", md)


def test_metrics_equal_direct_computation(setup):
    """Rebuild every noisy input and denoised output independently and score with skimage."""
    rows = read_results(setup["out"] / "results.csv")
    images = load_benchmark_images(setup["data"], max_images=3, seed=7)
    assert all(im.modality == "CT" and (im.normalizer.lo, im.normalizer.hi) == (-1024.0, 3071.0) for im in images)
    den = Denoiser(setup["ckpt"], device="cpu")
    by_src = {(im.source, im.index): im for im in images}
    for r in rows:
        im = by_src[(r["source"], r["slice_index"])]
        noisy = make_noisy(im, r["noise"], r["level"], 7)
        out = den.denoise_normalized(noisy) if r["method"] == "ours" else BASELINES[r["method"]](noisy)
        hu_clean = im.clean.astype(np.float64) * 4095.0 - 1024.0  # back to HU
        hu_out = out.astype(np.float64) * 4095.0 - 1024.0
        dr = hu_clean.max() - hu_clean.min()
        assert r["data_range"] == pytest.approx(dr, rel=1e-9)
        assert r["psnr_db"] == pytest.approx(peak_signal_noise_ratio(hu_clean, hu_out, data_range=dr), rel=1e-9)
        assert r["ssim"] == pytest.approx(structural_similarity(hu_clean, hu_out, data_range=dr), rel=1e-9, abs=1e-12)
        f = den.restoration
        gb = guided_backprop(f, torch.from_numpy(np.stack([im.clean, out]).astype(np.float32))[:, None])
        gb = gb[:, 0].numpy().astype(np.float64)
        assert gb[0].std() > 0 and gb[1].std() > 0  # a non-degenerate correlation is being checked
        assert r["feature_score"] == pytest.approx(np.corrcoef(gb[0].ravel(), gb[1].ravel())[0, 1], abs=1e-6)
        assert r["seconds"] > 0 and r["seconds_per_512"] == pytest.approx(r["seconds"] * 512 * 512 / (64 * 64))


def test_resume_skips_done_rows(setup, tmp_path):
    src = setup["out"] / "results.csv"
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "results.csv").write_bytes(src.read_bytes())
    before = {tuple(r[k] for k in ("source", "slice_index", "noise", "method")): r for r in read_results(src)}
    s = run_benchmark(setup["data"], out, model=setup["ckpt"], noises=NOISES, methods=[*METHODS, "mean"],
                      max_images=3, seed=7, device="cpu", resume=True, progress=False, figures=False)
    assert s["n_new_rows"] == 3 * len(NOISES)  # only the new method ran
    after = read_results(out / "results.csv")
    assert len(after) == len(before) + 6
    for r in after:
        k = tuple(r[k] for k in ("source", "slice_index", "noise", "method"))
        if k in before:  # old rows kept verbatim (timings included: they were not recomputed)
            assert r["seconds"] == before[k]["seconds"] and r["psnr_db"] == before[k]["psnr_db"]
    s2 = run_benchmark(setup["data"], out, model=setup["ckpt"], noises=NOISES, methods=[*METHODS, "mean"],
                       max_images=3, seed=7, device="cpu", resume=True, progress=False, figures=False)
    assert s2["n_new_rows"] == 0 and s2["n_rows"] == len(after)
    with pytest.raises(InputError, match="seed"):  # rows of another seed are never mixed in
        run_benchmark(setup["data"], out, model=setup["ckpt"], noises=NOISES, methods=METHODS, max_images=3,
                      seed=8, device="cpu", resume=True, progress=False, figures=False)


def test_median_beats_noisy_on_salt_and_pepper(setup, tmp_path):
    s = run_benchmark(setup["data"], tmp_path / "sp", noises=["salt_pepper"], methods=["median", "noisy"],
                      max_images=3, seed=1, device="cpu", progress=False, figures=False)
    rows = read_results(tmp_path / "sp" / "results.csv")
    for src, idx in {(r["source"], r["slice_index"]) for r in rows}:
        p = {r["method"]: r["psnr_db"] for r in rows if (r["source"], r["slice_index"]) == (src, idx)}
        assert p["median"] > p["noisy"] + 5.0
    assert s["psnr"]["salt_pepper"]["median"] > s["psnr"]["salt_pepper"]["noisy"]
    assert s["ssim"]["salt_pepper"]["median"] > s["ssim"]["salt_pepper"]["noisy"]


def test_infinite_psnr_is_capped_in_summary():
    row = dict.fromkeys(RESULT_FIELDS, 0)
    rows = [dict(row, noise="gaussian", level=0.5, method="noisy", psnr_db=v, ssim=1.0, feature_score=1.0,
                 seconds_per_512=0.1) for v in (math.inf, 40.0)]
    s = summarize(rows, methods=["noisy"], noises=["gaussian"], levels=[0.5])
    assert s["psnr"]["gaussian"]["noisy"] == pytest.approx(70.0)
    assert "100 dB" in render_summary_md(s, notes=["PSNR cap 100 dB"])


def test_protocol_wiring_lits(setup, tmp_path):
    """--protocol lits takes the patient-split *test* side of the paper protocol."""
    ds = tmp_path / "LiTS"
    ds.mkdir()
    for pid in range(4):
        _write_ct(ds / f"volume-{pid}.nii", 2, seed=10 * pid)
    out = tmp_path / "pout"
    argv = ["benchmark", "--data", str(ds), "--out", str(out), "--protocol", "lits", "--protocol-train", "4",
            "--protocol-test", "2", "--size", "48", "--noises", "gaussian", "--methods", "median",
            "--seed", "3", "--no-figures", "--no-progress", "--max-images", "0"]
    assert cli_main(argv) == 0
    rows = read_results(out / "results.csv")
    train, test = paper_protocol_slices(ds, "lits", n_train=4, n_test=2, size=48, seed=3)
    assert {(r["source"], r["slice_index"]) for r in rows} == {(s.source, s.index) for s in test}
    assert {r["height"] for r in rows} == {48}
    assert not {Path(s.source).name for s in train} & {Path(r["source"]).name for r in rows}

    # --export-protocol writes the same split as files that `train` / `benchmark` read back
    exp = tmp_path / "split"
    assert cli_main(["benchmark", "--data", str(ds), "--out", str(exp), "--protocol", "lits", "--protocol-train", "4",
                     "--protocol-test", "2", "--size", "48", "--seed", "3", "--export-protocol"]) == 0
    tr_files, te_files = sorted((exp / "train").glob("*.nrrd")), sorted((exp / "test").glob("*.nrrd"))
    assert (len(tr_files), len(te_files)) == (len(train), len(test))
    patients = [{f.name.split("__")[0] for f in fs} for fs in (tr_files, te_files)]
    assert patients[0] and patients[1] and not patients[0] & patients[1]
    back = load_benchmark_images(exp / "test", max_images=None)
    assert all(im.modality == "CT" and im.normalizer.lo == -1024.0 for im in back)
    want = sorted(float(s.array.sum()) for s in test)
    assert sorted(float(im.clean.sum()) for im in back) == pytest.approx(want, rel=1e-5)


def test_bad_inputs(setup, tmp_path):
    with pytest.raises(InputError, match="unknown"):
        run_benchmark(setup["data"], tmp_path / "x", noises=["nope"], methods=["median"], progress=False)
    with pytest.raises(InputError, match="method 'drunet' needs a checkpoint"):
        run_benchmark(setup["data"], tmp_path / "x", noises=["gaussian"], methods=["drunet"], progress=False)
    assert cli_main(["benchmark", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                     "--methods", "median", "--noises", "gaussian"]) == 2


def test_shipped_twin_is_the_default_mse_only_baseline():
    from FPDenoiseLib.benchmark import _load_methods
    from FPDenoiseLib.inference import default_twin_path

    learned, methods, _, _ = _load_methods(None, [], ["ours", "mse_only", "noisy"], "cpu")
    assert learned["mse_only"].checkpoint_path == default_twin_path()
    assert learned["mse_only"].ckpt["training"]["loss"] == "mse" and "mse_only" in methods
    # an explicit --model is the user's own experiment: no shipped twin is slipped in
    learned, methods, _, _ = _load_methods(None, [], None, "cpu")
    assert "mse_only" in learned
    learned, _, _, _ = _load_methods(default_twin_path(), [], None, "cpu")
    assert "mse_only" not in learned
    # the CT scanner-noise model joins where its noise type is benchmarked, next to the twin
    learned, methods, _, _ = _load_methods(None, [], None, "cpu", ("gaussian", "ct_correlated"))
    assert learned["ct_texture"].checkpoint_path.name == "fpdenoise_ct_texture.pt"
    assert methods[:4] == ["ours", "auto", "mse_only", "ct_texture"]  # auto: the product's per-volume choice
    assert "ct_texture" not in _load_methods(None, [], None, "cpu", ("gaussian",))[0]
    assert "ct_texture" not in _load_methods(default_twin_path(), [], None, "cpu", ("ct_correlated",))[0]


def test_auto_column_is_the_products_per_volume_choice(tmp_path):
    """``auto`` runs what ``--model auto`` (the GUIs' start) picks for each image: on a real CT slice with
    white Gaussian noise the white-noise CT model (better than the default), on Rician noise the default
    itself (the same figures as ours). It needs the shipped default as ours."""
    import shutil

    from FPDenoiseLib.inference import resources_dir

    data = tmp_path / "ct"
    data.mkdir()
    shutil.copy(resources_dir() / "TestData" / "real_ct_lung1_slice.nrrd", data / "lung.nrrd")
    out = tmp_path / "out"
    assert cli_main(["benchmark", "--data", str(data), "--out", str(out), "--methods", "ours", "auto", "noisy",
                     "--noises", "gaussian", "rician", "--levels", "0.5", "--device", "cpu", "--no-progress",
                     "--no-figures"]) == 0
    rows = {(r["noise"], r["method"]): r for r in read_results(out / "results.csv")}
    assert rows[("rician", "auto")]["psnr_db"] == rows[("rician", "ours")]["psnr_db"]
    assert rows[("gaussian", "auto")]["psnr_db"] > rows[("gaussian", "ours")]["psnr_db"] + 0.2, rows
    assert json.loads((out / "run.json").read_text())["methods"]["auto"]["choice"].startswith("per image")
    with pytest.raises(InputError, match="needs the shipped default"):
        from FPDenoiseLib.benchmark import _load_methods
        from FPDenoiseLib.inference import default_twin_path

        _load_methods(default_twin_path(), [], ["ours", "auto"], "cpu")


def test_no_feature_scores_leaves_the_column_empty_and_the_rest_as_it_was(setup, tmp_path):
    """--no-feature-scores (fast grids, scripts/calibrate_map_gain.py): the same PSNR / SSIM rows, NaN scores,
    and the summary says why."""
    argv = [a if a != str(setup["out"]) else str(tmp_path / "nf") for a in setup["argv"]]
    assert cli_main([*argv, "--no-feature-scores", "--no-figures"]) == 0
    key = lambda r: (r["source"], r["slice_index"], r["noise"], r["method"])  # noqa: E731
    full = {key(r): r for r in read_results(setup["out"] / "results.csv")}
    fast = read_results(tmp_path / "nf" / "results.csv")
    assert len(fast) == len(full)
    for r in fast:
        assert math.isnan(float(r["feature_score"])) and not math.isnan(float(full[key(r)]["feature_score"]))
        assert float(r["psnr_db"]) == float(full[key(r)]["psnr_db"]) and float(r["ssim"]) == float(full[key(r)]["ssim"])
    assert "--no-feature-scores" in (tmp_path / "nf" / "summary.md").read_text()
