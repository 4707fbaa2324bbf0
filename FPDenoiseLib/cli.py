"""``fpdenoise`` command line. Thin: parses arguments and calls the library; no math here.

Every user error ends with one line ``fpdenoise: error: <file>: <problem>`` on stderr and exit
status 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import FPDenoiseError, OutputError


# ---------------------------------------------------------------- helpers
def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _check_out(inp: str, out: str) -> None:
    if _same_path(inp, out):
        raise OutputError(f"{out}: output path is the input path; refusing to overwrite the input")


def _progress_cb(desc: str, lines: bool):
    """Return (callback(done, total), close) showing a tqdm bar or PROGRESS lines."""
    if lines:

        def cb(done: int, total: int) -> None:
            print(f"PROGRESS {done} {total} {desc}", flush=True)

        return cb, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="slice", file=sys.stderr, dynamic_ncols=True)

    def cb(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return cb, bar.close


# ---------------------------------------------------------------- commands
def cmd_noises(args: argparse.Namespace) -> int:
    from .noise import NOISE_NAMES

    print("\n".join(NOISE_NAMES))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .intensity import in_normalized_units
    from .io import read_image, write_image
    from .noise import add_noise

    _check_out(args.input, args.output)
    img = read_image(args.input)
    noisy = in_normalized_units(
        img.array, lambda x: add_noise(x, args.noise, level=args.level, seed=args.seed), modality=img.modality
    )
    desc = f"FPDenoise simulated {args.noise} level {args.level}"
    path = write_image(replace(img, array=noisy), args.output, like=img, description=desc)
    print(path)
    return 0


def _strip_ext(name: str) -> str:
    from .batch import strip_ext

    return strip_ext(name)


def _check_out_format(out: Path) -> None:
    """Refuse an output format we cannot write before spending time on denoising."""
    from .errors import InputError
    from .io import IMAGE_EXTENSIONS, _suffix

    ext = _suffix(out)
    if ext and ext not in IMAGE_EXTENSIONS and not out.is_dir():
        raise InputError(f"{out}: unsupported output extension '{ext}' (use .nrrd, .nii, .nii.gz, .mha, .mhd, "
                         ".png, .tif, .dcm or a folder for a DICOM series)")


def _check_saliency_dir(out: Path, saliency_dir: str | None) -> None:
    """A DICOM series folder holds only its slices: refuse maps inside it before any work is done."""
    from .io import _suffix

    if saliency_dir and (_suffix(out) == "" or out.is_dir()):
        sal = Path(saliency_dir).resolve()
        target = out.resolve()
        if sal == target or target in sal.parents:
            raise OutputError(f"{saliency_dir}: --saliency-dir is inside the DICOM output folder {out}, which "
                              "holds only the series' files; choose a folder beside it")


def _progress_factory(args: argparse.Namespace):
    return lambda desc: _progress_cb(desc, args.progress_lines)


def _denoise_one(den, img, output: Path, args: argparse.Namespace, desc_prog: str):
    """Denoise one image into ``output`` (maps first, the denoised image last): :func:`batch.denoise_item`."""
    from .batch import denoise_item

    cb, close = _progress_cb(desc_prog, args.progress_lines)
    try:
        return denoise_item(den, img, output, saliency_dir=args.saliency_dir, saliency_format=args.saliency_format,
                            progress=cb)
    finally:
        close()


def series_output_name(info) -> str:
    """Stable output folder name of a DICOM series (see :func:`FPDenoiseLib.batch.series_output_name`)."""
    from .batch import series_output_name as name

    return name(info)


def cmd_denoise(args: argparse.Namespace) -> int:
    """Denoise one image / series, or every series and volume file of a folder (batch mode)."""
    from .batch import MAP_ROLES, BatchSummary, discover
    from .errors import InputError
    from .inference import Denoiser
    from .io import read_image

    inp, out = Path(args.input), Path(args.output)
    _check_out(inp, out)
    _check_out_format(out)
    one_series_to_file = inp.is_dir() and args.series is not None and _strip_ext(out.name) != out.name
    items = None
    if inp.is_dir() and not one_series_to_file:
        items = discover(inp, out, args.series)
        single_series = len(items) == 1 and items[0].series_uid is not None and args.series is None
        if args.series is not None and not items:
            raise InputError(f"{inp}: no DICOM series with SeriesInstanceUID {args.series}")
        if not items or single_series:
            items = None  # one series (or nothing readable: read_image says precisely why)
        elif _strip_ext(out.name) != out.name and not out.is_dir():
            # OUT names a file: batch mode would make a folder of that name
            if len(items) > 1:
                raise InputError(f"{inp}: holds {len(items)} series/volumes but the output {out} is a file; "
                                 "give an output folder (batch mode) or choose one series with --series UID")
            inp = items[0].path  # the folder's one volume file (or its one series) into that file
            args.series = items[0].series_uid
            items = None
    if items is None:  # single input: output written at OUT itself (file or DICOM series folder)
        _check_saliency_dir(out, args.saliency_dir)
        img = read_image(inp, series_uid=args.series)
        den = Denoiser(args.model, device=args.device, batch_size=args.batch_size, **_quality_kwargs(args))
        result = _denoise_one(den, img, out, args, "denoise")
        for role in (*MAP_ROLES, "denoised"):
            if role in result.outputs:
                print(result.outputs[role])
        if args.summary_json:
            BatchSummary.of_run(inp, den, [result]).write_json(args.summary_json)
        return 0
    return _denoise_batch(inp, out, items, args)


def _denoise_batch(inp: Path, out: Path, items: list, args: argparse.Namespace) -> int:
    """Batch/PACS mode: one output per item under ``out``; resumable; never stops at a bad item."""
    from .batch import denoise_batch
    from .inference import Denoiser

    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: batch mode writes one output per series into a folder, but this is a file")
    den = Denoiser(args.model, device=args.device, batch_size=args.batch_size, **_quality_kwargs(args))  # one load for all items
    summary = denoise_batch(den, items, out, input_root=inp, saliency_dir=args.saliency_dir,
                            saliency_format=args.saliency_format, progress_factory=_progress_factory(args))
    if args.summary_json:
        summary.write_json(args.summary_json)
    return summary.exit_code


def cmd_saliency(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .inference import Denoiser
    from .io import read_image, write_image

    _check_out(args.input, args.output)
    img = read_image(args.input)
    den = Denoiser(args.model, device=args.device, batch_size=args.batch_size, **_quality_kwargs(args))
    cb, close = _progress_cb("saliency", args.progress_lines)
    try:
        sal = den.saliency_array(img.array, modality=img.modality, progress=cb)
    finally:
        close()
    out = replace(img, array=sal, modality="OT")
    print(write_image(out, args.output, like=img, description=f"FPDenoise saliency ({den.name})"))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    cfg = TrainConfig(
        data=list(args.data),
        out=args.out,
        stage=args.stage,
        loss=args.loss,
        lam=args.lam,
        residual_norm=args.residual_norm,
        map_loss=args.map_loss,
        noises=list(args.noise),
        level_range=(args.level_min, args.level_max),
        arch=args.arch,
        base_channels=args.base_channels,
        depth=args.depth,
        max_channels=args.max_channels,
        steps=args.steps,
        restoration_steps=args.restoration_steps,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        bank_size=args.bank_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        val_every=args.val_every,
        ckpt_every=args.ckpt_every,
        init=args.init,
        max_slices_per_volume=args.max_slices_per_volume,
        name=args.name,
        save_dtype=args.save_dtype,
        zero_level_prob=args.zero_level_prob,
        true_map_prob=args.true_map_prob,
        amp=args.amp,
        ema=args.ema,
        attention=list(args.attention or []),
        trainable=args.trainable,
        workers=args.workers,
        residual_gate=args.residual_gate,
        impulse_filter=args.impulse_filter,
        estimator_global=args.estimator_global,
        map_fit=args.map_fit,
    )
    path = train(cfg, resume=args.resume, progress_lines=args.progress_lines, print_digest=args.print_weight_digest)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Denoise the bundled sample after simulating noise; write volumes, saliency and a PNG panel."""
    from dataclasses import replace

    import numpy as np

    from .display import BACKGROUND_PERCENTILE, FEATURE_SCORE_MEANING, gray_range, saliency_window
    from .figures import save_panel
    from .inference import Denoiser, sample_data_path
    from .intensity import in_normalized_units
    from .io import read_image, write_image
    from .metrics import psnr, ssim
    from .noise import add_noise

    out = Path(args.out)
    clean = read_image(args.input or sample_data_path())
    den = Denoiser(args.model, device=args.device, **_quality_kwargs(args))
    noisy_arr = in_normalized_units(
        clean.array, lambda x: add_noise(x, args.noise, level=args.level, seed=args.seed), modality=clean.modality
    )
    noisy = replace(clean, array=noisy_arr)
    den, note = den.choose(noisy.array, modality=noisy.modality)  # as `denoise` and the GUIs do
    if note:
        print(f"note: {note}", file=sys.stderr)
    cb, close = _progress_cb("demo", args.progress_lines)
    try:
        res = den.run(noisy, progress=cb)
    finally:
        close()
    paths = [
        write_image(noisy, out / "noisy.nrrd", like=clean, description="noisy"),
        write_image(res.denoised, out / "denoised.nrrd", like=clean, description="denoised"),
        write_image(res.saliency_input, out / "saliency_noisy.nrrd", like=clean, description="saliency"),
        write_image(res.saliency_output, out / "saliency_denoised.nrrd", like=clean, description="saliency"),
        write_image(res.feature_change, out / "feature_change.nrrd", like=clean, description="feature change"),
    ]
    k = clean.array.shape[0] // 2
    c = clean.array[k].astype(np.float32)
    n = noisy_arr[k].astype(np.float32)
    d = res.denoised.array[k].astype(np.float32)
    rng = float(c.max() - c.min())
    lo, hi = (-1000.0, 600.0) if clean.modality == "CT" else gray_range(c)
    stats = (
        f"{args.noise} level {args.level}: PSNR noisy {psnr(c, n, data_range=rng):.2f} dB -> "
        f"denoised {psnr(c, d, data_range=rng):.2f} dB; SSIM {ssim(c, n, data_range=rng):.3f} -> "
        f"{ssim(c, d, data_range=rng):.3f}; feature score {res.fp_score:.3f}; model {den.name}"
    )
    # The clean image is known here: also show where the output's structure differs from the truth.
    change_clean = den.feature_change_array(res.denoised.array[k][None], clean.array[k][None], modality=clean.modality)[0]
    s_in, s_out = res.saliency_input.array[k], res.saliency_output.array[k]
    shared = saliency_window(s_in, s_out)  # equal colour = equal saliency in both GB panels
    paths.append(
        save_panel(
            [("clean", c), ("noisy", n), ("denoised", d),
             ("GB noisy", s_in, "inferno", shared), ("GB denoised", s_out, "inferno", shared),
             ("feature change\n|GB(den) - GB(noisy)|", res.feature_change.array[k], "inferno"),
             ("vs clean\n|GB(den) - GB(clean)|", change_clean, "inferno")],
            out / "panel.png",
            title=stats,
            shared_range=(lo, hi),
            footer=f"feature score {res.fp_score:.3f} — {FEATURE_SCORE_MEANING}; colours: Inferno, "
                   f"lowest {BACKGROUND_PERCENTILE:g} % of each map (background) not drawn",
        )
    )
    print(stats)
    for p in paths:
        print(p)
    return 0


