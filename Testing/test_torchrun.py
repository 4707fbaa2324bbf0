"""``fpdenoise train`` under ``torchrun --nproc_per_node=2`` (gloo, CPU) with tiny data.

Checks:
* the ranks stayed in sync: each rank prints a SHA-256 of its final weights
  (``--print-weight-digest``); both must be identical and equal to the checkpoint rank 0 wrote;
* only rank 0 wrote (one checkpoint, no temp files);
* the result matches a single-process run with the same *global* batch (2 x 4 vs 1 x 8):
  - stage 1 (restoration, clean -> clean, no random draws) sees exactly the same 8 patches per
    step in both runs (DistributedSampler gives rank r the positions r, r+2, ... of the same
    permutation) and DDP averages the two per-rank mean gradients = the global mean gradient.
    The only difference is floating-point summation order -> weights equal to 1e-6;
  - stage 2 draws noise per rank (``default_rng([seed, rank, step, stage])``), so noisy inputs
    differ from the single-process run. Adam moves a weight by at most about ``lr`` per step,
    so two runs from the same start differ by at most ``2 * lr * steps``; validation PSNR must
    agree within 1 dB (this tiny model stays close to identity in 8 steps).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from test_resume_kill import make_data

from FPDenoiseLib.checkpoint import load_checkpoint
from FPDenoiseLib.training import weights_digest

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)
STEPS, LR = 8, 1e-3
COMMON = ["--base-channels", "4", "--depth", "2", "--patch-size", "32", "--bank-size", "64",
          "--restoration-steps", str(STEPS), "--steps", str(STEPS), "--ckpt-every", "4", "--val-every", str(STEPS),
          "--lr", str(LR), "--device", "cpu", "--seed", "1", "--progress-lines", "--print-weight-digest"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _digests(stderr: str) -> dict[int, str]:
    return {int(r): d for r, d in re.findall(r"WEIGHT_DIGEST rank=(\d+) world=\d+ ([0-9a-f]{64})", stderr)}


def _val_psnr(stdout: str) -> float:
    return float(re.findall(r"VAL denoiser step=\d+ psnr=([0-9.]+)", stdout)[-1])


@pytest.mark.slow
def test_torchrun_two_ranks_in_sync_and_match_single_process(tmp_path):
    data = make_data(tmp_path / "data")
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "FPDenoiseLib.cli", "train", "--data", str(data), "--out", str(ddp_dir / "m.pt"),
           "--batch-size", "4", *COMMON]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if r.returncode != 0 and ("gloo" in r.stderr.lower() and "not" in r.stderr.lower()):
        pytest.skip("gloo process group cannot start here: " + r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr[-4000:]
    dig = _digests(r.stderr)
    assert sorted(dig) == [0, 1], r.stderr[-2000:]
    assert dig[0] == dig[1], "ranks ended with different weights"
    ck = load_checkpoint(ddp_dir / "m.pt")
    assert weights_digest({m: e["state_dict"] for m, e in ck["models"].items()}) == dig[0]
    assert sorted(p.name for p in ddp_dir.iterdir()) == ["m.pt"]  # rank 0 alone wrote, atomically
    assert r.stdout.count("VAL denoiser") == 1 and r.stdout.count(str(ddp_dir / "m.pt")) == 1  # rank 0 alone logs

    one = tmp_path / "one.pt"
    r1 = subprocess.run([sys.executable, "-m", "FPDenoiseLib.cli", "train", "--data", str(data), "--out", str(one),
                         "--batch-size", "8", *COMMON], env=ENV, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    single = load_checkpoint(one)["models"]
    for name, atol in (("restoration", 1e-6), ("denoiser", 2 * LR * STEPS)):
        a, b = ck["models"][name]["state_dict"], single[name]["state_dict"]
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= atol, f"{name}: max |w_ddp - w_single| = {worst:.3g} > {atol:.3g}"
    assert abs(_val_psnr(r.stdout) - _val_psnr(r1.stdout)) < 1.0
