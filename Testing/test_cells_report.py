"""benchmarks/cells.py: per-cell verdicts of ours against the best other method, with paired CIs."""

from __future__ import annotations

import csv
import doctest

from script_helpers import load_script

cells_mod = load_script("benchmarks/cells.py", "fp_cells")


def _write(path, table):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["noise", "level", "image", "method", "psnr_db", "ssim", "feature_score"])
        w.writeheader()
        for (noise, level, method), values in table.items():
            for i, v in enumerate(values):
                w.writerow({"noise": noise, "level": level, "image": str(i), "method": method, "psnr_db": v,
                            "ssim": 0.9 if method == "ours" else 0.8, "feature_score": 0.9 if method == "ours" else 0.7})


def test_verdicts_follow_the_paired_differences(tmp_path, capsys):
    table = {
        # won: ahead on every slice; the twin (a learned method) is never "the best other"
        ("gaussian", "0.5", "ours"): [30.0, 31.0, 32.0], ("gaussian", "0.5", "bm3d"): [29.0, 30.5, 31.0],
        ("gaussian", "0.5", "noisy"): [20.0, 20.0, 20.0], ("gaussian", "0.5", "mse_only"): [35.0, 35.0, 35.0],
        # tie: behind on average by a hair, ahead on one slice
        ("motion", "0.5", "ours"): [40.0, 40.02, 39.97], ("motion", "0.5", "noisy"): [40.0, 40.0, 40.0],
        ("motion", "0.5", "mse_only"): [40.0, 40.0, 40.0],
        # lost: behind on every slice; 100+ dB counts as the cap
        ("wrap_around", "0.25", "ours"): [26.0, 27.0, 28.0], ("wrap_around", "0.25", "median"): [26.2, 27.3, 28.1],
        ("wrap_around", "0.25", "noisy"): [26.0, 27.0, 28.0], ("wrap_around", "0.25", "mse_only"): [26.0, 27.0, 999.0],
    }
    src = tmp_path / "results.csv"
    _write(src, table)
    with open(src, newline="") as f:
        got = {c.noise: c for c in cells_mod.cells(list(csv.DictReader(f)))}
    assert {k: c.verdict for k, c in got.items()} == {"gaussian": "won", "motion": "tie", "wrap_around": "lost"}
    assert got["gaussian"].best == "bm3d" and abs(got["gaussian"].diff - 2.5 / 3) < 1e-9
    assert got["wrap_around"].best == "median" and got["wrap_around"].hi < 0
    assert got["motion"].lo < 0 < got["motion"].hi
    assert cells_mod.main([str(src), "--twin", "mse_only", "--out", str(tmp_path / "c.md")]) == 0
    text = (tmp_path / "c.md").read_text()
    assert "ours: won 1, tie 1 (behind, CI reaching 0), lost 1 of 3 cells" in text
    # twin differences over the 9 paired cases, its 999 dB capped at 100
    want = (sum(table[(n, lv, "ours")][i] - min(table[(n, lv, "mse_only")][i], 100.0)
                for n, lv in (("gaussian", "0.5"), ("motion", "0.5"), ("wrap_around", "0.25")) for i in range(3)) / 9)
    assert f"ours - mse_only psnr_db: {want:+.4f}" in text
    assert "ours - mse_only feature_score: +0.2000" in text
    capsys.readouterr()
    assert cells_mod.main([str(src), "--ours", "nope"]) == 2
    assert "no rows of method 'nope'" in capsys.readouterr().err


def test_doctest():
    res = doctest.testmod(cells_mod)
    assert res.attempted > 0 and res.failed == 0
