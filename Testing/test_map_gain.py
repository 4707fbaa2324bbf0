"""The noise-map gain: a calibration of a trained blind denoiser (``ResUNet(map_gain=g)``), written by
``scripts/export_model.py --map-gain`` and chosen by ``scripts/calibrate_map_gain.py`` on calibration images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from script_helpers import load_script

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from FPDenoiseLib.intensity import DEFAULT_POLICY
from FPDenoiseLib.models import ResUNet, UNet, weight_config

ROOT = Path(__file__).resolve().parents[1]
cal = load_script("scripts/calibrate_map_gain.py", "calibrate_map_gain")


def _net(gain: float = 1.0) -> ResUNet:
    torch.manual_seed(0)
    net = ResUNet(channels=(4, 8, 8, 8), blocks=1, residual_gate=150, map_gain=gain).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.1)  # the zero-init tail would make every gain look the same
    return net


def test_the_gain_scales_the_estimated_map_the_net_reads_and_nothing_else():
    base, gained = _net(), _net(1.1)
    gained.load_state_dict(base.state_dict())
    x = torch.rand(2, 1, 64, 48) * 0.5 + 0.2
    with torch.no_grad():
        est = base.estimate_noise(x)
        assert torch.equal(gained.estimate_noise(x), est)  # the measurement itself is not scaled
        torch.testing.assert_close(gained(x), base(x, noise_map=est * 1.1), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(gained(x), base(x), atol=1e-4)
        m = torch.full_like(x, 0.02)  # a given map (training's true map, a user's) is taken as it is
        assert torch.equal(gained(x, noise_map=m), base(x, noise_map=m))
        assert torch.equal(gained(x, strength=0.0), x)  # strength 0 stays the exact identity
    # stored only when set, and a setting that owns no weights (an init for training ignores it)
    assert "map_gain" not in base.config and gained.config["map_gain"] == 1.1
    assert weight_config(gained.config) == weight_config(base.config)
    with pytest.raises(ValueError, match="map_gain"):
        ResUNet(channels=(4, 8), map_gain=0.0)


def test_export_writes_the_gain_and_1_removes_it(tmp_path):
    src = save_checkpoint(tmp_path / "src.pt", {"denoiser": _net(), "restoration": UNet(base_channels=4, depth=2)},
                          normalization=DEFAULT_POLICY, training={"name": "t"})

    def export(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts/export_model.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT)

    r = export(src, tmp_path / "g.pt", "--map-gain", "1.1")
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(tmp_path / "g.pt")
    assert ck["models"]["denoiser"]["config"]["map_gain"] == 1.1 and ck["training"]["exported_from"]["map_gain"] == 1.1
    assert model_from_checkpoint(ck).map_gain == 1.1
    r = export(tmp_path / "g.pt", tmp_path / "one.pt", "--map-gain", "1")
    assert r.returncode == 0, r.stderr
    assert "map_gain" not in load_checkpoint(tmp_path / "one.pt")["models"]["denoiser"]["config"]
    r = export(src, tmp_path / "bad.pt", "--map-gain", "-1")
    assert r.returncode == 2 and "map-gain" in r.stderr and not (tmp_path / "bad.pt").exists()


def test_the_rule_takes_the_best_mean_that_loses_no_cell_by_more_than_the_limit():
    cells = [("gaussian", "0.25"), ("rician", "0.75")]
    means = {"a@1": dict(zip(cells, (40.0, 30.0))), "a@1.1": dict(zip(cells, (39.95, 30.8))),
             "a@1.2": dict(zip(cells, (39.7, 31.5)))}
    best, table = cal.choose(means, ["a"], [1.0, 1.1, 1.2], max_loss=0.1)
    assert best == 1.1  # 1.2 has the higher mean (+0.6) but loses 0.3 dB on one cell
    assert [round(row[1], 3) for row in table] == [0.0, 0.375, 0.6] and round(table[2][2], 3) == -0.3
    assert cal.choose(means, ["a"], [1.0, 1.1, 1.2], max_loss=0.5)[0] == 1.2
    assert cal.choose(means, ["a"], [1.0, 1.1, 1.2], max_loss=0.01)[0] == 1.0  # gain 1 always qualifies


@pytest.mark.slow
def test_calibration_runs_the_grid_with_every_gain_on_the_same_inputs(tmp_path, capsys):
    from FPDenoiseLib.io import Image, write_image

    yy, xx = np.mgrid[:64, :64]
    hu = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 28**2, 40.0, -1000.0)
    hu[(yy - 32) ** 2 + (xx - 24) ** 2 < 5**2] = 700.0
    write_image(Image(np.stack([hu] * 2).astype(np.int16), (0.7, 0.7, 2.0), (0, 0, 0), modality="CT"),
                tmp_path / "d" / "ct.nrrd")
    model = str(ROOT / "Resources/Models/fpdenoise_default.pt")
    assert cal.main([model, "--data", str(tmp_path / "d"), "--gains", "1.2", "--levels", "0.5", "--max-images", "1",
                     "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "| 1 | +0.000 |" in out and "| 1.2 |" in out and "chosen gain:" in out and "--map-gain" in out
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    assert {r["method"] for r in rows} == {"fpdenoise_default@1", "fpdenoise_default@1.2"}
    assert len(rows) == 2 * 13
    by = {(r["noise"], r["method"]): float(r["psnr_db"]) for r in rows}
    assert any(by[(n, "fpdenoise_default@1")] != by[(n, "fpdenoise_default@1.2")] for n, _ in by)
