"""The paper-comparison benchmark: 13 noise types x learned models x classical baselines.

For every clean 2D slice, every noise type and level, ONE noisy input is drawn (seeded from the
run seed, the slice and the noise, so a resumed run redraws exactly the same input) and every
method denoises that same input. Per row of ``results.csv`` (image x noise x level x method):

- **PSNR / SSIM on the original intensity scale** (HU for CT, the file's units otherwise): the
  normalised clean and denoised slices are mapped back with the slice's
  :class:`~FPDenoiseLib.intensity.Normalizer` (CT: the checkpoint policy's HU window; others: the
  image's percentiles) and scored with ``data_range = max(clean) - min(clean)`` of *that* clean
  slice in original units. (The map is linear, so this equals scoring in the normalised range with
  the clean slice's normalised range; a fixed CT window of 4095 HU would add a constant to every
  PSNR instead.)
- **Feature-preservation score** = :func:`~FPDenoiseLib.metrics.feature_preservation` (Pearson
  correlation) of ``GB_f(clean)`` and ``GB_f(denoised)``, signed GB maps, where ``f`` is the
  restoration net of the ``--model`` checkpoint ("ours") for EVERY method: one common feature
  extractor, so the score compares methods, not extractors.
- **Wall time** of the method on that slice (batch of one; networks after a warm-up call),
  scaled linearly in pixel count to a 512 x 512 slice (``seconds_per_512``).

Methods: ``ours`` (``--model``, default the shipped model), ``mse_only`` and ``drunet``
(``--baseline-model [NAME=]CKPT``), every classical baseline of
:data:`FPDenoiseLib.baselines.BASELINES`, and ``noisy`` (the input itself, a reference column that
is never bolded). The ``drunet`` column is DPIR's *architecture* trained by our ``train`` command on
the user's data, not DPIR's released weights (they cannot be downloaded here).

Outputs in ``out``: ``results.csv``, ``summary.md`` (paper-style PSNR/SSIM table, mean +/- 95% CI,
feature-score and speed tables), ``fig_<noise>.png`` panels, ``psnr_boxplot.png`` and ``run.json``.

Example:
    >>> summary = run_benchmark("data/ct", "bench_out", noises=("gaussian",),
    ...                         methods=("ours", "median"), max_images=4)   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .baselines import BASELINE_COMMON_PARAMS, BASELINE_PARAMS, BASELINES
from .benchmark_report import (
    PSNR_CAP_DB,
    _finite,
    _fmt_level,
    _notes,
    render_summary_md,
    summarize,
)
from .errors import InputError, OutputError
from .intensity import Normalizer
from .metrics import feature_preservation, psnr, ssim
from .noise import DEFAULT_LEVEL, NOISE_NAMES, PAPER_NOISE_NAMES

__all__ = [
    "BenchImage",
    "LEARNED_METHODS",
    "METHOD_ORDER",
    "PSNR_CAP_DB",
    "RESULT_FIELDS",
    "export_protocol",
    "make_noisy",
    "original_units",
    "read_results",
    "run_benchmark",
]

#: Learned methods (checkpoints); everything else comes from BASELINES.
LEARNED_METHODS = ("ours", "mse_only", "drunet")
#: Column order of the tables: the paper's (Our, DPIR, Bilat., Filt. Comb., Gaus., Mean, Medi.,
#: NL Mean., Wave., Wien.) with our MSE-only twin next to ours, BM3D after DPIR, "noisy" last.
METHOD_ORDER = (
    "ours", "auto", "mse_only", "ct_texture", "drunet", "bm3d", "bilateral", "filter_combination", "gaussian", "mean",
    "median", "nlmeans", "wavelet", "wiener", "noisy",
)
#: Slice size the wall times are scaled to.
SPEED_REF_PIXELS = 512 * 512
RESULT_FIELDS = (
    "image", "source", "slice_index", "modality", "noise", "level", "method", "psnr_db", "ssim",
    "feature_score", "seconds", "seconds_per_512", "height", "width", "data_range",
)
_KEY_FIELDS = ("source", "slice_index", "noise", "level", "method")
_FIGURE_METHODS = ("ours", "drunet", "wavelet", "filter_combination")
_LABELS = {
    "ours": "Ours (FP loss)", "auto": "Auto (per volume)", "mse_only": "MSE-only", "drunet": "DRUNet*", "bm3d": "BM3D",
    "bilateral": "Bilat.", "filter_combination": "Filt. Comb.", "gaussian": "Gaus. Filt.",
    "mean": "Mean Filt.", "median": "Medi. Filt.", "nlmeans": "NL Mean.", "wavelet": "Wave. Den.",
    "wiener": "Wien. Filt.", "noisy": "Noisy input",
}


@dataclass
class BenchImage:
    """One clean test slice: ``clean`` (y, x) float32 in the normalised range plus the
    ``normalizer`` that maps it back to original units."""

    clean: np.ndarray
    normalizer: Normalizer
    source: str
    index: int
    modality: str = "OT"


# ---------------------------------------------------------------- small helpers


def original_units(image: BenchImage, normalized: np.ndarray) -> np.ndarray:
    """Map a normalised slice to the image's original units (float64, no clipping).

    >>> im = BenchImage(np.zeros((2, 2), np.float32), Normalizer("window", -1024.0, 3071.0), "x", 0)
    >>> float(original_units(im, np.ones((2, 2)))[0, 0])
    3071.0
    """
    n = image.normalizer
    return np.asarray(normalized, dtype=np.float64) * (float(n.hi) - float(n.lo)) + float(n.lo)


def make_noisy(image: BenchImage, noise: str, level: float, seed: int) -> np.ndarray:
    """The benchmark's noisy input for (slice, noise, level): identical for every method and across
    resumed runs (the generator is seeded by ``seed`` and a CRC of source/slice/noise/level).

    >>> from FPDenoiseLib.intensity import Normalizer
    >>> im = BenchImage(np.full((16, 16), 0.5, np.float32), Normalizer("percentile", 0, 1), "a", 0)
    >>> bool(np.array_equal(make_noisy(im, "gaussian", 0.5, 0), make_noisy(im, "gaussian", 0.5, 0)))
    True
    """
    from .noise import add_noise

    key = zlib.crc32(f"{image.source}|{image.index}|{noise}|{float(level):.6g}".encode())
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, key])
    return np.asarray(add_noise(image.clean, noise, level=float(level), seed=rng), dtype=np.float32)


def _row_key(row: dict) -> tuple:
    return (str(row["source"]), int(row["slice_index"]), str(row["noise"]), _fmt_level(float(row["level"])),
            str(row["method"]))


def read_results(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``results.csv`` as dicts (numbers as float, ``inf`` kept as inf, empty -> nan)."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != RESULT_FIELDS:
                raise InputError(f"{path}: not a benchmark results.csv (columns {reader.fieldnames})")
            rows = list(reader)
    except OSError as err:
        raise InputError(f"{path}: cannot read results ({err.strerror or err})") from None
    num = ("level", "psnr_db", "ssim", "feature_score", "seconds", "seconds_per_512", "data_range")
    for r in rows:
        for k in num:
            r[k] = float(r[k]) if r[k] not in ("", None) else math.nan
        for k in ("image", "slice_index", "height", "width"):
            r[k] = int(r[k])
    return rows


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def _atomic_write(path: Path, writer: Callable[[Any], Any]) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)


def _write_results(path: Path, rows: list[dict]) -> None:
    def writer(fh: Any) -> None:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(float(r[k])) if isinstance(r[k], float) else r[k]) for k in RESULT_FIELDS})
        fh.write(buf.getvalue().encode())

    _atomic_write(path, writer)


# ---------------------------------------------------------------- data


def load_benchmark_images(
    data: str | os.PathLike | Sequence[Any],
    *,
    max_images: int | None,
    seed: int = 0,
    policy: dict | None = None,
    protocol: str | None = None,
    protocol_train: int = 5000,
    protocol_test: int = 500,
    size: int = 256,
) -> list[BenchImage]:
    """The clean test slices of a benchmark.

    ``data`` is a folder / file (read with :func:`FPDenoiseLib.data.load_clean_slices`, then
    ``max_images`` slices drawn at random with ``seed`` and kept in reading order), or a sequence of
    :class:`BenchImage` / :class:`FPDenoiseLib.data.Slice` objects. With ``protocol`` ("lidc",
    "rsna", "lits") the folder is a dataset in its distributed layout and the slices are the
    *test* side of :func:`FPDenoiseLib.protocols.paper_protocol_slices` with the same
    ``protocol_train`` / ``protocol_test`` / ``size`` / ``seed`` as the training run, so no
    test patient was seen in training.
    """
    from . import data as fdata
    from .protocols import paper_protocol_slices

    if isinstance(data, (str, os.PathLike)):
        if protocol:
            _train, slices = paper_protocol_slices(
                data, protocol, n_train=protocol_train, n_test=protocol_test, size=size, seed=seed, policy=policy
            )
            if max_images is not None:
                slices = slices[: int(max_images)]
        else:
            per_volume = None if max_images is None else max(1, int(max_images))
            slices = fdata.load_clean_slices(data, max_slices_per_volume=per_volume, seed=seed, policy=policy)
            if max_images is not None and len(slices) > max_images:
                pick = np.sort(np.random.default_rng(seed).choice(len(slices), size=int(max_images), replace=False))
                slices = [slices[int(i)] for i in pick]
    else:
        slices = list(data)
        if max_images is not None:
            slices = slices[: int(max_images)]
    out = []
    for s in slices:
        if isinstance(s, BenchImage):
            out.append(s)
            continue
        arr = np.ascontiguousarray(s.array, dtype=np.float32)
        if arr.ndim != 2:
            raise InputError(f"{s.source}: benchmark slices must be 2D, got shape {arr.shape}")
        norm = s.normalizer
        if norm is None:  # slice already in the normalised range with no way back: score it there
            norm = Normalizer("percentile", 0.0, 1.0)
        out.append(BenchImage(arr, norm, str(s.source), int(s.index), str(s.modality or "OT")))
    if not out:
        raise InputError(f"{data}: no benchmark slices found")
    return out


def export_protocol(
    dataset_dir: str | os.PathLike,
    layout: str,
    out_dir: str | os.PathLike,
    *,
    n_train: int = 5000,
    n_test: int = 500,
    size: int = 256,
    seed: int = 0,
    policy: dict | None = None,
) -> tuple[int, int]:
    """Write the paper protocol's slices as 2D NRRD files: ``out_dir/train`` and ``out_dir/test``.

    The slices are :func:`FPDenoiseLib.protocols.paper_protocol_slices` (patient-level split, resized to
    ``size``), stored in original units (HU for CT) with their modality, one file per slice named
    ``<patient>__<source>__z<slice>.nrrd``. ``fpdenoise train --data OUT/train
    --max-slices-per-volume 1`` then trains on the training side and ``fpdenoise benchmark --data
    OUT/test --max-images 0`` scores the test side: no patient is in both. Returns
    ``(n_train_written, n_test_written)``.
    """
    from .io import Image, write_image
    from .protocols import paper_protocol_slices

    train, test = paper_protocol_slices(
        dataset_dir, layout, n_train=n_train, n_test=n_test, size=size, seed=seed, policy=policy
    )
    counts = []
    for side, slices in (("train", train), ("test", test)):
        folder = Path(out_dir) / side
        folder.mkdir(parents=True, exist_ok=True)
        for s in slices:
            arr = s.normalizer.inverse(s.array) if s.normalizer is not None else s.array
            stem = Path(s.source).name.split(".")[0]
            name = f"{s.patient or 'p'}__{stem}__z{s.index:04d}.nrrd".replace(os.sep, "_")
            write_image(Image(np.asarray(arr, np.float32)[None], modality=s.modality, is_2d=True,
                              source=s.source), folder / name)
        counts.append(len(slices))
    return counts[0], counts[1]


# ---------------------------------------------------------------- methods


@dataclass
class _Method:
    name: str
    run: Callable[[np.ndarray], np.ndarray]
    info: dict
    # the run also takes the BenchImage (its units and modality): the product's per-volume choice ("auto")
    per_image: Callable[[np.ndarray, Any], np.ndarray] | None = None

    def on(self, noisy: np.ndarray, im: Any) -> np.ndarray:
        return self.per_image(noisy, im) if self.per_image is not None else self.run(noisy)


def _checkpoint_method_name(spec: str) -> tuple[str | None, Path]:
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        return name.strip(), Path(path)
    return None, Path(spec)


def _infer_name(training: dict, path: Path) -> str:
    name = str(training.get("name") or "")
    if name in LEARNED_METHODS:
        return name
    arch = str(training.get("arch") or "")
    if arch == "drunet":
        return "drunet"
    if str(training.get("loss") or "") == "mse":
        return "mse_only"
    return name or path.stem


def _auto_method(auto: Any) -> _Method:
    """What ``--model auto`` (the GUIs' and the command line's start) gives: per image, the model
    ``auto.choose`` picks from the noisy image in its own units and modality, on the same normalised input."""
    def per_image(noisy: np.ndarray, im: Any) -> np.ndarray:
        chosen, _ = auto.choose(original_units(im, noisy), modality=im.modality)
        return chosen.denoise_normalized(noisy)

    info = {**_learned_method("auto", auto).info, "choice": "per image: default, ct_texture or gaussian_ct"}
    return _Method("auto", auto.denoise_normalized, info, per_image=per_image)


def _learned_method(name: str, denoiser: Any) -> _Method:
    info = {
        "checkpoint": str(denoiser.checkpoint_path),
        "sha256": denoiser.ckpt.get("sha256"),
        "architecture": denoiser.ckpt["models"]["denoiser"]["config"],
        "precision": getattr(denoiser, "precision", "fp32"),  # --precision auto resolves per machine
        "training": {k: v for k, v in denoiser.ckpt.get("training", {}).items() if k != "history"},
    }
    return _Method(name, denoiser.denoise_normalized, info)


def _classical_method(name: str) -> _Method:
    fn = BASELINES[name]
    return _Method(name, lambda x: fn(x), {"params": BASELINE_PARAMS[name]})


def _order(names: Iterable[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(names, key=lambda m: (rank.get(m, len(rank)), names.index(m)))


# ---------------------------------------------------------------- main entry


def run_benchmark(
    data: str | os.PathLike | Sequence[Any],
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    baseline_models: Sequence[str] = (),
    noises: Sequence[str] = PAPER_NOISE_NAMES,
    methods: Sequence[str] | None = None,
    levels: Sequence[float] = (DEFAULT_LEVEL,),
    max_images: int | None = 20,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    figures: bool = True,
    protocol: str | None = None,
    protocol_train: int = 5000,
    protocol_test: int = 500,
    size: int = 256,
    feature_scores: bool = True,
) -> dict:
    """Run the benchmark and write its outputs to ``out``; returns the summary dict.

    Args:
        data: folder/file of clean images, or a sequence of :class:`BenchImage` / ``Slice``.
        out: output folder (created).
        model: checkpoint of "ours" (default: the shipped model). Its restoration net is the
            common feature extractor of the feature-preservation score for every method.
        baseline_models: ``"NAME=CKPT"`` or ``"CKPT"`` (name from the checkpoint's training info:
            DRUNet architecture -> "drunet", MSE loss -> "mse_only").
        noises: noise names (default all 13); levels: severities in [0, 1].
        methods: subset of methods (default: ours + given checkpoints + all classical + noisy).
        max_images: number of clean slices (None = all).
        seed: seeds the slice draw and every noisy input.
        device: torch device for the networks ("auto", "cpu", "cuda", "mps").
        resume: keep the rows already in ``out/results.csv`` and skip them.
        progress: tqdm bar on stderr. figures: write the PNG figures.
        protocol, protocol_train, protocol_test, size: the paper's dataset protocol
            (see :func:`load_benchmark_images`).
        feature_scores: score every output's features with ours' restoration net (two guided
            backpropagations per case, most of a run's time); False leaves the column NaN.

    Returns:
        ``{"out", "n_rows", "n_new_rows", "methods", "noises", "levels", "psnr", "ssim",
        "feature", "speed", "ci"}`` where ``psnr[noise][method]`` is the mean PSNR (dB) etc.
    """
    t_start = time.perf_counter()
    out, noises, levels = _validate(out, noises, levels)
    learned, methods, run_methods, feature_net = _load_methods(model, baseline_models, methods, device, noises)
    policy = feature_net.policy if feature_net is not None else (
        next(iter(learned.values())).policy if learned else None
    )
    if not feature_scores:
        feature_net = None
    images = load_benchmark_images(
        data, max_images=max_images, seed=seed, policy=policy, protocol=protocol,
        protocol_train=protocol_train, protocol_test=protocol_test, size=size,
    )

    csv_path = out / "results.csv"
    rows: list[dict] = []
    if resume and csv_path.is_file():
        _check_resumable(out / "run.json", seed, {m: run_methods[m].info for m in methods})
        rows = read_results(csv_path)
    n_before = len(rows)
    _warm_up(images, learned, run_methods, feature_net)
    rows = _run_cases(rows, csv_path, images, noises, levels, methods, run_methods, feature_net, seed, progress)

    summary = summarize(rows, methods=methods, noises=noises, levels=levels)
    summary.update(out=str(out), n_rows=len(rows), n_new_rows=len(rows) - n_before)
    _atomic_write_text(out / "summary.md", render_summary_md(summary, notes=_notes(feature_net, learned, feature_scores)))
    if figures:
        _figures(out, images, noises, levels[0], run_methods, feature_net, seed, rows, methods)
    run_info = _write_run_json(out, t_start, data, seed, images, noises, levels, methods, run_methods, learned,
                               feature_net, {"layout": protocol, "n_train": protocol_train, "n_test": protocol_test,
                                             "size": size} if protocol else protocol, n_before, len(rows))
    summary["total_seconds"] = run_info["total_seconds"]
    return summary


def _validate(out: str | os.PathLike, noises: Sequence[str], levels: Sequence[float]) -> tuple[Path, tuple, tuple]:
    """The output folder (created), the noise names and the severities, checked."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create output folder ({err.strerror or err})") from None
    noises = tuple(noises)
    from .noise import NOISES

    for n in noises:
        if n not in NOISES:
            raise InputError(f"noise {n!r}: unknown; choose from {', '.join(NOISE_NAMES)}")
    if not noises:
        raise InputError("no noise types given")
    levels = tuple(float(v) for v in levels)
    if not levels or any(not (0.0 <= v <= 1.0) for v in levels):
        raise InputError(f"levels: need one or more severities in [0, 1], got {levels}")
    return out, noises, levels


