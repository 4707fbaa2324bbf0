"""Compute-device selection: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import platform

import torch

from .errors import FPDenoiseError


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device for ``name`` ("auto", "cpu", "cuda", "cuda:1", "mps").

    "auto" picks CUDA when usable, then MPS, then CPU. Asking for a device that is not usable
    raises :class:`FPDenoiseError` with the reason (e.g. a CPU-only torch build).

    >>> pick_device("cpu")
    device(type='cpu')
    """
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise FPDenoiseError(
                f"CUDA was requested but is not available (installed torch {torch.__version__} is {build}"
                " or no NVIDIA driver/GPU was found); use --device cpu or install a CUDA build of torch"
            )
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise FPDenoiseError("MPS was requested but is not available on this machine; use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise FPDenoiseError(f"unknown device {name!r}: use auto, cpu, cuda or mps")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively: CUDA's check; on x86 CPUs the AVX512-BF16 or AMX
    instructions; on other CPUs oneDNN's check.

    oneDNN's own check also says yes on AVX512 CPUs without bf16 instructions (Skylake / Cascade Lake
    Xeons), where it emulates bf16 and the default ``--precision auto`` would gain nothing.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            if platform.machine().lower() in ("x86_64", "amd64", "x86", "i386", "i686"):
                return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # an older torch, or a build without oneDNN: float32
            return False
    return False