# ---------------------------------------------------------------- parser
def cmd_benchmark(args: argparse.Namespace) -> int:
    """Run ``fpdenoise benchmark`` from parsed arguments; prints the summary table. Returns 0."""
    from .benchmark import export_protocol, run_benchmark
    from .errors import InputError

    if args.export_protocol:
        if not args.protocol:
            raise InputError("--export-protocol needs --protocol lidc|rsna|lits")
        n_tr, n_te = export_protocol(args.data, args.protocol, args.out, n_train=args.protocol_train,
                                     n_test=args.protocol_test, size=args.size, seed=args.seed)
        print(f"wrote {n_tr} training slices to {Path(args.out) / 'train'} and {n_te} test slices to "
              f"{Path(args.out) / 'test'}")
        return 0
    summary = run_benchmark(
        args.data, args.out, model=args.model, baseline_models=args.baseline_model, noises=args.noises,
        methods=args.methods, levels=args.levels, max_images=(args.max_images or None), seed=args.seed,
        device=args.device, resume=args.resume, progress=not args.no_progress, figures=not args.no_figures,
        feature_scores=not args.no_feature_scores,
        protocol=args.protocol, protocol_train=args.protocol_train, protocol_test=args.protocol_test, size=args.size,
    )
    out = Path(summary["out"])
    print((out / "summary.md").read_text())
    print(f"{summary['n_rows']} rows ({summary['n_new_rows']} new) in {out / 'results.csv'}; "
          f"{summary['total_seconds']:.1f} s")
    return 0


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, mps")