def _load_methods(
    model: str | os.PathLike | None, baseline_models: Sequence[str], methods: Sequence[str] | None, device: str,
    noises: Sequence[str] = (),
) -> tuple[dict[str, Any], list[str], dict[str, _Method], Any]:
    """Load the checkpoints and resolve the method list.

    With the shipped default as ours and no baseline models given, the shipped MSE twin joins as
    ``mse_only`` and, when ``noises`` has ``ct_correlated``, the shipped CT scanner-noise model as
    ``ct_texture`` (the model made for that type).

    Returns ``(learned, methods, run_methods, feature_net)``: the loaded denoisers by name, the methods
    in table order, a runner per method, and the network whose restoration net scores features for
    every method (ours; None without one).
    """
    from .inference import AUTO_MODEL, Denoiser, companion_models, default_model_path, resolve_model

    if str(model or "").strip() == AUTO_MODEL:  # one checkpoint per column; auto is a column of its own
        raise InputError("--model auto picks a model per CT volume; it is the benchmark's 'auto' column "
                         "(with the shipped default as --model: --methods ours auto ...)")
    known = set(LEARNED_METHODS) | set(BASELINES) | {"noisy"}
    learned: dict[str, Any] = {}
    ours_path = resolve_model(model)
    want_ours = methods is None or "ours" in methods
    if model is not None or ours_path.is_file():
        learned["ours"] = Denoiser(ours_path, device=device)
    elif methods is not None and "ours" in methods:
        raise InputError(f"{ours_path}: model checkpoint not found (pass --model CKPT)")
    beside = companion_models(ours_path) if model is None and not baseline_models else {}
    baseline_models = list(baseline_models)
    if "mse_twin" in beside and (methods is None or "mse_only" in methods):
        baseline_models.append(f"mse_only={beside['mse_twin']}")  # the FP-vs-MSE ablation by default
    if "ct_texture" in beside and "ct_correlated" in noises and (methods is None or "ct_texture" in methods):
        baseline_models.append(f"ct_texture={beside['ct_texture']}")
    for spec in baseline_models:
        name, path = _checkpoint_method_name(str(spec))
        den = Denoiser(path, device=device)
        name = name or _infer_name(den.ckpt.get("training", {}), path)
        if name == "ours":
            raise InputError(f"{path}: 'ours' is the --model checkpoint; name baseline models mse_only/drunet")
        learned[name] = den
        known.add(name)
    # the product's starting choice, per CT volume among the shipped models: with the shipped default as ours
    auto_ok = ("ours" in learned and learned["ours"].checkpoint_path.resolve() == default_model_path().resolve()
               and {"ct_texture", "gaussian_ct"} <= set(companion_models(ours_path)))
    if auto_ok:
        known.add("auto")
    elif methods is not None and "auto" in methods:
        raise InputError("method 'auto' is the per-volume choice among the shipped models: it needs the shipped "
                         "default as --model (and the shipped CT models beside it)")
    if methods is None:
        methods = [m for m in learned if m != "ours" or want_ours] + (["auto"] if auto_ok else []) + \
            list(BASELINES) + ["noisy"]
    for m in methods:
        if m not in known:
            raise InputError(f"method {m!r}: unknown; choose from {', '.join(_order(known))}")
        if m in LEARNED_METHODS and m not in learned:
            raise InputError(f"method {m!r} needs a checkpoint (--model for ours, --baseline-model {m}=CKPT)")
    methods = _order(methods)
    feature_net = learned["ours"] if "ours" in learned else None
    if feature_net is not None and feature_net.restoration is None:
        feature_net = None
    run_methods: dict[str, _Method] = {}
    for m in methods:
        if m == "noisy":
            run_methods[m] = _Method("noisy", lambda x: np.array(x, dtype=np.float32), {"params": "identity"})
        elif m == "auto":
            run_methods[m] = _auto_method(learned["ours"].as_auto())  # the same nets: loaded once
        elif m in learned:
            run_methods[m] = _learned_method(m, learned[m])
        else:
            run_methods[m] = _classical_method(m)
    return learned, methods, run_methods, feature_net


