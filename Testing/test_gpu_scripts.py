"""The prepared device run ``scripts/gpu_chain.sh``, end to end on the CPU with a tiny net.

It only ever runs on a lent GPU (CI has none, and a session gets 15 minutes of one at most), so a
broken flag or a failed merge would cost that whole chance: this dry run takes every stage of it
(calibration, continuation, soup, specialists, merge, the FP / MSE pair, interpolation, export) and
checks the merges' arithmetic and that the result is within the device's limit of 8 files back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume_kill import make_data

from FPDenoiseLib.checkpoint import load_checkpoint, model_from_checkpoint
from FPDenoiseLib.inference import Denoiser

ROOT = Path(__file__).resolve().parents[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return model_from_checkpoint(load_checkpoint(path), "denoiser").state_dict()


def _dry_run(tmp_path: Path, init_flags: tuple[str, ...] = (), **extra: str) -> tuple[Path, Path, Path, dict]:
    """The chain on the CPU with a tiny net from a shipped-style INIT; returns (out, work, init, env)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    py = [sys.executable]
    data = make_data(tmp_path / "data")
    pack = tmp_path / "corpus.slices.npz"
    subprocess.run(py + [str(ROOT / "scripts" / "pack_corpus.py"), "--data", str(data), "--out", str(pack)],
                   check=True, env=env, capture_output=True)
    # INIT as the chain gets it: a shipped-style file (float16, f in the shared file next to it)
    subprocess.run(py + ["-m", "FPDenoiseLib.cli", "train", "--data", str(pack), "--arch", "resunet", "--stage", "both",
                         "--base-channels", "4", "--restoration-steps", "2", "--steps", "2", "--patch-size", "32",
                         "--bank-size", "32", "--estimator-global", "--impulse-filter", "--residual-gate", "150",
                         "--device", "cpu", "--out", str(tmp_path / "init_run.pt"), *init_flags],
                   check=True, env=env, capture_output=True)
    (tmp_path / "ship").mkdir()
    init = tmp_path / "ship" / "init.pt"
    subprocess.run(py + [str(ROOT / "scripts" / "export_model.py"), str(tmp_path / "init_run.pt"), str(init), "--shipped"],
                   check=True, env=env, capture_output=True)
    out, work = tmp_path / "out", tmp_path / "work"
    env_chain = {**env, "OUT": str(out), "WORK": str(work), "DEVICE": "cpu", "INIT": str(init), "PACK": str(pack),
                 "BASE": "4", "BUDGET_A": "1", "BUDGET_S": "1", "BUDGET_B": "1", "CAL_STEPS": "2", "BANK": "32",
                 "BATCH": "2", "PATCH": "32", "WORKERS": "0", "HARD_S": "3000", **extra}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_chain.sh")], env=env_chain, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return out, work, init, env


