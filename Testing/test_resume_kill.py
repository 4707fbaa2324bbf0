"""Training survives ``kill -9``: a real ``fpdenoise train`` subprocess is SIGKILLed mid-run (once in
stage 1, once in stage 2, and once in each stage in one chain), resumed with ``--resume``, and its
final weights must equal an uninterrupted run's bit for bit on CPU (``torch.equal`` on every tensor).

Why exact equality holds: every random draw of step ``s`` comes from
``default_rng([seed, rank, s, stage])`` and the batch order from a seeded DistributedSampler, the
checkpoint carries the weights, the Adam moments and the LR-scheduler state, and single-threaded
CPU kernels are deterministic. The kill lands at an arbitrary moment (possibly while a
checkpoint is being written), which also exercises the atomic checkpoint write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from FPDenoiseLib.checkpoint import load_checkpoint

REST, STEPS = 24, 24
ARGS = ["--base-channels", "4", "--depth", "2", "--patch-size", "32", "--batch-size", "4", "--bank-size", "64",
        "--restoration-steps", str(REST), "--steps", str(STEPS), "--ckpt-every", "2", "--val-every", "8",
        "--device", "cpu", "--seed", "3", "--progress-lines"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_data(folder: Path) -> Path:
    """Three 128x128 textured 8-bit images (validation crops are 128 px)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128]
    for i in range(3):
        a = 0.5 + 0.3 * np.sin(xx / (5 + i)) * np.cos(yy / (7 + i)) + 0.1 * rng.random((128, 128))
        a[(xx - 64) ** 2 + (yy - 60) ** 2 < (20 + 5 * i) ** 2] += 0.2
        PILImage.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "FPDenoiseLib.cli", "train", "--data", str(data), "--out", str(out), *ARGS, *extra]


def run_to_end(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run(_cmd(data, out, *extra), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_and_kill(data: Path, out: Path, stage: str, at: int, *extra: str) -> dict:
    """Start training, SIGKILL it right after the PROGRESS line ``at`` of ``stage``; return the
    resume state found in the checkpoint afterwards."""
    p = subprocess.Popen(_cmd(data, out, *extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    killed = False
    try:
        for line in p.stdout:  # "PROGRESS done total stage: ..."
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "PROGRESS" and parts[3].rstrip(":") == stage and int(parts[1]) >= at:
                os.kill(p.pid, signal.SIGKILL)
                killed = True
                break
    finally:
        if not killed:
            p.kill()
        p.wait(timeout=60)
        p.stdout.close()
    assert killed and p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt = load_checkpoint(out)  # atomic writes: whatever is there is a complete, verified checkpoint
    assert ckpt["training"]["completed"] is False
    return ckpt["resume"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(path)
    assert ck["training"]["completed"] is True and "resume" not in ck
    return {f"{m}.{k}": v for m, e in ck["models"].items() for k, v in e["state_dict"].items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("ref")
    data = make_data(d / "data")
    run_to_end(data, d / "ref.pt")
    return data, weights(d / "ref.pt")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}: max |d| = " + \
        f"{max(float((a[k] - b[k]).abs().max()) for k in diff):.3g}"


# (kills as (stage, progress step)) — kill in stage 1, in stage 2, and one in each stage
CASES = {"stage1": [("restoration", 5)], "stage2": [("denoiser", 7)],
         "both": [("restoration", 11), ("denoiser", 3)]}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_kill_and_resume_gives_identical_weights(tmp_path, reference, case):
    data, ref = reference
    out = tmp_path / "run.pt"
    for stage, at in CASES[case]:
        extra = ("--resume",) if out.exists() else ()
        state = run_and_kill(data, out, stage, at, *extra)
        total = REST if stage == "restoration" else STEPS
        # killed mid-stage: the checkpoint holds an intermediate step of the right stage
        assert state["stage"] == stage and 0 < state["step"] < total, state["step"]
        assert state["step"] % 2 == 0 and "optimizer" in state and "scheduler" in state
    t0 = time.time()
    r = run_to_end(data, out, "--resume")
    assert f"PROGRESS {state['step']} " in r.stdout, "resume did not continue from the checkpointed step"
    assert time.time() - t0 < 600
    assert_same(weights(out), ref)


def test_resume_of_completed_run_is_a_no_op(tmp_path, reference):
    data, _ = reference
    out = tmp_path / "done.pt"
    short = ("--restoration-steps", "2", "--steps", "2")  # later flags override ARGS
    run_to_end(data, out, *short)
    before = out.read_bytes()
    r = run_to_end(data, out, *short, "--resume")
    assert "already completed" in r.stderr and out.read_bytes() == before
