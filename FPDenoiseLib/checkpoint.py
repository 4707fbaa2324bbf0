"""Checkpoints: safe to load, self-describing, verified, written atomically.

A checkpoint is a plain dict of tensors and JSON-like values (loadable with
``torch.load(..., weights_only=True)``, so it can never execute code)::

    {"format": "fpdenoise-checkpoint/1", "version": "0.1.0",
     "models": {"denoiser": {"config": {...}, "state_dict": {...}},
                "restoration": {"config": {...}, "state_dict": {...}}},
     "normalization": {"ct_window": [-1024, 3071], "percentiles": [0.5, 99.5]},
     "training": {...},            # how it was made (stage, loss, lambda, steps, noise, data)
     "resume": {...},              # optional: optimiser/scheduler/RNG/data position
     "resume_sha256": "...",       # hash of the resume state (when present)
     "sha256": "..."}              # hash of models + normalization + training

Saliency maps are GB of *this* restoration net, so a checkpoint names its f exactly. It holds f
itself, or (the shipped models, which share one f) ``"restoration_ref": {"file": NAME, "sha256":
...}``: f lives in the restoration-only checkpoint NAME next to it, and :func:`load_checkpoint`
splices it in after checking that file's own hash against the reference.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .errors import CheckpointError
from .models import build_model, grow_attention, weight_config

FORMAT = "fpdenoise-checkpoint/1"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def content_hash(ckpt: dict) -> str:
    """SHA-256 over model configs, tensor names/dtypes/shapes/bytes, normalisation and training info."""
    h = hashlib.sha256()
    for name in sorted(ckpt.get("models", {})):
        entry = ckpt["models"][name]
        h.update(name.encode())
        h.update(json.dumps(entry["config"], sort_keys=True).encode())
        for key in sorted(entry["state_dict"]):
            t = entry["state_dict"][key]
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(ckpt.get("normalization", {}), sort_keys=True, default=str).encode())
    h.update(json.dumps(ckpt.get("training", {}), sort_keys=True, default=str).encode())
    if "restoration_ref" in ckpt:  # only when present: older checkpoints keep their hashes
        h.update(json.dumps(ckpt["restoration_ref"], sort_keys=True).encode())
    return h.hexdigest()


def state_hash(obj: Any) -> str:
    """SHA-256 of a nested dict/list of tensors and plain values (the optimiser/scheduler resume state)."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)  # 0-dim (Adam step) cannot be viewed as bytes
            h.update(f"T|{t.dtype}|{tuple(o.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode() + b":")
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(o).encode() + b";")

    walk(obj)
    return h.hexdigest()