@pytest.mark.slow
def test_gpu_chain_dry_run_on_cpu(tmp_path):
    out, work, init, env = _dry_run(tmp_path)
    # a pack that was not carried stops the run before any device minute goes to training
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_chain.sh")], capture_output=True, text=True,
                       env={**env, "OUT": str(tmp_path / "out2"), "WORK": str(tmp_path / "work2"),
                            "PACK": str(tmp_path / "missing.slices.npz")})
    assert r.returncode == 2 and "carry gpu/" in r.stderr and not (tmp_path / "work2").exists(), r.stderr
    got = sorted(p.name for p in out.iterdir())
    assert got == sorted(["default.pt", "mse_twin.pt", "fp.pt", "twin.pt", "soup.pt", "base.pt",
                          "fpdenoise_restoration.pt", "logs.tgz"]), got
    assert len(got) <= 8  # the device returns at most 8 files
    # the merges: soup0 = INIT : A 1:1, soup = soup0 : G : P 2:1:1, the pair = fine-tune : soup 0.7 : 0.3
    w = {n: _weights(work / f"{n}.pt") for n in ("soup0", "base", "G", "P", "soup", "fp", "twin", "fp_mix", "twin_mix")}
    w["init"] = _weights(init)
    for k in w["soup"]:
        if not w["soup"][k].is_floating_point():
            continue
        torch.testing.assert_close(w["soup0"][k], 0.5 * w["base"][k] + 0.5 * w["init"][k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w["soup"][k], 0.5 * w["soup0"][k] + 0.25 * w["G"][k] + 0.25 * w["P"][k],
                                   atol=1e-6, rtol=1e-5)
        for n in ("fp", "twin"):
            torch.testing.assert_close(w[f"{n}_mix"][k], 0.7 * w[n][k] + 0.3 * w["soup"][k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(w["fp"][k], w["twin"][k]) for k in w["fp"])  # the FP term did act
    # the specialists' noise, and a pair that differs only in the loss
    tr = {n: load_checkpoint(work / f"{n}.pt")["training"] for n in ("base", "G", "P", "fp", "twin")}
    assert tr["G"]["noises"] == ["gaussian"] and tr["G"]["level_range"] == [0.0, 0.5]
    assert tr["P"]["noises"] == ["poisson"] and len(set(tr["base"]["noises"])) == 13
    assert (tr["fp"]["loss"], tr["twin"]["loss"], tr["fp"]["lam"]) == ("fp", "mse", 0.08)
    same = ("noises", "seed", "steps", "lr", "init", "level_range", "batch_size", "patch_size", "residual_norm")
    assert all(tr["fp"][k] == tr["twin"][k] for k in same), {k: (tr["fp"][k], tr["twin"][k]) for k in same}
    # the candidates load as shipped models do (map fit, gate 200) and denoise
    default = load_checkpoint(out / "default.pt")
    cfg = default["models"]["denoiser"]["config"]
    assert cfg["map_fit"] and cfg["residual_gate"] == 200.0 and default["training"]["loss"] == "fp"
    assert load_checkpoint(out / "mse_twin.pt")["training"]["loss"] == "mse"
    x = np.random.default_rng(0).random((48, 48)).astype(np.float32)
    y = Denoiser(out / "default.pt", device="cpu").denoise_normalized(x)
    assert y.shape == x.shape and np.isfinite(y).all()


@pytest.mark.slow
def test_gpu_chain_adds_attention_levels_to_an_init_that_has_some(tmp_path):
    """ATTN="1 2 3" from an INIT with attention at 2 3 (the shipped pair): every run adds level 1 and keeps
    the INIT's layers; soup0 averages INIT as the same net with a zero level-1 layer."""
    out, work, init, _ = _dry_run(tmp_path, ("--attention", "2", "3"), ATTN="1 2 3", MIX="0.8")
    for n in ("base", "soup0", "soup", "fp", "twin"):
        assert load_checkpoint(work / f"{n}.pt")["models"]["denoiser"]["config"]["attention"] == [1, 2, 3], n
    assert load_checkpoint(out / "default.pt")["models"]["denoiser"]["config"]["attention"] == [1, 2, 3]
    base, soup0, ini = _weights(work / "base.pt"), _weights(work / "soup0.pt"), _weights(init)
    assert any(".2.qkv." in k for k in ini)  # the INIT's own attention layers
    for k, v in soup0.items():
        if not v.is_floating_point():
            continue
        want = (0.5 * base[k] + 0.5 * ini[k] if k in ini else 0.5 * base[k] if ".proj." in k else base[k])
        torch.testing.assert_close(v, want, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_gpu_chain_grows_the_width_of_an_init_with_attention(tmp_path):
    """BASE wider than an INIT with attention (the shipped pair: 24 with layers at 2 3) and ATTN="1 2 3":
    A grows the width with the INIT's heads kept and adds level 1; every run has the wider net."""
    out, work, init, _ = _dry_run(tmp_path, ("--base-channels", "12", "--attention", "2", "3"), BASE="18",
                                  ATTN="1 2 3", MIX="0.8")
    for n in ("base", "soup0", "soup", "fp", "twin"):
        cfg = load_checkpoint(work / f"{n}.pt")["models"]["denoiser"]["config"]
        assert cfg["channels"] == [18, 36, 72, 144] and cfg["attention"] == [1, 2, 3], (n, cfg)
    assert load_checkpoint(out / "default.pt")["models"]["denoiser"]["config"]["channels"][0] == 18


@pytest.mark.slow
def test_gpu_chain_with_attention(tmp_path):
    """ATTN="2 3": every run grows the attention layers; soup0 averages INIT as the same net with zero output
    projections (and base's q, k, v), and the candidates carry the layers."""
    out, work, init, _ = _dry_run(tmp_path, ATTN="2 3", MIX="0.8")
    for n in ("base", "soup0", "soup", "fp", "twin", "fp_mix"):
        assert load_checkpoint(work / f"{n}.pt")["models"]["denoiser"]["config"]["attention"] == [2, 3], n
    assert load_checkpoint(out / "default.pt")["models"]["denoiser"]["config"]["attention"] == [2, 3]
    base, soup0, ini = _weights(work / "base.pt"), _weights(work / "soup0.pt"), _weights(init)
    for k, v in soup0.items():
        if not v.is_floating_point():
            continue
        want = (0.5 * base[k] + 0.5 * ini[k] if k in ini else 0.5 * base[k] if ".proj." in k else base[k])
        torch.testing.assert_close(v, want, atol=1e-6, rtol=1e-5)
    fp, fp_mix, soup = _weights(work / "fp.pt"), _weights(work / "fp_mix.pt"), _weights(work / "soup.pt")
    for k in fp:
        if fp[k].is_floating_point():
            torch.testing.assert_close(fp_mix[k], 0.8 * fp[k] + 0.2 * soup[k], atol=1e-6, rtol=1e-5)
