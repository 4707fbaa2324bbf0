"""benchmarks/quality.py on a small synthetic CT: cases, the shipped models it adds, the clean-input table."""

from __future__ import annotations

import csv

import numpy as np
from script_helpers import load_script

qb = load_script("benchmarks/quality.py", "quality_bench")


def test_ct_texture_case_and_model_join_the_table(tmp_path):
    from FPDenoiseLib.io import Image, write_image

    yy, xx = np.mgrid[:80, :80]
    hu = np.where((yy - 40) ** 2 + (xx - 40) ** 2 < 34**2, 40.0, -1000.0)
    hu[(yy - 40) ** 2 + (xx - 30) ** 2 < 6**2] = 700.0  # a bone-like disc: edges to keep
    write_image(Image(np.stack([hu] * 3).astype(np.int16), (0.7, 0.7, 2.0), (0, 0, 0), modality="CT"),
                tmp_path / "d" / "ct.nrrd")
    out = tmp_path / "out"
    assert qb.main(["--data", str(tmp_path / "d"), "--per-volume", "1", "--no-bm3d", "--ensemble", "2",
                    "--cases", "clean", "ctcorr", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "quality.csv")))
    got = {(r["case"], r["method"]): float(r["psnr"]) for r in rows}
    assert {m for c, m in got if c == "ctcorr"} >= {"noisy", "ours", "ours_x2", "mse_twin", "ct_texture", "median"}
    assert got[("ctcorr", "noisy")] < 60.0  # the texture was added
    assert got[("ctcorr", "ct_texture")] > got[("ctcorr", "noisy")] + 3.0
    # "auto" (the GUIs' starting choice) is the CT model's output on the texture, the default's on clean input
    assert got[("ctcorr", "auto")] == got[("ctcorr", "ct_texture")] != got[("ctcorr", "ours")]
    assert got[("clean", "auto")] == got[("clean", "ours")] != got[("clean", "ct_texture")]
    # auto_x2: the same choice through the ensemble (the CT model's own 2 passes on the texture)
    assert got[("clean", "auto_x2")] == got[("clean", "ours_x2")]
    assert got[("ctcorr", "auto_x2")] not in (got[("ctcorr", "ct_texture")], got[("ctcorr", "ours_x2")])
    assert abs(got[("ctcorr", "auto_x2")] - got[("ctcorr", "ct_texture")]) < 1.0
    md = (out / "quality.md").read_text()
    assert "| ctcorr |" in md and "| ct_texture |" in md  # its own row in the clean-input table too
    # the same seed draws the same texture
    a, _ = qb.corrupt(hu.astype(np.float32), "ctcorr", seed=4)
    b, _ = qb.corrupt(hu.astype(np.float32), "ctcorr", seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, qb.corrupt(hu.astype(np.float32), "ctcorr", seed=5)[0])