def _warm_up(images: list[BenchImage], learned: dict[str, Any], run_methods: dict[str, _Method],
             feature_net: Any) -> None:
    """The first forward of a network pays for allocations / kernel selection: keep it out of the timings."""
    if not images:
        return
    probe = images[0].clean
    for name, den in learned.items():
        if name in run_methods:
            den.denoise_normalized(probe)
    if feature_net is not None:
        _gb_signed(feature_net, probe[None])


def _run_cases(
    rows: list[dict], csv_path: Path, images: list[BenchImage], noises: Sequence[str], levels: Sequence[float],
    methods: Sequence[str], run_methods: dict[str, _Method], feature_net: Any, seed: int, progress: bool,
) -> list[dict]:
    """Every (image, noise, level) case not yet in ``rows``; ``results.csv`` is rewritten every 5 s and at
    the end (also when interrupted). Returns all rows."""
    from tqdm import tqdm

    done = {_row_key(r) for r in rows}
    groups = [(i, im, nz, lv) for i, im in enumerate(images) for nz in noises for lv in levels]
    last_flush = time.monotonic()
    bar = tqdm(total=len(groups), desc="benchmark", unit="case", disable=not progress, file=sys.stderr)
    try:
        for i, im, nz, lv in groups:
            todo = [m for m in methods if (im.source, im.index, nz, _fmt_level(lv), m) not in done]
            if todo:
                rows += _run_group(i, im, nz, lv, todo, run_methods, feature_net, seed)
                done.update(_row_key(r) for r in rows[-len(todo):])
                if time.monotonic() - last_flush > 5.0:
                    _write_results(csv_path, rows)
                    last_flush = time.monotonic()
            bar.update(1)
    finally:
        bar.close()
        _write_results(csv_path, rows)
    return rows


