"""Two-stage training (paper Fig. 1).

Stage 1 ("restoration"): the restoration net ``f`` learns clean -> clean.
Stage 2 ("denoiser"): the denoiser ``D`` learns noisy -> clean with
``residual loss + lambda * ||GB_f(D(x~)) - GB_f(x)||^2`` (``loss="fp"``) or the residual loss
alone (``loss="mse"``, the ablation twin: identical data, noise, seed, steps and schedule).

Design choices:
- Clean data is a fixed *bank* of patches cut once (seeded) from the training slices, so
  ``GB_f(x)`` is computed once per patch after stage 1 and reused every step (f is frozen).
  Fresh noise is drawn every step, so the noisy inputs never repeat.
- All randomness of step ``s`` comes from ``numpy.random.default_rng([seed, rank, s])`` and
  the batch order from a ``DistributedSampler`` keyed by ``(seed, epoch)``: training is a pure
  function of (data, config, step), so ``--resume`` after a kill continues bit-identically on
  CPU, and ranks under ``torchrun`` draw disjoint batches without sharing RNG state.
- The checkpoint (atomic) is rewritten every ``ckpt_every`` steps with model, optimiser,
  scheduler and step; it is a complete, usable model at every point.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import check_compatible, load_checkpoint, model_from_checkpoint, save_checkpoint
from .device import pick_device
from .errors import CheckpointError, InputError
from .intensity import DEFAULT_POLICY
from .losses import MAP_LOSSES, RESIDUAL_NORMS, FPLoss, map_error
from .models import (
    WEIGHTLESS_KEYS,
    ResUNet,
    attention_prefixes,
    build_model,
    grow_attention,
    local_noise_map,
    weight_config,
    widen_resunet,
)
from .xai import DEFAULT_READOUT, guided_backprop

STAGES = ("restoration", "denoiser", "both", "estimator")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint's ``training`` entry).

    Steps count optimiser updates; ``restoration_steps`` defaults to half of ``steps``.
    ``lam`` weights the FP term, a *relative* feature error (see :mod:`FPDenoiseLib.losses`); the
    FP term is kept a small share of the loss so that it shapes features without costing PSNR
    (``scripts/fp_lambda_probe.py`` sizes it; measurements in ``Resources/Models/README.md``).
    ``level_range``: noise severities are drawn uniformly from it; it must reach 0, or mildly
    corrupted images get over-smoothed.
    """

    data: list[str] = field(default_factory=list)
    out: str = "fpdenoise.pt"
    stage: str = "both"
    loss: str = "fp"
    lam: float = 0.01
    noises: list[str] = field(default_factory=lambda: ["mix"])
    level_range: tuple[float, float] = (0.0, 0.6)
    arch: str = "unet"
    base_channels: int = 16
    depth: int = 4
    max_channels: int = 128
    steps: int = 2000
    restoration_steps: int | None = None
    batch_size: int = 16
    patch_size: int = 64
    bank_size: int = 2048
    val_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    val_every: int = 200
    ckpt_every: int = 100
    init: str | None = None  # checkpoint giving the restoration net (stage "denoiser") / start weights
    max_slices_per_volume: int | None = 64
    name: str | None = None
    save_dtype: str = "float32"  # "float16" halves the shipped file
    amp: str = "off"  # "bf16": autocast mixed precision (GPU runs; weights and optimiser stay float32)
    readout: str = DEFAULT_READOUT  # what GB explains (see FPDenoiseLib.xai.READOUTS)
    # Noise-aware denoisers (arch "resunet"): fraction of samples left clean (the identity must be
    # learned exactly, not only approximately at small levels), fraction of samples fed the true
    # local noise map instead of the estimator's (so the map input, and hence --strength, has a
    # meaning), and the weight of the estimator's L1 loss against the true map.
    zero_level_prob: float = 0.0
    true_map_prob: float = 0.5
    map_weight: float = 0.1
    map_loss: str = "l1"  # estimator loss: "l1" = |est - true|; "log" = |log(e + est) - log(e + true)| (relative)
    residual_gate: float = 40.0  # resunet: D(y) = y + tanh(gate * m) R; larger = full correction at lower noise
    impulse_filter: bool = False  # resunet: switching-median pre-stage for salt & pepper (models.impulse_mask)
    estimator_global: bool = False  # resunet: the noise estimator also sees image-wide feature means
    map_fit: bool = False  # resunet: the denoiser's map is fitted to the local intensity (models.fit_noise_map)
    residual_norm: str = "mean"  # "log": mean per-sample log-MSE, i.e. train for mean PSNR (losses.FPLoss)
    workers: int = 0  # DataLoader processes synthesising noise (GPU runs: keeps the card fed)
    # Exponential moving average of the weights (decay per step; 0 = off): the run validates and
    # ships the average, which smooths the last steps' noise out of the weights.
    ema: float = 0.0
    # resunet: levels with self-attention (models.WindowAttention; the bottom level attends globally).
    # Grown from an --init without it, zero-initialised: training starts from the init's output.
    attention: list[int] = field(default_factory=list)
    trainable: str = "all"  # "attention": only the attention layers learn, every other weight stays the init's

    def model_config(self, role: str) -> dict:
        if self.arch == "resunet" and role == "denoiser":
            b = self.base_channels
            return {"arch": "resunet", "channels": [b, 2 * b, 4 * b, 8 * b], "blocks": 2, "unshuffle": 2,
                    "estimator_channels": 24, "estimator_depth": 5, "residual_gate": self.residual_gate,
                    "impulse_filter": self.impulse_filter, "estimator_global": self.estimator_global,
                    **({"map_fit": True} if self.map_fit else {}),
                    **({"attention": sorted(set(self.attention))} if self.attention else {})}
        if self.arch == "drunet" and role == "denoiser":
            return {"arch": "drunet", "base_channels": self.base_channels, "blocks": 2, "noise_level_map": False, "residual": True}
        return {
            "arch": "unet",
            "in_channels": 1,
            "out_channels": 1,
            "base_channels": self.base_channels,
            "depth": self.depth,
            "residual": role == "denoiser",
            "max_channels": self.max_channels,
        }


