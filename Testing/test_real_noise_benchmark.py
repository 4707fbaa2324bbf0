"""benchmarks/real_noise.py on a small synthetic CT whose per-slice noise is known."""

from __future__ import annotations

import csv

import numpy as np
from script_helpers import load_script

rn = load_script("benchmarks/real_noise.py")


def test_noise_sd_reads_the_injected_noise_and_ranks_a_filter(tmp_path):
    from FPDenoiseLib.io import Image, write_image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    body = (yy - 48) ** 2 + (xx - 48) ** 2 < 40**2
    clean = np.where(body, 40.0, -1000.0).astype(np.float32)
    vol = np.stack([clean + rng.normal(0, 20.0, clean.shape) for _ in range(4)])  # 20 HU, independent per slice
    write_image(Image(vol.astype(np.int16), (0.7, 0.7, 1.25), (0, 0, 0), modality="CT"), tmp_path / "d" / "ct.nrrd")
    out = tmp_path / "out"
    assert rn.main(["--data", str(tmp_path / "d"), "--per-volume", "1", "--no-bm3d", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in csv.DictReader(open(out / "real_noise.csv"))}
    assert abs(float(rows["noisy"]["noise_sd"]) - 20.0) < 2.0
    # noise-to-noise RMSE of the input: both slices' noise, sqrt(2) x 20 HU
    assert abs(float(rows["noisy"]["n2n_rmse"]) - 20.0 * np.sqrt(2)) < 3.0
    assert float(rows["median"]["noise_sd"]) < 0.6 * float(rows["noisy"]["noise_sd"])
    assert float(rows["median"]["n2n_rmse"]) < float(rows["noisy"]["n2n_rmse"])
    # the shipped CT scanner-noise model joins by itself; it takes out most of this noise
    assert float(rows["ct_texture"]["noise_sd"]) < 0.5 * float(rows["noisy"]["noise_sd"]), rows["ct_texture"]
    assert "noise left" in (out / "real_noise.md").read_text() and (out / "figure.png").stat().st_size > 1000


def test_no_volumes_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert rn.main(["--data", str(tmp_path / "empty"), "--no-bm3d", "--out", str(tmp_path / "o")]) == 2
    assert "fetch_training_data" in capsys.readouterr().err


def test_auto_row_is_the_model_auto_picks_per_volume(tmp_path):
    """With the shipped default, the ``auto`` rows are the CT model's on a CT with a scanner's correlated noise
    and the default's on a CT with white noise, and the table says which it picked."""
    from io_helpers import noisy_ct_phantom

    from FPDenoiseLib.io import Image, write_image

    for name, corr in (("corr", True), ("white", False)):
        vol = np.stack([noisy_ct_phantom(96, correlated=corr, seed=s) for s in range(3)])
        write_image(Image(np.rint(vol).astype(np.int16), (0.7, 0.7, 1.25), (0, 0, 0), modality="CT"),
                    tmp_path / "d" / f"{name}.nrrd")
    out = tmp_path / "out"
    assert rn.main(["--data", str(tmp_path / "d"), "--per-volume", "1", "--no-bm3d", "--out", str(out)]) == 0
    rows = {(r["pair"].split("[")[0], r["method"]): r for r in csv.DictReader(open(out / "real_noise.csv"))}
    for vol, picked in (("corr", "ct_texture"), ("white", "ours")):
        assert rows[(vol, "auto")]["noise_sd"] == rows[(vol, picked)]["noise_sd"], vol
    assert rows[("corr", "ct_texture")]["noise_sd"] != rows[("corr", "ours")]["noise_sd"]
    assert "corr: ct_texture, white: ours" in (out / "real_noise.md").read_text()