def _write_run_json(
    out: Path, t_start: float, data: Any, seed: int, images: list[BenchImage], noises: Sequence[str],
    levels: Sequence[float], methods: Sequence[str], run_methods: dict[str, _Method], learned: dict[str, Any],
    feature_net: Any, protocol: dict | str | None, n_before: int, n_rows: int,
) -> dict:
    """``out/run.json``: what was run, on what, with which versions; returns its dict."""
    run_info = {
        "fpdenoise_version": __version__,
        "versions": _versions(),
        "device": str(feature_net.device if feature_net is not None else (
            next(iter(learned.values())).device if learned else "cpu")),
        "seed": seed,
        "data": str(data) if isinstance(data, (str, os.PathLike)) else "<in-memory slices>",
        "protocol": protocol,
        "images": [{"source": im.source, "slice_index": im.index, "modality": im.modality,
                    "shape": list(im.clean.shape), "normalizer": im.normalizer.to_dict()} for im in images],
        "noises": list(noises),
        "levels": list(levels),
        "methods": {m: run_methods[m].info for m in methods},
        "baseline_params": dict(BASELINE_PARAMS),
        "baseline_common_params": BASELINE_COMMON_PARAMS,
        "feature_extractor": (str(feature_net.checkpoint_path) + " restoration net") if feature_net else None,
        "psnr_cap_db": PSNR_CAP_DB,
        "data_range": "max(clean) - min(clean) of each clean slice in original units",
        "speed": "wall seconds per slice (batch 1), scaled linearly to 512x512 pixels",
        "resumed_rows": n_before,
        "new_rows": n_rows - n_before,
        "total_seconds": time.perf_counter() - t_start,
    }
    _atomic_write_text(out / "run.json", json.dumps(run_info, indent=2, default=str) + "\n")
    return run_info


