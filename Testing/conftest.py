"""Shared fixtures: tiny real checkpoints and small real image files made per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Two cores on CI: one intra-op thread per test process avoids oversubscription stalls.
torch.set_num_threads(int(os.environ.get("FPDENOISE_TEST_THREADS", "1")))

POLICY = {"ct_window": [-1024.0, 3071.0], "percentiles": [0.5, 99.5]}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real (untrained, random) checkpoint with base_channels=4: fast, exercises every code path."""
    from FPDenoiseLib.checkpoint import save_checkpoint
    from FPDenoiseLib.models import UNet

    torch.manual_seed(0)
    den = UNet(base_channels=4)
    torch.nn.init.normal_(den.head.weight, std=0.01)  # not the identity, so outputs differ from inputs
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"denoiser": den, "restoration": UNet(base_channels=4, residual=False)},
                    normalization=POLICY, training={"name": "tiny"})
    return path


def ct_phantom(shape=(3, 40, 48), seed: int = 0) -> np.ndarray:
    """Small int16 HU volume: air, soft tissue disc, bone ring, noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    r = np.hypot(y - shape[1] / 2, x - shape[2] / 2)
    hu = np.full(shape, -1000.0)
    hu[r < shape[1] * 0.4] = 40.0
    hu[(r > shape[1] * 0.3) & (r < shape[1] * 0.35)] = 1200.0
    hu += rng.normal(0, 20, shape)
    return hu.astype(np.int16)


@pytest.fixture()
def ct_nrrd(tmp_path) -> Path:
    """A real NRRD CT file with anisotropic spacing, origin and a non-identity direction."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(ct_phantom())
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-10.0, 20.0, 30.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    img.SetMetaData("FPDenoise_modality", "CT")
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint) -> Path:
    """The shipped default model when present (real behaviour), else the tiny checkpoint."""
    from FPDenoiseLib.inference import default_model_path

    return default_model_path() if default_model_path().is_file() else tiny_checkpoint