def _same_weights(a: dict, b: dict) -> bool:
    # a checkpoint trained with other weightless settings still initialises the net
    return weight_config(a) == weight_config(b)


def _without(config: dict, *keys: str) -> dict:
    return {k: v for k, v in config.items() if k not in keys}


def _adds_attention(a: dict, b: dict) -> bool:
    """``b`` is resunet ``a`` with attention layers added (at levels ``a`` has none)."""
    have, want = set(a.get("attention", ())), set(b.get("attention", ()))
    return a.get("arch") == "resunet" and have < want and _same_weights(_without(a, "attention"),
                                                                          _without(b, "attention"))


def _widens(a: dict, b: dict) -> bool:
    """``b`` is resunet ``a`` with at least as many channels per level, maybe attention at more levels,
    and no other weight change."""
    if a.get("arch") != "resunet" or b.get("arch") != "resunet" or len(a["channels"]) != len(b["channels"]):
        return False
    return (set(a.get("attention", ())) <= set(b.get("attention", ()))
            and _same_weights(_without(a, "channels", "attention"), _without(b, "channels", "attention"))
            and all(x <= y for x, y in zip(a["channels"], b["channels"])))  # noqa: B905


# ---------------------------------------------------------------- distributed helpers
def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join a ``torchrun`` process group when launched by it (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return torch.distributed.is_available() and torch.distributed.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return True


# ---------------------------------------------------------------- data
class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class BatchSchedule:
    """Batch indices of step ``s`` as a pure function of ``s`` (DistributedSampler order)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        rank, world = _dist_info()
        self.sampler = torch.utils.data.DistributedSampler(
            _IndexDataset(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = min(batch_size, len(self.sampler))
        self.per_epoch = max(1, len(self.sampler) // self.batch_size)
        self._epoch = -1
        self._order: list[int] = []

    def indices(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order, self._epoch = list(iter(self.sampler)), epoch
        return np.asarray(self._order[pos * self.batch_size : (pos + 1) * self.batch_size])


def _noise_fn(names: Sequence[str], level_range: tuple[float, float], zero_prob: float = 0.0) -> Callable:
    from .noise import NOISE_NAMES, add_noise

    pool = list(NOISE_NAMES) if (not names or list(names) == ["mix"]) else list(names)
    unknown = [n for n in pool if n not in NOISE_NAMES]
    if unknown:
        raise InputError(f"unknown noise type(s) {unknown}; choose from: mix, {', '.join(NOISE_NAMES)}")

    def apply(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.empty_like(batch)
        for i in range(batch.shape[0]):
            name = pool[int(rng.integers(len(pool)))]
            level = float(rng.uniform(*level_range))
            if zero_prob > 0 and rng.random() < zero_prob:
                out[i, 0] = batch[i, 0]
                continue
            out[i, 0] = add_noise(batch[i, 0], name, level=level, seed=rng)
        return out

    return apply


def build_bank(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cut the fixed clean-patch bank and the validation images from ``cfg.data``.

    Returns ``(bank (N,1,P,P), val (V,1,S,S), sources)``; validation slices are held out from
    the bank (every 8th slice) so validation PSNR measures generalisation to unseen slices.
    """
    from .data import FixedPatchSet, load_clean_slices

    slices = load_clean_slices(cfg.data, max_slices_per_volume=cfg.max_slices_per_volume, seed=cfg.seed)
    if len(slices) >= 4:
        val_slices = slices[::8]
        train_slices = [s for i, s in enumerate(slices) if i % 8]
    else:
        val_slices, train_slices = slices, slices
    bank = FixedPatchSet(train_slices, n_patches=cfg.bank_size, patch_size=cfg.patch_size, seed=cfg.seed).patches
    vsize = max(cfg.patch_size, 128)
    val = FixedPatchSet(val_slices, n_patches=cfg.val_size, patch_size=vsize, seed=cfg.seed + 1).patches
    sources = sorted({s.source for s in slices})
    return bank.astype(np.float32), val.astype(np.float32), sources


# ---------------------------------------------------------------- loop
class ProgressBar:
    """tqdm bar on stderr, or ``PROGRESS done total message`` lines on stdout (for GUIs)."""

    def __init__(self, total: int, desc: str, lines: bool, enabled: bool = True) -> None:
        self.lines, self.total, self.desc = lines, total, desc
        self.bar = None
        if enabled and not lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        self.enabled = enabled

    def update(self, done: int, msg: str = "") -> None:
        if not self.enabled:
            return
        if self.lines:
            print(f"PROGRESS {done} {self.total} {self.desc}: {msg}", flush=True)
        elif self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(msg, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def validation_scores(model: nn.Module, val: np.ndarray, noise: Callable, seed: int, device: torch.device,
                      batch: int = 64) -> dict[str, np.ndarray]:
    """Per-patch PSNR / SSIM (dB, capped at 100) of ``model`` on ``val`` noised with ``noise`` at ``seed``.

    The same seed gives the same noisy patches to every model, so two models' scores pair up.
    """
    from .metrics import psnr, ssim

    rng = np.random.default_rng([seed, 10_000_019])
    noisy = noise(val, rng)
    model.eval()
    with torch.inference_mode():
        den = np.concatenate([model(torch.from_numpy(noisy[i : i + batch]).to(device)).float().cpu().numpy()
                              for i in range(0, len(noisy), batch)])
    model.train()
    ps, ss, ps0 = [], [], []
    for c, n, d in zip(val[:, 0], noisy[:, 0], den[:, 0]):
        rng_ = max(float(c.max() - c.min()), 1e-6)
        ps.append(min(psnr(c, d, data_range=rng_), 100.0))
        ps0.append(min(psnr(c, n, data_range=rng_), 100.0))
        ss.append(ssim(c, d, data_range=rng_))
    return {"psnr": np.asarray(ps), "ssim": np.asarray(ss), "psnr_noisy": np.asarray(ps0)}


def _validate(model: nn.Module, val: np.ndarray, noise: Callable, seed: int, device: torch.device) -> dict:
    return {k: float(v.mean()) for k, v in validation_scores(model, val, noise, seed, device).items()}


class _StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is the batch of step ``start + i``: noise synthesis (numpy, CPU) in workers."""

    def __init__(self, make_batch: Callable[[int], object], start: int, stop: int) -> None:
        self.make_batch, self.start, self.n = make_batch, start, max(0, stop - start)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> object:
        return self.make_batch(self.start + i)


def _batches(make_batch: Callable[[int], object], start: int, stop: int, workers: int, device: torch.device):
    """Batches of steps ``start..stop-1`` in order. Each is a pure function of its step, so worker
    processes give exactly the batches of the in-process loop (``workers=0``), only sooner."""
    import multiprocessing as mp

    if workers <= 0 or "fork" not in mp.get_all_start_methods():
        return (make_batch(s) for s in range(start, stop))
    loader = torch.utils.data.DataLoader(
        _StepBatches(make_batch, start, stop), batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=4, pin_memory=device.type == "cuda", multiprocessing_context="fork",
    )
    return iter(loader)


class _Ema:
    """Exponential moving average of a model's floating-point weights (off when ``decay`` is 0).

    The decay warms up as ``min(decay, (1 + t) / (10 + t))`` so that a short run is not dominated by
    its starting weights; the average lives in float32 on the model's device.
    """

    def __init__(self, model: nn.Module, decay: float, state: dict | None) -> None:
        self.model, self.decay = model, decay
        self.avg: dict[str, torch.Tensor] = {}
        if decay:
            live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
            src = state if state is not None else live
            self.avg = {k: src[k].detach().to(v.device, torch.float32).clone() for k, v in live.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        if not self.decay:
            return
        d = min(self.decay, (1 + step) / (10 + step))
        live = self.model.state_dict()
        for k, a in self.avg.items():
            a.mul_(d).add_(live[k].detach().float(), alpha=1 - d)

    def state(self) -> dict:
        # references, like opt.state_dict(): the checkpoint is written before the next update
        return {"ema": dict(self.avg)} if self.decay else {}

    @torch.no_grad()
    def apply(self) -> None:
        if self.decay:
            self.model.load_state_dict(self.avg, strict=False)

    @contextlib.contextmanager
    def swapped(self):
        """Run the body with the averaged weights in the model, then restore the live ones."""
        if not self.decay:
            yield
            return
        live = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.avg}
        self.apply()
        try:
            yield
        finally:
            self.model.load_state_dict(live, strict=False)


def _run_stage(
    role: str,
    model: nn.Module,
    cfg: TrainConfig,
    steps: int,
    make_batch: Callable[[int], object],
    step_fn: Callable[[object, nn.Module], tuple[torch.Tensor, dict]],
    save: Callable[[int, dict], None],
    resume_state: dict | None,
    device: torch.device,
    validate: Callable[[], dict] | None,
    progress_lines: bool,
    history: list,
) -> None:
    rank, world = _dist_info()
    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps), eta_min=cfg.lr * 0.02)
    start = 0
    if resume_state is not None and resume_state.get("stage") == role:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        start = int(resume_state["step"])
    ema = _Ema(model, cfg.ema, (resume_state or {}).get("ema") if start else None)
    bar = ProgressBar(steps, role, progress_lines, enabled=rank == 0)
    bar.update(start)
    t0 = time.time()
    model.train()
    for step, batch in zip(range(start, steps), _batches(make_batch, start, steps, cfg.workers, device)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            loss, parts = step_fn(batch, wrapped)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        ema.update(done)
        if not math.isfinite(parts["total"]):
            raise FloatingPointError(f"{role} loss became {parts['total']} at step {done}; lower --lr")
        msg = " ".join(f"{k}={v:.3g}" for k, v in parts.items())
        if validate is not None and (done % cfg.val_every == 0 or done == steps):
            with ema.swapped():
                v = validate()
            history.append({"stage": role, "step": done, **v, **parts})
            msg += f" val_psnr={v['psnr']:.2f} (noisy {v['psnr_noisy']:.2f}) val_ssim={v['ssim']:.3f}"
            if progress_lines and rank == 0:
                print(f"VAL {role} step={done} psnr={v['psnr']:.3f} ssim={v['ssim']:.4f}", flush=True)
        bar.update(done, msg)
        if rank == 0 and (done % cfg.ckpt_every == 0 or done == steps):
            save(done, {"stage": role, "step": done, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        **ema.state()})
    bar.close()
    ema.apply()  # the finished stage keeps (and ships) the averaged weights
    if rank == 0:
        print(f"{role}: {steps - start} steps in {time.time() - t0:.1f}s", file=sys.stderr)


def weights_digest(models: dict[str, nn.Module] | dict[str, dict]) -> str:
    """SHA-256 of the float32 weights of ``models`` (modules or state dicts), in name order.

    Used to check that ``torchrun`` ranks ended with identical weights.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(models):
        m = models[name]
        sd = m.state_dict() if isinstance(m, nn.Module) else m
        for k in sorted(sd):
            t = sd[k].detach().cpu()
            t = t.float() if t.is_floating_point() else t
            h.update(f"{name}.{k}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def train(cfg: TrainConfig, *, resume: bool = False, progress_lines: bool = False, print_digest: bool = False) -> Path:
    """Run the configured stage(s) and write ``cfg.out``; returns its path.

    ``resume=True`` continues from ``cfg.out`` if it holds a resume state of the same config
    (after a crash or kill); otherwise training starts from scratch and overwrites ``cfg.out``.
    ``print_digest=True`` makes every rank print ``WEIGHT_DIGEST rank=R world=W <sha256>`` of its
    final weights on stderr (to check that distributed ranks stayed in sync).
    """
    if cfg.stage not in STAGES:
        raise InputError(f"unknown stage {cfg.stage!r}; choose from {', '.join(STAGES)}")
    if not 0.0 <= cfg.ema < 1.0:
        raise InputError(f"--ema must be in [0, 1) (a decay per step such as 0.999), got {cfg.ema}")
    if cfg.amp not in ("off", "bf16"):
        raise InputError(f"unknown --amp {cfg.amp!r}; choose off or bf16")
    if cfg.attention and cfg.arch != "resunet":
        raise InputError("--attention needs --arch resunet")
    levels = len(cfg.model_config("denoiser").get("channels", ())) if cfg.arch == "resunet" else 0
    if any(not 0 <= a < levels for a in cfg.attention):  # 0 = the top level
        raise InputError(f"--attention levels must be in 0..{levels - 1} (0 = the top, {levels - 1} = the bottom), "
                         f"got {cfg.attention}")
    if cfg.trainable not in ("all", "attention"):
        raise InputError(f"unknown --trainable {cfg.trainable!r}; choose all or attention")
    if cfg.trainable == "attention" and not (cfg.attention and cfg.stage == "denoiser"):
        raise InputError("--trainable attention trains only the attention layers: it needs --attention and --stage denoiser")
    if cfg.loss not in ("fp", "mse"):
        raise InputError(f"unknown loss {cfg.loss!r}; choose fp or mse")
    if cfg.map_loss not in MAP_LOSSES:
        raise InputError(f"unknown map loss {cfg.map_loss!r}; choose from {', '.join(MAP_LOSSES)}")
    if cfg.residual_norm not in RESIDUAL_NORMS:
        raise InputError(f"unknown residual norm {cfg.residual_norm!r}; choose from {', '.join(RESIDUAL_NORMS)}")
    if not cfg.data:
        raise InputError("no training data given (--data DIR)")
    device = pick_device(cfg.device)
    distributed = init_distributed(device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    rank, _world = _dist_info()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    restoration_steps = cfg.restoration_steps if cfg.restoration_steps is not None else cfg.steps // 2
    normalization = {k: list(v) for k, v in DEFAULT_POLICY.items()}
    info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    info.update(version=__version__, name=cfg.name or out.stem, completed=False, restoration_steps=restoration_steps)

    state = None
    prior = None
    if resume and out.exists():
        prior = load_checkpoint(out)
        state = prior.get("resume")
        if state is None and prior.get("training", {}).get("completed"):
            print(f"{out}: training already completed; nothing to resume", file=sys.stderr)
            return out
        # a frozen f (stages denoiser / estimator) came from --init and is reloaded from the prior run as
        # it is: only the nets this run trains must match the flags (a grown denoiser has a wider
        # --base-channels than its init's f)
        trained = [r for r in prior.get("models", {}) if r == "denoiser" or cfg.stage in ("restoration", "both")]
        check_compatible(prior, configs={r: cfg.model_config(r) for r in trained}, normalization=normalization)
    init = load_checkpoint(cfg.init) if cfg.init else None

    # Networks
    f = model_from_checkpoint(prior, "restoration") if prior and "restoration" in prior["models"] else None
    if f is None and init is not None and "restoration" in init["models"] and cfg.stage in ("denoiser", "estimator"):
        f = model_from_checkpoint(init, "restoration")
    if f is None:
        if cfg.stage == "denoiser" and cfg.loss == "fp":
            raise CheckpointError("stage 'denoiser' with the FP loss needs a restoration net: pass --init CKPT")
        torch.manual_seed(cfg.seed)
        f = build_model(cfg.model_config("restoration"))
    f = f.to(device)
    d_prior = prior if (prior and "denoiser" in prior["models"]) else None
    if d_prior is not None:
        D = model_from_checkpoint(d_prior, "denoiser")
    elif init is not None and "denoiser" in init["models"] and (
        cfg.stage == "estimator"
        or _same_weights(init["models"]["denoiser"]["config"], cfg.model_config("denoiser"))
        or _adds_attention(init["models"]["denoiser"]["config"], cfg.model_config("denoiser"))
    ):
        # fine-tuning: settings that own no weights (gate, impulse pre-stage) may change; the estimator
        # stage starts a new estimator (maybe of another shape) under the trained denoiser
        torch.manual_seed(cfg.seed + 1)
        D = build_model(cfg.model_config("denoiser"))
        src = model_from_checkpoint(init, "denoiser").state_dict()
        if cfg.stage == "estimator":
            src = {k: v for k, v in src.items() if not k.startswith("estimator.")}
        try:
            missing = D.load_state_dict(src, strict=False)
        except RuntimeError:  # same keys, other shapes: the init is another width
            raise CheckpointError(
                f"{cfg.init}: its denoiser has other layer sizes than --arch {cfg.arch} --base-channels "
                f"{cfg.base_channels} (channels {init['models']['denoiser']['config'].get('channels')}); pass the "
                "init's --base-channels"
            ) from None
        # attention layers added to the init start at zero (its output unchanged) and are all it lacks
        if missing.unexpected_keys or any(
            not k.startswith(("estimator.", *attention_prefixes(D))) for k in missing.missing_keys
        ):
            raise CheckpointError(f"{cfg.init}: its denoiser does not match --arch {cfg.arch} apart from the estimator")
    elif init is not None and "denoiser" in init["models"] and _widens(init["models"]["denoiser"]["config"], cfg.model_config("denoiser")):
        # a wider --base-channels than the init's: grow it, output unchanged (widen_resunet)
        small = model_from_checkpoint(init, "denoiser")
        # the settings that own no weights follow the command line, as on the same-shape path
        want = cfg.model_config("denoiser")
        small.config = {**weight_config(small.config), **{k: want[k] for k in WEIGHTLESS_KEYS if k in want}}
        try:
            D = widen_resunet(small, want["channels"], seed=cfg.seed + 1)
        except ValueError as err:
            raise CheckpointError(f"{cfg.init}: {err}") from None
        extra = set(want.get("attention", ())) - set(small.config.get("attention", ()))
        if extra:  # levels the init has no attention at: added after the growth, output unchanged
            D = grow_attention(D, sorted(extra))
    else:
        if cfg.stage == "estimator":
            raise CheckpointError("stage 'estimator' trains the noise estimator of a trained denoiser: pass --init CKPT")
        if init is not None and "denoiser" in init["models"] and cfg.stage in ("denoiser", "both"):
            # only its f is used: say so, a researcher passing --init expects the denoiser to carry over
            print(f"{cfg.init}: its denoiser has another shape than --arch {cfg.arch} --base-channels "
                  f"{cfg.base_channels} (and is not a narrower resunet to grow); starting a new denoiser",
                  file=sys.stderr)
        torch.manual_seed(cfg.seed + 1)
        D = build_model(cfg.model_config("denoiser"))
    D = D.to(device)
    history: list = list((prior or {}).get("training", {}).get("history", []))

    bank_np, val_np, sources = build_bank(cfg)
    info["data_sources"] = sources
    bank = torch.from_numpy(bank_np).to(device)
    noise = _noise_fn(cfg.noises, tuple(cfg.level_range), cfg.zero_level_prob)
    val_noise = _noise_fn(cfg.noises, tuple(cfg.level_range))
    save_dtype = torch.float16 if cfg.save_dtype == "float16" else None

    def saver(models: dict[str, nn.Module]) -> Callable[[int, dict], None]:
        def save(step: int, resume_state: dict) -> None:
            info["history"] = history
            save_checkpoint(out, models, normalization=normalization, training=info, resume=resume_state)

        return save

    schedule = BatchSchedule(len(bank), cfg.batch_size, cfg.seed)  # batch indices: a pure function of the step

    def make_den_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # numpy only: runs in DataLoader workers (--workers) as well as in-process
        rng = np.random.default_rng([cfg.seed, rank, step, 1])
        idx = schedule.indices(step)
        noisy = noise(bank_np[idx], rng)
        teacher = rng.random(len(idx)) < cfg.true_map_prob
        return torch.from_numpy(idx), torch.from_numpy(noisy), torch.from_numpy(teacher)

    # Stage 1: restoration net, clean -> clean.
    run_restoration = cfg.stage in ("restoration", "both") and not (state and state.get("stage") == "denoiser")
    if run_restoration and restoration_steps > 0:

        def step_rest(idx: np.ndarray, net: nn.Module):
            x = bank[torch.as_tensor(idx).to(device)]
            loss = (net(x) - x).pow(2).mean()
            return loss, {"total": float(loss.detach())}

        _run_stage("restoration", f, cfg, restoration_steps, schedule.indices, step_rest, saver({"restoration": f}),
                   state, device, None, progress_lines, history)
        state = None

    # Stage 2: denoiser with frozen f.
    if cfg.stage in ("denoiser", "both"):
        gb_bank = None
        gb_scale = 1.0
        if cfg.loss == "fp":
            # GB(clean) is fixed for a fixed f: computed once here, indexed every step.
            gb_bank = torch.cat(
                [guided_backprop(f, bank[i : i + 64], readout=cfg.readout) for i in range(0, len(bank), 64)]
            )
            gb_scale = float(gb_bank.pow(2).mean().clamp_min(1e-30))
        info["gb_scale"] = gb_scale
        loss_fn = FPLoss(f if cfg.loss == "fp" else None, lam=cfg.lam, mode=cfg.loss, gb_scale=gb_scale,
                         readout=cfg.readout, residual_norm=cfg.residual_norm)

        noise_aware = isinstance(D, ResUNet)

        def step_den(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], net: nn.Module):
            ti = batch[0].to(device)
            clean = bank[ti]
            noisy = batch[1].to(device, non_blocking=True)
            gb = None if gb_bank is None else gb_bank[ti]
            if not noise_aware:
                return loss_fn(net(noisy), noisy, clean, gb)
            target = local_noise_map(noisy - clean)
            teacher = batch[2].to(device)
            den, est = net(noisy, noise_map=target, teacher_mask=teacher, return_map=True)
            loss, parts = loss_fn(den, noisy, clean, gb)
            map_loss = map_error(est, target, cfg.map_loss)
            loss = loss + cfg.map_weight * map_loss
            parts = {**parts, "map": float(map_loss.detach()), "total": float(loss.detach())}
            return loss, parts

        if cfg.trainable == "attention":  # every other weight (estimator included) stays as initialised
            attn = attention_prefixes(D)
            for name, p in D.named_parameters():
                p.requires_grad_(name.startswith(attn))
        models = {"denoiser": D, "restoration": f}
        _run_stage("denoiser", D, cfg, cfg.steps, make_den_batch, step_den, saver(models), state, device,
                   lambda: _validate(D, val_np, val_noise, cfg.seed, device), progress_lines, history)
        final_models = models
    elif cfg.stage == "estimator":
        # Only the noise-level estimator learns (map_error against the true local map); the denoiser, whose
        # input it feeds, stays as trained. Validation shows the denoiser with the new estimate.
        if not isinstance(D, ResUNet):
            raise InputError("stage 'estimator' needs --arch resunet (the noise-aware denoiser)")
        D.requires_grad_(False)
        D.estimator.requires_grad_(True)

        def step_est(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], net: nn.Module):
            clean = bank[batch[0].to(device)]
            noisy = batch[1].to(device, non_blocking=True)
            loss = map_error(net(D.remove_impulses(noisy)), local_noise_map(noisy - clean), cfg.map_loss)
            return loss, {"map": float(loss.detach()), "total": float(loss.detach())}

        final_models = {"denoiser": D, "restoration": f}
        _run_stage("estimator", D.estimator, cfg, cfg.steps, make_den_batch, step_est, saver(final_models), state,
                   device, lambda: _validate(D, val_np, val_noise, cfg.seed, device), progress_lines, history)
    else:
        final_models = {"restoration": f}
    if rank == 0:
        info["completed"] = True
        info["history"] = history
        save_checkpoint(out, final_models, normalization=normalization, training=info, dtype=save_dtype)
    if print_digest:
        print(f"WEIGHT_DIGEST rank={rank} world={_world} {weights_digest(final_models)}", file=sys.stderr, flush=True)
    if distributed:
        torch.distributed.barrier()
    return out