def _check_resumable(run_json: Path, seed: int, method_info: dict) -> None:
    """Refuse to mix rows of a run with another seed or other weights under one method name."""
    try:
        prev = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return  # interrupted before run.json was written: the rows' keys are all we have
    if prev.get("seed") != seed:
        raise InputError(f"{run_json.parent}: --resume with seed {seed}, but the rows there were made with seed "
                         f"{prev.get('seed')}; use the same --seed or another --out")
    for m, info in method_info.items():
        old = prev.get("methods", {}).get(m, {}).get("sha256")
        if old and info.get("sha256") and old != info["sha256"]:
            raise InputError(f"{run_json.parent}: --resume with a different checkpoint for {m!r} than the rows "
                             f"there ({info.get('checkpoint')}); use another --out")


def _gb_signed(feature_net: Any, stack: np.ndarray) -> np.ndarray:
    """Signed GB_f of a (n, y, x) normalised stack, float32 (one batched backward)."""
    import torch

    from .xai import guided_backprop

    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None].to(feature_net.device)
    return guided_backprop(feature_net.restoration, t, readout=feature_net.readout)[:, 0].float().cpu().numpy()


def _run_group(
    i: int, im: BenchImage, noise: str, level: float, todo: list[str], run_methods: dict[str, _Method],
    feature_net: Any, seed: int,
) -> list[dict]:
    noisy = make_noisy(im, noise, level, seed)
    h, w = im.clean.shape
    outs, secs = [], []
    for m in todo:
        t0 = time.perf_counter()
        den = np.asarray(run_methods[m].on(noisy, im), dtype=np.float32)
        secs.append(time.perf_counter() - t0)
        if den.shape != im.clean.shape or not np.isfinite(den).all():
            raise InputError(f"{im.source}[{im.index}]: method {m} returned shape {den.shape} or non-finite values")
        outs.append(den)
    clean_o = original_units(im, im.clean)
    data_range = float(clean_o.max() - clean_o.min())
    if not data_range > 0:
        data_range = float(im.normalizer.hi - im.normalizer.lo)  # flat slice: the normaliser's span
    if feature_net is not None:
        gbs = _gb_signed(feature_net, np.stack([im.clean, *outs]))
        fscores = [feature_preservation(gbs[0], g) for g in gbs[1:]]
    else:
        fscores = [math.nan] * len(outs)
    rows = []
    for m, den, sec, fs in zip(todo, outs, secs, fscores):
        den_o = original_units(im, den)
        rows.append({
            "image": i, "source": im.source, "slice_index": im.index, "modality": im.modality,
            "noise": noise, "level": float(level), "method": m,
            "psnr_db": psnr(clean_o, den_o, data_range=data_range),
            "ssim": ssim(clean_o, den_o, data_range=data_range),
            "feature_score": float(fs), "seconds": float(sec),
            "seconds_per_512": float(sec) * SPEED_REF_PIXELS / float(h * w),
            "height": h, "width": w, "data_range": data_range,
        })
    return rows


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "numpy", "scipy", "scikit-image", "bm3d", "PyWavelets", "matplotlib"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