def _quality_kwargs(args: argparse.Namespace) -> dict:
    return {"strength": getattr(args, "strength", 1.0), "ensemble": getattr(args, "ensemble", 1),
            "precision": getattr(args, "precision", "auto")}


def _add_quality(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strength", type=float, default=1.0,
                   help="denoising strength: below 1 a blend of the input with the full correction (0 = the input exactly, "
                        "0.5 low: half the correction), 1 as trained, above 1 the noise map is scaled (1.5 high; range 0..3)")
    p.add_argument("--ensemble", type=int, default=1, choices=[1, 2, 4, 8],
                   help="test-time ensemble over flips/rotations (8 = all; ~N times slower, a little better)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="bf16: bfloat16 forward pass with the input layers in float32, 1.3-1.5x faster on CPUs with "
                        "native bf16 (AVX512-BF16/AMX) at the same quality; refused where the device has none. "
                        "auto (default): bf16 where native, else fp32")


# inference.MODEL_NAMES, spelled out so that building the parser does not import torch (a test keeps them equal)
MODEL_HELP = ("checkpoint file, or a shipped model by name: default (FP-trained, all noise types), mse_twin (its "
              "MSE-only twin), ct_texture (CT: a scanner's correlated noise), gaussian_ct (CT: white noise of one level), "
              "auto (the default, or ct_texture for a CT whose noise it would remove and the default keeps, or "
              "gaussian_ct for a CT with white noise; the note says which)")


