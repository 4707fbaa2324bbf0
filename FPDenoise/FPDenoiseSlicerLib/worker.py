"""Background denoise worker run by the Slicer module in a separate ``PythonSlicer`` process.

    PythonSlicer -m FPDenoiseSlicerLib.worker --input in.nrrd --output-dir DIR [--model CKPT]
        [--device auto|cpu|cuda] [--modality CT] [--strength S] [--ensemble N] [--no-saliency]

Writes ``denoised.nrrd``, ``saliency_input.nrrd``, ``saliency_output.nrrd``, ``feature_change.nrrd``
and ``result.json``
(file names + feature-preservation score) into DIR and prints ``PROGRESS <done> <total> <msg>``
lines that :func:`FPDenoiseSlicerLib.process.parse_progress_line` reads. Errors: one line on stderr,
exit code 2. No Slicer import: the module turns the files back into nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="FPDenoiseSlicerLib.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modality", default=None)
    parser.add_argument("--strength", type=float, default=1.0, help="0 = input unchanged, 1 = as trained, up to 3")
    parser.add_argument("--ensemble", type=int, default=1, help="test-time flips/rotations: 1, 2, 4 or 8")
    parser.add_argument("--no-saliency", action="store_true")
    args = parser.parse_args(argv)

    from FPDenoiseLib.errors import FPDenoiseError
    from FPDenoiseLib.inference import Denoiser
    from FPDenoiseLib.io import atomic_path, read_image, write_image

    try:
        print("PROGRESS 0 1 loading model", flush=True)
        denoiser = Denoiser(args.model, device=args.device, strength=args.strength, ensemble=args.ensemble)
        image = read_image(args.input)
        if args.modality:
            image = replace(image, modality=args.modality)

        def progress(done: int, total: int) -> None:
            print(f"PROGRESS {done} {total} slice {done}/{total}", flush=True)

        result = denoiser.run(image, saliency=not args.no_saliency, progress=progress)
        out = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        info: dict = {
            "denoised": "denoised.nrrd",
            "fp_score": result.fp_score,
            "model": getattr(denoiser, "name", ""),
            "strength": denoiser.strength,
        }
        write_image(result.denoised, out / info["denoised"])
        if result.saliency_input is not None:
            info["saliency_input"] = "saliency_input.nrrd"
            info["saliency_output"] = "saliency_output.nrrd"
            write_image(result.saliency_input, out / info["saliency_input"])
            write_image(result.saliency_output, out / info["saliency_output"])
        if result.feature_change is not None:
            info["feature_change"] = "feature_change.nrrd"
            write_image(result.feature_change, out / info["feature_change"])
        # result.json last and atomically: its presence means every output is complete.
        with atomic_path(out / "result.json") as tmp:
            Path(tmp).write_text(json.dumps(info, indent=1))
        print("PROGRESS 1 1 done", flush=True)
        return 0
    except FPDenoiseError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