def make_checkpoint(
    models: dict[str, nn.Module],
    *,
    normalization: dict,
    training: dict | None = None,
    resume: dict | None = None,
    dtype: torch.dtype | None = None,
    restoration_ref: dict | None = None,
) -> dict:
    """Build the checkpoint dict. ``dtype=torch.float16`` halves the file (for shipping).

    ``restoration_ref`` (``{"file": NAME, "sha256": HASH}``, with no "restoration" in ``models``) points
    at a shared restoration-only checkpoint in the same folder instead of holding f.
    """
    if restoration_ref is not None:
        if "restoration" in models:
            raise CheckpointError("a checkpoint holds its restoration net or refers to one, not both")
        _check_ref(restoration_ref)
    entries = {}
    for name, model in models.items():
        sd = {}
        for k, v in model.state_dict().items():
            v = v.detach().cpu().clone()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            sd[k] = v
        entries[name] = {"config": _jsonable(model.config), "state_dict": sd}
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "version": __version__,
        "models": entries,
        "normalization": _jsonable(normalization),
        "training": _jsonable(training or {}),
    }
    if restoration_ref is not None:
        ckpt["restoration_ref"] = {"file": restoration_ref["file"], "sha256": restoration_ref["sha256"]}
    if resume is not None:
        ckpt["resume"] = resume
        ckpt["resume_sha256"] = state_hash(resume)  # separate key: older checkpoints stay valid
    ckpt["sha256"] = content_hash(ckpt)
    return ckpt


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the destination folder, fsync, then rename into place."""
    from .io import atomic_path  # lazy: keeps SimpleITK/pydicom out of checkpoint-only imports

    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())
    return path


def save_checkpoint(path: str | Path, models: dict[str, nn.Module], **kwargs: Any) -> Path:
    """Write a checkpoint atomically (see :func:`make_checkpoint` for kwargs)."""
    return atomic_torch_save(make_checkpoint(models, **kwargs), path)


def _check_ref(ref: object) -> None:
    if not (isinstance(ref, dict) and isinstance(ref.get("file"), str) and isinstance(ref.get("sha256"), str)):
        raise CheckpointError(f"restoration_ref must be {{'file': NAME, 'sha256': HASH}}, got {ref!r}"[:300])
    name = ref["file"]
    # a bare name in the same folder: a shipped file must not make the loader read elsewhere
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name:
        raise CheckpointError(f"restoration_ref file must be a file name in the same folder, got {name!r}")


def load_checkpoint(path: str | Path, *, verify: bool = True) -> dict:
    """Load with ``weights_only=True``; refuse pickled code, foreign formats and altered content.

    A checkpoint that refers to a shared restoration net (``restoration_ref``) comes back with that
    net spliced into ``models``, after the shared file's own hash was checked against the reference.
    """
    ckpt = _load_one(Path(path), verify=verify)
    ref = ckpt.get("restoration_ref")
    if ref is not None and "restoration" not in ckpt["models"]:
        _check_ref(ref)
        fpath = Path(path).parent / ref["file"]
        if not fpath.is_file():
            raise CheckpointError(
                f"{path}: its restoration net f (saliency, FP feature) is stored in {ref['file']}, which is not "
                f"next to it ({fpath}); copy the two files together"
            )
        shared = _load_one(fpath, verify=verify)
        if shared.get("sha256") != ref["sha256"]:
            raise CheckpointError(
                f"{path}: {fpath.name} is not the restoration net it was made with (sha256 "
                f"{str(shared.get('sha256'))[:12]}... vs {ref['sha256'][:12]}...); use the files shipped together"
            )
        if "restoration" not in shared["models"]:
            raise CheckpointError(f"{fpath}: holds no restoration network")
        ckpt["models"]["restoration"] = shared["models"]["restoration"]
    return ckpt


def _load_one(path: Path, *, verify: bool) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: the file holds executable pickle content, not a weights-only "
            f"FPDenoise checkpoint ({str(err).splitlines()[0][:160]})"
        ) from err
    except Exception as err:  # zip/EOF/torch errors: corrupt or not a torch file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})"[:300]) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an FPDenoise checkpoint (expected format {FORMAT!r})")
    if verify:
        stored = ckpt.get("sha256")
        if stored != content_hash(ckpt):
            raise CheckpointError(f"{path}: content hash mismatch: the checkpoint was altered or is corrupt")
        if "resume" in ckpt and "resume_sha256" in ckpt and ckpt["resume_sha256"] != state_hash(ckpt["resume"]):
            raise CheckpointError(f"{path}: resume-state hash mismatch: the optimiser/scheduler state was altered "
                                  "or is corrupt")
    return ckpt


def model_from_checkpoint(ckpt: dict, name: str = "denoiser") -> nn.Module:
    """Instantiate network ``name`` ("denoiser" or "restoration") in float32, eval mode."""
    if name not in ckpt.get("models", {}):
        have = ", ".join(sorted(ckpt.get("models", {}))) or "none"
        raise CheckpointError(f"checkpoint has no {name!r} network (it has: {have})")
    entry = ckpt["models"][name]
    model = build_model(entry["config"])
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in entry["state_dict"].items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as err:
        raise CheckpointError(f"{name} weights do not match its architecture: {str(err)[:300]}") from err
    return model.eval()


def check_compatible(ckpt: dict, *, configs: dict[str, dict] | None = None, normalization: dict | None = None) -> None:
    """Raise :class:`CheckpointError` naming every difference in architecture / normalisation."""
    diffs = []
    for name, cfg in (configs or {}).items():
        have = ckpt.get("models", {}).get(name, {}).get("config")
        if have is None:
            diffs.append(f"{name}: missing")
            continue
        for key in sorted(set(cfg) | set(have)):
            if _jsonable(cfg.get(key)) != have.get(key):
                diffs.append(f"{name}.{key}: checkpoint {have.get(key)!r} vs requested {cfg.get(key)!r}")
    if normalization is not None:
        want = _jsonable(normalization)
        for key in sorted(set(want) | set(ckpt.get("normalization", {}))):
            if want.get(key) != ckpt.get("normalization", {}).get(key):
                diffs.append(
                    f"normalization.{key}: checkpoint {ckpt.get('normalization', {}).get(key)!r} vs requested {want.get(key)!r}"
                )
    if diffs:
        raise CheckpointError("checkpoint does not match: " + "; ".join(diffs))


def average_models(
    ckpts: list[dict], name: str = "denoiser", *, weights: list[float] | None = None
) -> nn.Module:
    """Weight average ("model soup") of the ``name`` net of several checkpoints.

    Meant for fine-tunes of one common ancestor (e.g. two noise mixes continued from the same
    weights, or a base and specialists fine-tuned on one noise type each): their average usually
    keeps most of the gains of each at no inference cost. Settings that own no weights (gate,
    map fit: ``WEIGHTLESS_KEYS``) may differ and are the first's. ``weights`` (default uniform) are
    normalised to sum 1; ``[0.5, 0.25, 0.25]`` of a base and two specialists is the base plus
    a quarter of each specialist's weight change. Nets of different shapes cannot be averaged, with
    one exception: a resunet without attention layers averages with nets that have them as what it
    is, the same net with attention layers whose output projection is zero (their q, k, v are the
    first attention net's).

    >>> from FPDenoiseLib.models import ResUNet
    >>> a, b = ResUNet(channels=(4, 8), blocks=1), ResUNet(channels=(4, 8), blocks=1)
    >>> cks = [make_checkpoint({"denoiser": m}, normalization={}) for m in (a, b)]
    >>> soup = average_models(cks)
    >>> bool(torch.allclose(soup.head.weight, (a.head.weight + b.head.weight) / 2))
    True
    """
    if not ckpts:
        raise CheckpointError("average_models: no checkpoints given")
    configs = [c["models"][name]["config"] for c in ckpts]

    def shape(cfg: dict) -> dict:
        return {k: v for k, v in weight_config(cfg).items() if k != "attention"}

    levels = [set(cfg.get("attention", ())) for cfg in configs]
    full = set().union(*levels)
    # a net whose attention levels are a subset of another's is that net with zero layers there
    if full not in levels or any(shape(cfg) != shape(configs[0]) for cfg in configs[1:]):
        raise CheckpointError(f"average_models: the {name} nets differ in architecture: {configs}")
    w = [1.0] * len(ckpts) if weights is None else [float(x) for x in weights]
    if len(w) != len(ckpts) or any(x < 0 or x != x for x in w) or sum(w) <= 0:
        raise CheckpointError(f"average_models: need one weight >= 0 per checkpoint with a positive sum, got {weights}")
    nets = [model_from_checkpoint(c, name) for c in ckpts]
    donor = next((n for n, lv in zip(nets, levels) if lv == full), None)  # noqa: B905
    if full:  # the nets without some layers, grown as the same function with the donor's q, k, v there
        nets = [n if lv == full else grow_attention(n, sorted(full), like=donor) for n, lv in zip(nets, levels)]  # noqa: B905
    states = [n.state_dict() for n in nets]
    net = nets[0]  # the mean is computed into new tensors before it is loaded into the first net
    net.load_state_dict({k: sum(wi * s[k].float() for wi, s in zip(w, states)) / sum(w) for k in states[0]})  # noqa: B905
    return net