def _add_model(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--model`` and its companions; ``default`` "auto" where the GUIs start there too (denoise, demo)."""
    p.add_argument("--model", default=default, help=f"{MODEL_HELP}; default: {default or 'default'}")
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--progress-lines", action="store_true", help="print 'PROGRESS done total' lines (for GUIs)")


def _add_benchmark_parser(sub: argparse._SubParsersAction) -> None:
    # ImportError (the benchmark's dependencies are missing): build_parser leaves the subcommand out
    from .benchmark import BASELINES
    from .noise import DEFAULT_LEVEL, PAPER_NOISE_NAMES

    p = sub.add_parser(
        "benchmark",
        help=f"compare ours / MSE-only / DRUNet / classical filters on the paper's {len(PAPER_NOISE_NAMES)} noise types",
        description="Paper-comparison benchmark: PSNR, SSIM, feature-preservation score and speed of every "
        "method on the same noisy inputs; writes results.csv, summary.md, figures and run.json to --out.",
    )
    p.add_argument("--data", required=True, help="folder of clean images/volumes (or a dataset with --protocol)")
    p.add_argument("--out", required=True, help="output folder (with --export-protocol: where train/ and test/ go)")
    p.add_argument("--model", default=None, help=f"ours: {MODEL_HELP}; default: default (auto is refused: one model per column)")
    p.add_argument("--baseline-model", action="append", default=[], metavar="[NAME=]CKPT",
                   help="learned baseline checkpoint, e.g. mse_only=mse.pt or drunet=drunet.pt (repeatable)")
    p.add_argument("--noises", nargs="+", default=list(PAPER_NOISE_NAMES), metavar="NOISE",
                   help=f"noise types (default the paper's {len(PAPER_NOISE_NAMES)}: {' '.join(PAPER_NOISE_NAMES)}; "
                   "ct_correlated is also available)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="methods (default: ours, given baseline models, auto with the shipped default, "
                        + ", ".join(BASELINES) + ", noisy)")
    p.add_argument("--levels", nargs="+", type=float, default=[DEFAULT_LEVEL], metavar="LEVEL",
                   help=f"noise severities in [0, 1] (default {DEFAULT_LEVEL})")
    p.add_argument("--max-images", type=int, default=20, help="number of clean test slices (default 20; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the slice draw and the noise (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (networks only)")
    p.add_argument("--resume", action="store_true", help="skip rows already in OUT/results.csv")
    p.add_argument("--no-figures", action="store_true", help="do not write PNG figures")
    p.add_argument("--no-feature-scores", action="store_true",
                   help="skip the feature-preservation scores (two guided backpropagations per case, most of the "
                        "time of a learned-methods-only run); the column is left empty (NaN)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--protocol", choices=("lidc", "rsna", "lits"), default=None,
                   help="--data is a LIDC-IDRI / RSNA Pneumonia / LiTS folder: use the paper's patient-split test slices")
    p.add_argument("--protocol-train", type=int, default=5000, help="protocol: training slices drawn (default 5000)")
    p.add_argument("--protocol-test", type=int, default=500, help="protocol: test slices drawn (default 500)")
    p.add_argument("--size", type=int, default=256, help="protocol: slices resized to SIZE x SIZE (default 256)")
    p.add_argument("--export-protocol", action="store_true",
                   help="with --protocol: only write the split as NRRD slices to OUT/train and OUT/test (for train) and exit")
    p.set_defaults(func=cmd_benchmark)


def build_parser() -> argparse.ArgumentParser:
    from .noise import DEFAULT_LEVEL, NOISE_NAMES

    parser = argparse.ArgumentParser(prog="fpdenoise", description="Explainable feature-preserving denoising of CT, X-ray and MR images.")
    parser.add_argument("--version", action="version", version=f"fpdenoise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("noises", help="list the 14 noise/artifact types (the paper's 13, then ct_correlated)")
    p.set_defaults(func=cmd_noises)

    p = sub.add_parser("simulate", help="add a noise/artifact to a clean image")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--noise", required=True, choices=NOISE_NAMES)
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL, help="severity 0..1 (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "denoise",
        help="denoise an image / volume / DICOM series, or every series and volume of a folder",
        description="INPUT is a file, a DICOM series folder, or a folder of many series/volumes (PACS "
        "export: batch mode). A DICOM series is written as a derived DICOM series. In batch mode OUTPUT "
        "is a folder receiving one output per series (<PatientID>_<SeriesNumber>_<uid hash>/) or volume "
        "file; outputs already present are skipped (resumable); exit status 1 if any item failed.",
    )
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--saliency-dir", default=None, help="also write GB saliency of input and output and the feature change |GB(out)-GB(in)| here")
    p.add_argument("--saliency-format", default="same", choices=["same", "nrrd"],
                   help="saliency maps in the output's format (a derived DICOM series for DICOM) or NRRD")
    p.add_argument("--series", default=None, metavar="UID", help="only the DICOM series with this SeriesInstanceUID")
    p.add_argument("--summary-json", default=None, metavar="FILE",
                   help="also write the per-item results (output paths, feature score, status) as JSON, last")
    _add_model(p, "auto")
    _add_quality(p)
    _add_device(p)
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser("saliency", help="Guided-Backprop saliency map of an image")
    p.add_argument("input")
    p.add_argument("output")
    _add_model(p)
    _add_device(p)
    p.set_defaults(func=cmd_saliency)

    p = sub.add_parser("train", help="train the restoration net and/or the denoiser")
    p.add_argument("--data", required=True, action="append", help="folder or file of clean images (repeatable)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--stage", default="both", choices=["restoration", "denoiser", "both", "estimator"],
                   help="estimator: retrain only the noise estimator of a trained resunet (--init), e.g. with --estimator-global")
    p.add_argument("--loss", default="fp", choices=["fp", "mse"])
    p.add_argument("--lam", type=float, default=0.01, help="weight of the (relative) FP term")
    p.add_argument("--residual-norm", default="mean", choices=["mean", "log"],
                   help="log: mean per-sample log-MSE (trains for mean PSNR; mild noise is not drowned by severe)")
    p.add_argument("--map-loss", default="l1", choices=["l1", "log"],
                   help="resunet noise-map estimator loss: l1, or log (relative error: mild levels count as much as severe)")
    p.add_argument("--noise", nargs="+", default=["mix"], help="mix or noise names")
    p.add_argument("--level-min", type=float, default=0.0, help="noise severity range (0..1)")
    p.add_argument("--level-max", type=float, default=0.6)
    p.add_argument("--arch", default="unet", choices=["unet", "drunet", "resunet"],
                   help="denoiser: unet (paper), drunet, resunet (fast noise-aware, the shipped default)")
    p.add_argument("--amp", default="off", choices=["off", "bf16"],
                   help="bf16 autocast (GPU: ~2x faster; CPU: 1.4x faster where bf16 is native, AVX512-BF16/AMX)")
    p.add_argument("--attention", type=int, nargs="+", metavar="LEVEL",
                   help="resunet: self-attention at these levels (0 = the top; the bottom level attends globally, "
                        "the others over 8x8 tiles); grown from an --init without it with its output unchanged")
    p.add_argument("--trainable", default="all", choices=["all", "attention"],
                   help="attention: train only the attention layers of a grown --init (every other weight kept)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="keep an exponential moving average of the weights with this decay per step "
                        "(e.g. 0.999) and validate and ship it; 0 = off")
    p.add_argument("--residual-gate", type=float, default=40.0,
                   help="resunet: the correction is scaled by tanh(GATE * noise map); larger = full strength at lower noise")
    p.add_argument("--impulse-filter", action="store_true",
                   help="resunet: replace isolated salt & pepper pixels by a local median before the network")
    p.add_argument("--estimator-global", action="store_true",
                   help="resunet: the noise estimator also sees image-wide feature means (flat vs signal-dependent noise)")
    p.add_argument("--map-fit", action="store_true",
                   help="resunet: the denoiser gets the noise map fitted to the local intensity, small fluctuations "
                        "removed (models.fit_noise_map; +0.16 dB Gaussian 2 %%, +0.65 dB Poisson on held-out CT)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that synthesise the noisy batches (Linux; same batches as 0, sooner)")
    p.add_argument("--zero-level-prob", type=float, default=0.0, help="fraction of clean (level 0) samples")
    p.add_argument("--true-map-prob", type=float, default=0.5,
                   help="resunet: fraction of samples given the true noise map instead of the estimate")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-channels", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000, help="denoiser steps")
    p.add_argument("--restoration-steps", type=int, default=None, help="default: steps/2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--bank-size", type=int, default=2048, help="fixed clean patches (GB cached per patch)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--init", default=None, help="checkpoint with the restoration net (stage denoiser) or weights to fine-tune")
    p.add_argument("--max-slices-per-volume", type=int, default=64)
    p.add_argument("--name", default=None)
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from --out")
    p.add_argument("--progress-lines", action="store_true")
    p.add_argument("--print-weight-digest", action="store_true",
                   help="every rank prints a SHA-256 of its final weights on stderr (debug: ranks in sync?)")
    _add_device(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="simulate noise on the bundled sample, denoise it, write maps and a PNG panel")
    p.add_argument("--input", default=None, help="clean image (default: bundled sample CT)")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--noise", default="gaussian", choices=NOISE_NAMES)
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="auto", help=f"{MODEL_HELP}; default: auto")
    p.add_argument("--progress-lines", action="store_true")
    _add_device(p)
    p.set_defaults(func=cmd_demo)

    try:
        _add_benchmark_parser(sub)
    except ImportError:
        pass

    # The browser viewer lives in FPDenoiseWeb (trame/Slicer deps, optional): only its name is listed
    # here; main() hands `fpdenoise view ...` to it before parsing, so FPDenoiseLib imports none of it.
    sub.add_parser("view", add_help=False, help="browser viewer (needs fpdenoise[web]); see fpdenoise view --help")
    return parser


def cmd_view(argv: list[str]) -> int:
    """`fpdenoise view ARGS` = `fpdenoise-view ARGS` (FPDenoiseWeb.app), imported only here."""
    try:
        from FPDenoiseWeb.app import main as view_main
    except ImportError as err:
        raise FPDenoiseError(
            f"fpdenoise view: the browser viewer needs its extra dependencies ({err.name or err}); "
            'pip install "fpdenoise[web]"'
        ) from err
    return int(view_main(argv) or 0)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"fpdenoise: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["view"]:
        try:
            return cmd_view(argv[1:])
        except FPDenoiseError as err:
            print(f"fpdenoise: error: {err}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    # Library warnings (e.g. a DICOM without usable pixel spacing) as one line each, not file:line + source.
    warnings.formatwarning = _warning_line
    try:
        return int(args.func(args) or 0)
    except FPDenoiseError as err:
        print(f"fpdenoise: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"fpdenoise: error: {err.filename}: not found", file=sys.stderr)
        return 2
    except PermissionError as err:
        print(f"fpdenoise: error: {err.filename}: permission denied", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fpdenoise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
