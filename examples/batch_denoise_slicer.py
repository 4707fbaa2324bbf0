"""Batch-denoise every image / DICOM series in a folder with the FPDenoise Slicer Logic.

Inside 3D Slicer (no GUI)::

    Slicer --no-main-window --python-script examples/batch_denoise_slicer.py \
        INPUT_DIR OUTPUT_DIR [--model CKPT] [--device auto|cpu|cuda] [--no-saliency]

or with plain Python and ``pip install slicer-core`` (same Logic, bare MRML scene)::

    python examples/batch_denoise_slicer.py INPUT_DIR OUTPUT_DIR

It runs the library's batch driver (``FPDenoiseLib.batch``, the same as ``fpdenoise denoise INPUT_DIR
OUTPUT_DIR``): one output per DICOM series (``<PatientID>_<SeriesNumber>_<uid hash>/``, a derived series)
or volume file (``<relative path joined by _>.<ext>``, same geometry and units, CT in HU); with saliency
the maps ``<name>_saliency_input``, ``<name>_saliency_denoised`` and ``<name>_feature_change`` go to
OUTPUT_DIR/saliency. Outputs already there are skipped, so an interrupted run resumes. Exit code 0 when
every input was done, 1 if any failed (listed in the summary), 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _logic():
    """The module's Qt-free Logic; from a source checkout, put FPDenoise/ and the repo on sys.path."""
    repo = Path(__file__).resolve().parents[1]
    for p in (repo / "FPDenoise", repo):
        if (p / "FPDenoiseSlicerLib").is_dir() or (p / "FPDenoiseLib").is_dir():
            if str(p) not in sys.path:
                sys.path.insert(0, str(p))
    import slicer

    if getattr(slicer, "mrmlScene", None) is None:  # plain Python + slicer-core: make a scene
        slicer.mrmlScene = slicer.vtkMRMLScene()
    from FPDenoiseSlicerLib.logic import FPDenoiseMRMLLogic

    return FPDenoiseMRMLLogic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Batch-denoise a folder with FPDenoise (Slicer Logic).")
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--model", default=None, help="checkpoint (.pt); default: the shipped model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--no-saliency", action="store_true", help="skip the saliency maps")
    args = parser.parse_args(argv)

    logic = _logic()
    from FPDenoiseLib.errors import FPDenoiseError

    try:
        summary = logic.batchDenoiseFolder(
            args.input_dir, args.output_dir, args.model, device=args.device, computeSaliency=not args.no_saliency
        )
    except FPDenoiseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"denoised {len(summary.done)} image(s) into {args.output_dir} ({len(summary.skipped)} already there, "
          f"{len(summary.failed)} failed)")
    return summary.exit_code


if __name__ == "__main__":
    code = main(sys.argv[1:])
    import slicer

    app = getattr(slicer, "app", None)
    if app is not None:  # Slicer keeps running after --python-script unless told to exit
        slicer.util.exit(code)
    else:
        sys.exit(code)
