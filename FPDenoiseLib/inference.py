"""Inference: denoise 2D images and 3D volumes slice by slice, plus Guided-Backprop saliency.

Volumes are processed in batches of axial slices, so peak memory is one batch of float32
slices plus the output array (stored in the input's dtype), whatever the number of slices.
Values come back in the input's units and dtype (CT stays in HU, integer types are rounded and
clipped to their range), and ``run`` keeps the geometry of an :class:`~FPDenoiseLib.io.Image`.

Example:
    >>> den = Denoiser("auto")       # the per-volume model choice of the CLI and GUIs; auto device  # doctest: +SKIP
    >>> out = den.denoise_array(ct_hu_volume, modality="CT")  # same shape/dtype, HU  # doctest: +SKIP
    >>> res = den.run(read_image("chest.nrrd"))            # DenoiseResult with saliency maps  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .device import bf16_supported, pick_device
from .display import feature_change as display_feature_change  # `feature_change` is a process() flag
from .errors import InputError
from .intensity import DEFAULT_POLICY, Normalizer, cast_like
from .models import ResUNet
from .xai import DEFAULT_READOUT, guided_backprop

ProgressCallback = Callable[[int, int], None]  # progress(done, total)
DEFAULT_MODEL_NAME = "fpdenoise_default.pt"
MSE_TWIN_NAME = "fpdenoise_mse_twin.pt"
CT_TEXTURE_NAME = "fpdenoise_ct_texture.pt"
GAUSSIAN_CT_NAME = "fpdenoise_gaussian_ct.pt"
#: The shipped models by name: anywhere a checkpoint path is taken (``--model``, the Slicer module,
#: the browser viewer) one of these names picks the file in ``Resources/Models``.
SHIPPED_MODELS = {
    "default": DEFAULT_MODEL_NAME,  # FP-trained, all 13 noise types, white or signal-dependent noise
    "mse_twin": MSE_TWIN_NAME,  # its MSE-only twin (the FP-vs-MSE ablation)
    "ct_texture": CT_TEXTURE_NAME,  # CT only: a scanner's kernel-correlated noise (real low-dose CT)
    "gaussian_ct": GAUSSIAN_CT_NAME,  # CT only: white noise of one level everywhere (Gaussian)
}
#: Not a file: the default model, except for a CT whose noise the CT scanner-noise model would remove and
#: the default keeps, which then goes through that model, and a CT with white Gaussian noise, which goes
#: through the white-noise CT model (``Denoiser.choose``).
AUTO_MODEL = "auto"
#: Every model name ``--model``, the Slicer module and the browser viewer take.
MODEL_NAMES = (*SHIPPED_MODELS, AUTO_MODEL)
# Pixel budget per batch: bounds activation memory independent of slice size (~1.5 GB on CPU
# for the default U-Net at 2M pixels).
MAX_BATCH_PIXELS = 2_000_000
#: Test-time ensemble sizes: 1 (off), 2 (+ left-right flip), 4 (+ rotations by 90/180/270 deg),
#: 8 (all flips and rotations; the dihedral group of the square).
ENSEMBLE_SIZES = (1, 2, 4, 8)
_DIHEDRAL = [(0, False), (0, True), (1, False), (2, False), (3, False), (1, True), (2, True), (3, True)]


def resources_dir() -> Path:
    """The folder holding ``Models/`` and ``SampleData/`` (``FPDENOISE_RESOURCES`` overrides).

    An installed wheel carries them inside the package (``FPDenoiseLib/Resources``, copied from the
    top-level ``Resources/`` at build by ``setup.py``); a source checkout and the Slicer extension have
    ``Resources/`` next to the ``FPDenoiseLib`` folder.
    """
    env = os.environ.get("FPDENOISE_RESOURCES")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here / "Resources", here.parent / "Resources", here.parent.parent / "Resources"]
    for c in candidates:
        if (c / "Models").is_dir() or (c / "SampleData").is_dir():
            return c
    return candidates[0]


def default_model_path() -> Path:
    """Path of the shipped default checkpoint (``Resources/Models/fpdenoise_default.pt``)."""
    return resources_dir() / "Models" / DEFAULT_MODEL_NAME


#: ``Denoiser.model_hint`` names the CT scanner-noise model for a CT where that model's correction (robust SD
#: inside the body, HU) is above this and at least :data:`CT_NOISE_HINT_RATIO` times this model's own.
CT_NOISE_HINT_HU = 15.0
#: Measured on the held-out CT slices (the CT model's correction over the default's): white Gaussian noise
#: 20-80 HU and Poisson 0.86-1.01; ``ct_correlated`` noise of 30-60 HU at kernel cutoffs 0.2-0.7 cycles/pixel
#: 2.0-32, where the CT model was 3.2-10 dB better; RIDER Lung CT's own noise 9-17 (CT model 47-83 HU, the
#: default 4-6 HU). Clean slices: the CT model's correction at most 1.3 HU.
CT_NOISE_HINT_RATIO = 1.5
#: ``Denoiser("auto")`` hands a CT to the white-noise CT model where the default's noise estimate is at least
#: this (HU, the median over the pixels between the slice's 50th and 90th intensity percentiles) ...
WHITE_NOISE_MIN_HU = 10.0
#: ... and at most this (the white-noise model is trained up to the grid's Gaussian level 0.5, about 200 HU
#: in the CT window; at level 0.75, about 400 HU, it is no better than the default) ...
WHITE_NOISE_MAX_HU = 300.0
#: ... the same in the darkest 30 % of the slice within these factors (white noise does not follow the
#: signal: Poisson, speckle and chemical shift read 0.0-0.4, Gaussian 0.91-1.04; magnitude noise up to 1.8) ...
WHITE_NOISE_FLATNESS = (0.8, 1.25)
#: ... and the two models' outputs differ by at most this fraction of the default's correction (RMS). Measured
#: on the held-out lung2 slices, 13 types x 3 levels: Gaussian 0.040-0.063; structured, thermal and Rician
#: noise, which read flat, 0.42-0.99, with the white-noise model 6.7-14 dB worse there; ct_correlated 0.89-0.99.
WHITE_NOISE_AGREEMENT = 0.15


def _middle_slice(a: np.ndarray) -> np.ndarray:
    """A 2D image itself, or a volume's middle slice, as float32 (what the model choice looks at)."""
    return np.asarray(a if a.ndim == 2 else a[a.shape[0] // 2], dtype=np.float32)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The checkpoint file for ``model``: None, "" or "auto" = the default, a name of :data:`SHIPPED_MODELS`, or a
    path.

    >>> resolve_model("ct_texture").name
    'fpdenoise_ct_texture.pt'
    """
    key = "" if model is None else str(model).strip()
    if not key or key == AUTO_MODEL:
        return default_model_path()
    if key in SHIPPED_MODELS:
        return resources_dir() / "Models" / SHIPPED_MODELS[key]
    return Path(key)


def shipped_name(path: str | os.PathLike) -> str | None:
    """The name of :data:`SHIPPED_MODELS` whose file ``path`` is, else None.

    >>> shipped_name(resolve_model("ct_texture"))
    'ct_texture'
    """
    here = Path(path).resolve()
    return next((k for k, f in SHIPPED_MODELS.items() if (resources_dir() / "Models" / f).resolve() == here), None)


def companion_models(model: str | os.PathLike) -> dict[str, Path]:
    """The shipped MSE twin and CT scanner-noise model that sit beside the checkpoint ``model`` (files that
    exist and are not ``model`` itself), by their benchmark names: what the benchmarks compare ours with.

    >>> sorted(companion_models(default_model_path()))  # doctest: +SKIP
    ['ct_texture', 'mse_twin']
    """
    here = Path(model)
    out = {}
    for name, file in SHIPPED_MODELS.items():
        if name == "default":
            continue
        p = here.with_name(file)
        if p.is_file() and p.resolve() != here.resolve():
            out[name] = p
    return out


def default_twin_path() -> Path:
    """The shipped MSE-only twin of the default model (same data, recipe and steps; no FP term)."""
    return resources_dir() / "Models" / MSE_TWIN_NAME


def sample_data_path() -> Path:
    """Path of the bundled sample CT volume used by the demo and the Slicer self-test."""
    return resources_dir() / "SampleData" / "sample_ct.nrrd"


@dataclass
class DenoiseResult:
    """Output of :meth:`Denoiser.run`. Saliency maps are float32 |GB| in the same geometry;
    ``feature_change`` is ``|GB(denoised) - GB(input)|`` of the signed maps (where denoising changed
    structure: removed noise and, where the denoiser blurs, lost edges)."""

    denoised: object  # io.Image
    saliency_input: object | None
    saliency_output: object | None
    fp_score: float | None  # Pearson correlation of GB(denoised) with GB(input)
    feature_change: object | None = None
    model: str | None = None  # the model that denoised it (with "auto": the one chosen for this image)
    note: str | None = None  # the choice's one-line note (Denoiser.choose), if any


def _check_array(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim not in (2, 3):
        raise InputError(f"expected a 2D image or 3D volume, got an array of shape {a.shape}")
    if a.shape[-1] < 2 or a.shape[-2] < 2 or a.size == 0:
        raise InputError(f"image too small to denoise: shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)):
        raise InputError(f"unsupported pixel type {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise InputError("image contains NaN or infinite values")
    return a


PRECISIONS = ("auto", "fp32", "bf16")


class Denoiser:
    """A loaded FPDenoise checkpoint: denoiser ``D`` + restoration net ``f`` (for saliency).

    Args:
        checkpoint: path of a checkpoint or a shipped model's name (:data:`SHIPPED_MODELS`); None = the
            shipped default model.
        device: "auto" (CUDA > MPS > CPU), "cpu", "cuda", "mps".
        batch_size: slices per forward pass (also capped by :data:`MAX_BATCH_PIXELS`); default 1 on
            CPU (fastest per slice there), 8 on a GPU.
        precision: "auto" (default), "fp32" or "bf16": bfloat16 autocast for the denoiser's forward
            pass, with the layers that read the raw image in float32 (``models.float32_layer``). On a
            CPU with native bf16 (AVX512-BF16 / AMX) the shipped model ran 1.3-1.5x faster at the same
            quality (7 held-out CT slices: clean / Gaussian 2 % / 5 % / Poisson 200 within 0.01 dB of
            float32; ``benchmarks/speed.py``). "auto" takes bf16 where the device has it natively and
            the net is a ResUNet, float32 elsewhere; an explicit "bf16" is refused where the device has
            no native bf16, since emulated bf16 is slower than float32. :attr:`precision` holds the
            one in use. Saliency stays float32.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        strength: float = 1.0,
        ensemble: int = 1,
        precision: str = "auto",
    ) -> None:
        if not (math.isfinite(strength) and 0.0 <= strength <= 3.0):
            raise InputError(f"strength must be in [0, 3] (1 = as trained, 0 = return the input), got {strength}")
        if ensemble not in ENSEMBLE_SIZES:
            raise InputError(f"ensemble must be one of {ENSEMBLE_SIZES} (flips/rotations averaged), got {ensemble}")
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.strength = float(strength)
        self.ensemble = int(ensemble)
        self.checkpoint_path = resolve_model(checkpoint)
        # "auto": the default, or the CT scanner-noise model for the CTs it is for (choose)
        self.auto = isinstance(checkpoint, str) and checkpoint.strip() == AUTO_MODEL
        self.ckpt = load_checkpoint(self.checkpoint_path)
        self.device = pick_device(device)
        if precision == "bf16" and not bf16_supported(self.device):
            raise InputError(f"precision bf16: {self.device.type} here has no native bfloat16 (use fp32)")
        # CPU: one slice per pass is fastest per slice (measured: 42 ms at batch 1 vs 86 ms at 8 on 2 cores,
        # benchmarks/speed.py); GPUs want batches.
        self.batch_size = max(1, int(batch_size)) if batch_size is not None else (1 if self.device.type == "cpu" else 8)
        self.model = model_from_checkpoint(self.ckpt, "denoiser").to(self.device)
        self.restoration = (
            model_from_checkpoint(self.ckpt, "restoration").to(self.device)
            if "restoration" in self.ckpt["models"]
            else None
        )
        for m in (self.model, self.restoration):
            if m is not None:
                # channels_last: 1.2x (denoise) to 1.4x (saliency) faster on CPU, same outputs to 6e-8
                # (measured side by side in benchmarks/speed.py).
                m.to(memory_format=torch.channels_last)
                for p in m.parameters():
                    p.requires_grad_(False)
        if precision == "auto":  # only the ResUNet keeps its input layers in float32 under autocast
            precision = "bf16" if isinstance(self.model, ResUNet) and bf16_supported(self.device) else "fp32"
        self.precision = precision
        self.policy = {**DEFAULT_POLICY, **self.ckpt.get("normalization", {})}
        # a shipped model goes by the name users pick it by (output descriptions, node attributes, summaries)
        self.name = shipped_name(self.checkpoint_path) or self.ckpt.get("training", {}).get("name") or (
            self.checkpoint_path.stem)
        # the feature the model was trained to preserve; older checkpoints get the current default
        self.readout = self.ckpt.get("training", {}).get("readout") or DEFAULT_READOUT

    @property
    def label(self) -> str:
        """What a run report names: with "auto", the model per item is in the item (batch.ItemResult.model)."""
        return (f"auto ({self.name}, or per CT the CT scanner-noise or the white-noise CT model)" if self.auto
                else self.name)

    # ---- normalised-range API (benchmark, training validation) ----
    def _batches(self, n: int, h: int, w: int) -> list[slice]:
        per = max(1, min(self.batch_size, MAX_BATCH_PIXELS // max(1, h * w)))
        return [slice(i, min(n, i + per)) for i in range(0, n, per)]

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None].to(self.device)
        return t.contiguous(memory_format=torch.channels_last)

    def _net(self, t: torch.Tensor) -> torch.Tensor:
        bf16 = self.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = self.model(t, strength=self.strength) if isinstance(self.model, ResUNet) else self.model(t)
        out = out.float()
        if isinstance(self.model, ResUNet):
            return out
        # networks without a noise-map input: strength blends between input and output
        return out if self.strength == 1.0 else t + self.strength * (out - t)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        if self.strength == 0.0:
            return np.array(x, dtype=np.float32, copy=True)
        with torch.inference_mode():
            t = self._tensor(x)
            if self.ensemble == 1:
                return self._net(t)[:, 0].float().cpu().numpy()
            acc = torch.zeros_like(t)
            for k, flip in _DIHEDRAL[: self.ensemble]:
                v = torch.rot90(t.flip(-1) if flip else t, k, (-2, -1))
                y = torch.rot90(self._net(v.contiguous(memory_format=torch.channels_last)), -k, (-2, -1))
                acc += y.flip(-1) if flip else y
            return (acc / self.ensemble)[:, 0].float().cpu().numpy()

    def noise_map_normalized(self, x: np.ndarray) -> np.ndarray:
        """The model's estimate of the local noise level (std, normalised units) of ``x``."""
        if not isinstance(self.model, ResUNet):
            raise InputError(f"{self.checkpoint_path}: this model has no noise-level estimator")

        def fn(b: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return self.model.estimate_noise(self._tensor(b))[:, 0].float().cpu().numpy()

        return self._map_stack(x, fn)

    def _gb_signed(self, x: np.ndarray) -> np.ndarray:
        if self.restoration is None:
            raise InputError(f"{self.checkpoint_path}: checkpoint has no restoration network; saliency unavailable")
        return guided_backprop(self.restoration, self._tensor(x), readout=self.readout)[:, 0].float().cpu().numpy()

    def _map_stack(self, x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        a = _check_array(x).astype(np.float32, copy=False)
        stack = a[None] if a.ndim == 2 else a
        out = np.empty_like(stack, dtype=np.float32)
        for sl in self._batches(*stack.shape):
            out[sl] = fn(stack[sl])
        return out[0] if a.ndim == 2 else out

    def denoise_normalized(self, x: np.ndarray) -> np.ndarray:
        """Denoise an image already in the normalised range (2D or a stack of slices), float32."""
        return self._map_stack(x, self._forward)

    def feature_change_normalized(self, output: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """``|GB(output) - GB(reference)|`` (signed maps subtracted) for images in the normalised range."""
        return display_feature_change(self._map_stack(output, self._gb_signed), self._map_stack(reference, self._gb_signed))

    # ---- original-units API ----
    def model_hint(self, array: np.ndarray, *, modality: str | None = None) -> str | None:
        """A one-line pointer to the CT scanner-noise model for a CT that it would denoise far more, else None.

        Both models run at full strength (the models, not the setting) on the middle slice; inside the body
        (> -500 HU) the robust SD of each one's correction is compared. White noise is removed as much by
        either (ratio ~1); a scanner's kernel-correlated noise, which a white-noise model reads as texture and
        keeps, is removed by the CT model (see :data:`CT_NOISE_HINT_HU`, :data:`CT_NOISE_HINT_RATIO`). Two
        forward passes of the slice (~0.2 s at 512x512); the CT model is loaded once.

        >>> Denoiser(device="cpu").model_hint(np.full((64, 64), 40.0), modality="CT") is None
        True
        """
        found = self._ct_noise(array, modality)
        if found is None:
            return None
        return (f"the CT scanner-noise model would remove {found[1]:.0f} HU of noise here, this model "
                f"{found[0]:.0f} HU: the noise is correlated like a CT scanner's own, which this model reads as "
                "texture (--model ct_texture)")

    def choose(self, array: np.ndarray, *, modality: str | None = None) -> tuple[Denoiser, str | None]:
        """The denoiser to run on ``array`` and a one-line note for the user (or None).

        A ``Denoiser("auto")`` hands a CT that :meth:`model_hint` would point to the CT scanner-noise model over
        to that model, and a CT with white noise of one level everywhere (Gaussian; see
        :data:`WHITE_NOISE_AGREEMENT`) to the white-noise CT model (same device, strength and ensemble), and
        says so; any other input stays with the default (a fixed copy of this denoiser that shares its nets and
        does not choose again). Any other model stays itself, with :meth:`model_hint` as its note.
        """
        if not self.auto:
            return self, self.model_hint(array, modality=modality)
        probe: list = []  # the middle slice through this model, shared by both checks
        found = self._ct_noise(array, modality, probe)
        if found is not None:
            ct = self._companion("ct_texture")
            ct.strength, ct.ensemble = self.strength, self.ensemble
            return ct, (f"auto: the CT scanner-noise model, which removes {found[1]:.0f} HU of noise here where "
                        f"the default removes {found[0]:.0f} HU (the noise is correlated like a CT scanner's own)")
        white = self._white_noise(array, modality, probe)
        if white is None:
            return self._fixed(), None
        g = self._companion("gaussian_ct")
        g.strength, g.ensemble = self.strength, self.ensemble
        return g, (f"auto: the white-noise CT model (the noise here is white, {white:.0f} HU, the same in dark "
                   "and bright tissue)")

    def _probe(self, array: np.ndarray, probe: list) -> tuple[np.ndarray, Normalizer, torch.Tensor, torch.Tensor]:
        """``(middle slice, its CT normaliser, the normalised slice as a tensor, this model's full-strength output)``,
        computed once into ``probe`` (an empty list the caller passes to every check of one choice)."""
        if not probe:
            s = _middle_slice(array)
            norm = self.normalizer(s, "CT")
            with torch.inference_mode():
                t = self._tensor(norm.forward(s)[None])
                probe += [s, norm, t, self.model(t, strength=1.0).float()]
        return probe[0], probe[1], probe[2], probe[3]

    def _ct_noise(self, array: np.ndarray, modality: str | None, probe: list | None = None) -> tuple[float, float] | None:
        """(this model's, the CT model's correction in HU) where the CT model is the one for this CT, else None."""
        a = _check_array(array)
        if (modality or "").upper() != "CT" or self.checkpoint_path.name == CT_TEXTURE_NAME or not isinstance(
            self.model, ResUNet
        ):
            return None
        ct = self._companion("ct_texture")
        if ct is None or (_middle_slice(a) > -500).sum() < 256:
            return None
        s, norm, t, out = self._probe(a, [] if probe is None else probe)
        body = s > -500
        removed = []
        with torch.inference_mode():
            for y in (out, ct.model(t, strength=1.0).float()):
                r = (t - y)[0, 0].cpu().numpy()[body]
                removed.append(1.4826 * float(np.median(np.abs(r - np.median(r)))) * (norm.hi - norm.lo))
        ours, theirs = removed
        if theirs < CT_NOISE_HINT_HU or theirs < CT_NOISE_HINT_RATIO * ours:
            return None
        return ours, theirs

    def _white_noise(self, array: np.ndarray, modality: str | None, probe: list | None = None) -> float | None:
        """The noise level (HU) of a CT whose noise is white and that the white-noise CT model and this one
        denoise alike (:data:`WHITE_NOISE_MIN_HU` to :data:`WHITE_NOISE_MAX_HU`, :data:`WHITE_NOISE_FLATNESS`,
        :data:`WHITE_NOISE_AGREEMENT`),
        else None. The middle slice: the noise estimator, then both models (~0.2 s at 512x512)."""
        import torch.nn.functional as F

        a = _check_array(array)
        if (modality or "").upper() != "CT" or self.checkpoint_path.name == GAUSSIAN_CT_NAME or not isinstance(
            self.model, ResUNet
        ):
            return None
        g = self._companion("gaussian_ct")
        if g is None:
            return None
        _, norm, t, ours = self._probe(a, [] if probe is None else probe)
        with torch.inference_mode():
            m = self.model.estimate_noise(t).float()
            level = F.avg_pool2d(F.interpolate(t.float(), size=m.shape[-2:], mode="area"), 5, 1, 2,
                                 count_include_pad=False).flatten().cpu().numpy()
            m = m.flatten().cpu().numpy()
            q30, q50, q90 = np.quantile(level, [0.3, 0.5, 0.9])
            bright = float(np.median(m[(level >= q50) & (level <= q90)]))
            dark = float(np.median(m[level <= q30]))
            hu = bright * (norm.hi - norm.lo)
            lo, hi = WHITE_NOISE_FLATNESS
            if not WHITE_NOISE_MIN_HU <= hu <= WHITE_NOISE_MAX_HU or not lo * bright <= dark <= hi * bright:
                return None
            theirs = g.model(t, strength=1.0).float()
            correction = float((t - ours).square().mean().sqrt())
            if float((ours - theirs).square().mean().sqrt()) > WHITE_NOISE_AGREEMENT * correction:
                return None
        return hu

    def _with_auto(self, auto: bool) -> Denoiser:
        """A copy that shares the loaded nets (settings copied at call), choosing per volume or not."""
        other = copy.copy(self)
        other.auto = auto
        return other

    def _fixed(self) -> Denoiser:
        """This ``auto`` denoiser as its own model, fixed: what :meth:`choose` returns where it keeps this
        model, so running it does not choose again."""
        return self._with_auto(False)

    def as_auto(self) -> Denoiser:
        """This shipped default as ``Denoiser("auto")`` (sharing the loaded nets, so nothing loads twice)."""
        if self.checkpoint_path.resolve() != default_model_path().resolve():
            raise InputError(f"{self.checkpoint_path}: only the shipped default chooses per volume ('auto')")
        return self._with_auto(True)

    def _companion(self, name: str) -> Denoiser | None:
        """The shipped model ``name`` with this one's settings (cached), or None where it is not installed."""
        cache = self.__dict__.setdefault("_companions", {})
        if name not in cache:
            path = resolve_model(name)
            cache[name] = Denoiser(path, device=self.device, batch_size=self.batch_size, strength=self.strength,
                                   ensemble=self.ensemble, precision=self.precision) if path.is_file() else None
        return cache[name]

    def normalizer(self, array: np.ndarray, modality: str | None) -> Normalizer:
        return Normalizer.for_array(array, modality=modality, policy=self.policy)

    def process(
        self,
        array: np.ndarray,
        *,
        modality: str | None = None,
        saliency: bool = True,
        denoise: bool = True,
        progress: ProgressCallback | None = None,
        feature_change: bool = False,
    ) -> tuple[np.ndarray | None, ...]:
        """One streaming pass: ``(denoised, |GB(input)|, |GB(denoised)|)`` (None where not asked).

        With ``feature_change=True`` a fourth array follows: ``|GB(denoised) - GB(input)|`` of the
        signed maps (needs ``saliency`` and ``denoise``). The denoised array has the input's shape,
        dtype and units; saliency maps are float32. A ``Denoiser("auto")`` denoises with the model
        :meth:`choose` picks for ``array``, as the command line and the GUIs do.
        """
        a = _check_array(array)
        if self.auto and denoise:
            chosen, _ = self.choose(a, modality=modality)
            return chosen.process(a, modality=modality, saliency=saliency, denoise=denoise, progress=progress,
                                  feature_change=feature_change)
        norm = self.normalizer(a, modality)
        stack = a[None] if a.ndim == 2 else a
        n, h, w = stack.shape
        den = np.empty(stack.shape, dtype=a.dtype) if denoise else None
        sal_in = np.empty(stack.shape, dtype=np.float32) if saliency else None
        sal_out = np.empty(stack.shape, dtype=np.float32) if (saliency and denoise) else None
        change = np.empty(stack.shape, dtype=np.float32) if (saliency and denoise and feature_change) else None
        done = 0
        for sl in self._batches(n, h, w):
            x = norm.forward(stack[sl])
            if denoise:
                y = self._forward(x)
                # strength 0 returns the input itself (the float normalise/inverse round trip is not exact)
                den[sl] = stack[sl] if self.strength == 0.0 else cast_like(norm.inverse(y), a.dtype)
            if saliency:
                # Signed maps once; magnitudes for display, their difference for the change map.
                g_in = self._gb_signed(x)
                sal_in[sl] = np.abs(g_in)
                if denoise:
                    g_out = self._gb_signed(y)
                    sal_out[sl] = np.abs(g_out)
                    if change is not None:
                        change[sl] = display_feature_change(g_out, g_in)
            done = sl.stop
            if progress is not None:
                progress(done, n)

        def unstack(v: np.ndarray | None) -> np.ndarray | None:
            return None if v is None else (v[0] if a.ndim == 2 else v)

        if feature_change:
            return unstack(den), unstack(sal_in), unstack(sal_out), unstack(change)
        return unstack(den), unstack(sal_in), unstack(sal_out)

    def feature_change_array(
        self, output: np.ndarray, reference: np.ndarray, *, modality: str | None = None
    ) -> np.ndarray:
        """``|GB(output) - GB(reference)|`` in original units, e.g. denoised against the clean image.

        Both are normalised with the reference's normaliser, so equal values give an exactly zero map.
        """
        ref = _check_array(reference)
        out = _check_array(output)
        if out.shape != ref.shape:
            raise InputError(f"feature change: shapes differ, {out.shape} vs {ref.shape}")
        norm = self.normalizer(ref, modality)
        return self.feature_change_normalized(norm.forward(out), norm.forward(ref))

    def denoise_array(self, array: np.ndarray, *, modality: str | None = None, progress: ProgressCallback | None = None) -> np.ndarray:
        """Denoise ``array`` (2D or ``(z, y, x)``) in its own units; returns a new array, same dtype."""
        return self.process(array, modality=modality, saliency=False, progress=progress)[0]

    def saliency_array(self, array: np.ndarray, *, modality: str | None = None, progress: ProgressCallback | None = None) -> np.ndarray:
        """|Guided Backprop| of the restoration net for ``array`` (float32, same shape)."""
        return self.process(array, modality=modality, saliency=True, denoise=False, progress=progress)[1]

    def run(self, image, *, saliency: bool = True, progress: ProgressCallback | None = None) -> DenoiseResult:
        """Denoise an :class:`~FPDenoiseLib.io.Image`; outputs keep its geometry and units.

        A ``Denoiser("auto")`` first picks the model for this image (:meth:`choose`); the result names it.
        """
        from .metrics import feature_preservation

        if self.auto:
            chosen, note = self.choose(image.array, modality=image.modality)
            return replace(chosen.run(image, saliency=saliency, progress=progress), note=note)
        den, s_in, s_out, change = self.process(
            image.array, modality=image.modality, saliency=saliency, progress=progress, feature_change=True
        )
        out = replace(image, array=den, dicom_headers=image.dicom_headers)
        if not saliency:
            return DenoiseResult(out, None, None, None, model=self.name)
        sal_kw = {"modality": "OT"}
        return DenoiseResult(
            denoised=out,
            saliency_input=replace(image, array=s_in, **sal_kw),
            saliency_output=replace(image, array=s_out, **sal_kw),
            fp_score=float(feature_preservation(s_in, s_out)),
            feature_change=replace(image, array=change, **sal_kw),
            model=self.name,
        )