# ---------------------------------------------------------------- figures


def _figures(
    out: Path, images: list[BenchImage], noises: Sequence[str], level: float, run_methods: dict[str, _Method],
    feature_net: Any, seed: int, rows: list[dict], methods: Sequence[str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .display import feature_change, gray_range, saliency_window
    from .figures import save_panel

    im = images[0]
    vmin, vmax = gray_range(im.clean)
    for nz in noises:
        noisy = make_noisy(im, nz, level, seed)
        panels: list[tuple[str, np.ndarray, str]] = [("Clean", im.clean, "gray"), ("Noisy", noisy, "gray")]
        for m in _FIGURE_METHODS:
            if m in run_methods:
                panels.append((_LABELS[m], run_methods[m].run(noisy), "gray"))
        if feature_net is not None:
            g_noisy = _gb_signed(feature_net, noisy[None])[0]
            panels.append(("GB noisy", np.abs(g_noisy), "inferno"))
            den_m = "ours" if "ours" in run_methods else next((m for m in _FIGURE_METHODS if m in run_methods), None)
            if den_m is not None:
                g_den = _gb_signed(feature_net, run_methods[den_m].run(noisy)[None])[0]
                panels.append((f"GB {_LABELS[den_m]}", np.abs(g_den), "inferno"))
                # The clean image is known: where the denoised structure differs from the truth.
                g_clean = _gb_signed(feature_net, im.clean[None])[0]
                panels.append((f"change vs clean\n{_LABELS[den_m]}", feature_change(g_den, g_clean), "change"))
        gb_maps = [arr for _, arr, cmap in panels if cmap == "inferno"]
        window = saliency_window(*gb_maps) if gb_maps else None  # one scale for all GB panels
        save_panel([(t, a, c, window) if c == "inferno" else (t, a, c) for t, a, c in panels], out / f"fig_{nz}.png",
                   title=f"{nz} (level {_fmt_level(level)}) - {Path(im.source).name} slice {im.index}",
                   shared_range=(vmin, vmax))
    # PSNR per method over all rows (inf capped)
    data = [_finite((r["psnr_db"] for r in rows if r["method"] == m), PSNR_CAP_DB) for m in methods]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(methods)), 3.5))
    ax.boxplot([d if d else [math.nan] for d in data], showfliers=False)
    ax.set_xticks(range(1, len(methods) + 1), [_LABELS.get(m, m) for m in methods], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("PSNR per method (all noise types)")
    fig.tight_layout()
    _save_fig(fig, out / "psnr_boxplot.png")
    plt.close(fig)


def _save_fig(fig: Any, path: Path) -> None:
    _atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
