"""The one denoise driver: discovery of inputs, stable output names, resume, per-item results, summary.

Used by ``fpdenoise denoise`` (single input and batch/PACS mode), by the Slicer module's batch path
(``FPDenoiseMRMLLogic.batchDenoiseFolder``) and, through the CLI, by the Slicer background job and the
browser viewer (``python -m FPDenoiseLib.cli denoise IN OUT --saliency-dir D --summary-json J``).

* :func:`discover` finds every DICOM series (by SeriesInstanceUID) and volume/raster file below a
  folder, outside the output folder, and names each output: ``<PatientID>_<SeriesNumber>_<uid hash>``
  for a series (:func:`series_output_name`), the relative path joined by ``_`` for a file (with a hash of
  that path when it was shortened to 40 characters or two inputs would share the name).
* :func:`denoise_item` writes one input's maps first and its denoised output LAST (atomically), so the
  existence of the output means the item is complete: :func:`denoise_batch` skips items whose output
  exists (resume) and never stops at a bad item.
* :class:`BatchSummary` counts done / skipped / failed items and keeps each item's output paths and
  feature-preservation score; :meth:`BatchSummary.write_json` saves it (written last, atomically).

Example::

    from FPDenoiseLib.batch import denoise_batch, discover
    from FPDenoiseLib.inference import Denoiser

    items = discover(Path("pacs_export"), Path("denoised"))
    summary = denoise_batch(Denoiser(), items, Path("denoised"), saliency_dir=Path("denoised/maps"))
    summary.failed  # [(label, reason), ...]
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputError

# File extensions the writers know, longest first so ".nii.gz" wins over ".gz".
OUTPUT_EXTENSIONS = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".png", ".tif", ".tiff", ".dcm")
# Roles of the files one item writes, in the order they are written (the denoised output last).
MAP_ROLES = ("saliency_input", "saliency_output", "feature_change")
_MAP_SUFFIXES = {"saliency_input": "_saliency_input", "saliency_output": "_saliency_denoised",
                 "feature_change": "_feature_change"}

ProgressFactory = Callable[[str], "tuple[Callable[[int, int], None], Callable[[], None]]"]
Log = Callable[[str], None]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _stdout(text: str) -> None:
    print(text)


def _no_progress(desc: str):
    return (lambda done, total: None), (lambda: None)


# ---------------------------------------------------------------- names
def strip_ext(name: str) -> str:
    """``name`` without a known image extension (``.nii.gz`` counts as one)."""
    for ext in OUTPUT_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def split_ext(name: str) -> tuple[str, str]:
    """``(stem, extension)``; the extension is "" for a folder (DICOM series) or an unknown one."""
    stem = strip_ext(name)
    return stem, name[len(stem):]


def safe_name(text: str, default: str) -> str:
    """A file-name-safe form of ``text`` (letters, digits, ``._+-``), at most 40 characters."""
    return _sanitize(text)[:40] or default


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text.strip()).strip("-._")


def series_output_name(info) -> str:
    """Stable output folder name of a DICOM series: ``<PatientID>_<SeriesNumber>_<hash of UID>``.

    The hash (10 hex digits of SHA-1 of the SeriesInstanceUID) keeps names unique and identical
    between runs, which is what makes batch mode resumable.
    """
    h = hashlib.sha1(info.uid.encode()).hexdigest()[:10]
    return f"{safe_name(info.patient_id, 'anon')}_{safe_name(info.series_number, 'S')}_{h}"


def map_paths(output: str | Path, saliency_dir: str | Path, fmt: str = "same") -> dict[str, Path]:
    """Where the saliency and feature-change maps of ``output`` go: ``<stem>_saliency_input``,
    ``<stem>_saliency_denoised``, ``<stem>_feature_change`` in ``saliency_dir``, in the output's format
    (``fmt="same"``; a DICOM series folder for a DICOM output) or as NRRD files (``fmt="nrrd"``)."""
    stem, suffix = split_ext(Path(output).name)
    if fmt == "nrrd":
        suffix = ".nrrd"
    return {role: Path(saliency_dir) / f"{stem}{_MAP_SUFFIXES[role]}{suffix}" for role in MAP_ROLES}


# ---------------------------------------------------------------- discovery
@dataclass(frozen=True)
class BatchItem:
    """One input of a batch: what to read (a file, or a folder + SeriesInstanceUID) and its output name."""

    label: str
    path: Path
    series_uid: str | None
    name: str


def discover(root: Path, out_dir: Path, series_uid: str | None = None) -> list[BatchItem]:
    """Every DICOM series (by SeriesInstanceUID) and volume/raster file below ``root``, outside
    ``out_dir`` (so re-runs never read their own outputs). With ``series_uid`` only that series."""
    from .io import RASTER_EXTENSIONS, VOLUME_EXTENSIONS, _suffix, find_images, find_series

    root, out_dir = Path(root), Path(out_dir)

    def outside(p: Path) -> bool:
        try:
            p.resolve().relative_to(out_dir.resolve())
        except ValueError:
            return True
        return False

    items = []
    for s in find_series(root):
        if all(outside(f) for f in s.files) and (series_uid is None or s.uid == series_uid):
            label = f"series {s.uid} ({s.n_files} file(s) in {s.folder})"
            items.append(BatchItem(label, s.folder, s.uid, series_output_name(s)))
    if series_uid is not None:
        return items
    files = []
    for p in find_images(root):
        ext = _suffix(p)
        if p.is_file() and ext in VOLUME_EXTENSIONS + RASTER_EXTENSIONS and outside(p):
            rel = p.relative_to(root)
            stem = "_".join((*rel.parts[:-1], rel.name[: len(rel.name) - len(ext)]))
            name = safe_name(stem, "image")
            if len(_sanitize(stem)) > 40:  # shortened: other files may share the prefix
                name = _with_hash(name[:31], rel)
            files.append([p, rel, name, ext])
    # different inputs never share an output (the second would be "skipped" as done): a/b.nrrd vs a_b.nrrd
    seen: dict[str, int] = {}
    for f in files:
        seen[(f[2] + f[3]).lower()] = seen.get((f[2] + f[3]).lower(), 0) + 1
    for p, rel, name, ext in files:
        if seen[(name + ext).lower()] > 1:
            name = _with_hash(name, rel)
        items.append(BatchItem(str(p), p, None, name + ext))
    return items


def _with_hash(name: str, rel: Path) -> str:
    """``name`` made unique by 8 hex digits of SHA-1 of the input's path relative to the batch root."""
    return f"{name}_{hashlib.sha1(rel.as_posix().encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------- results
@dataclass
class ItemResult:
    """What became of one item: ``status`` "done", "skipped" or "failed"."""

    label: str
    status: str
    output: Path
    outputs: dict = field(default_factory=dict)  # role ("denoised", "saliency_input"...) -> Path
    fp_score: float | None = None
    reason: str = ""
    model: str = ""  # the model that denoised it (with ``--model auto``, per item)


@dataclass
class BatchSummary:
    """Per-item results of a run plus the model and strength used."""

    input: Path
    items: list = field(default_factory=list)  # ItemResult
    model: str = ""
    strength: float | None = None
    ensemble: int | None = None  # passes over flips and rotations averaged (--ensemble)
    precision: str | None = None  # "bf16" or "fp32": what --precision auto resolved to on this machine

    @classmethod
    def of_run(cls, input: str | Path, denoiser, items: list | None = None) -> BatchSummary:
        """An empty (or ``items``) summary of a run of ``denoiser``: its label, strength, ensemble and precision."""
        return cls(Path(input), list(items or []), model=getattr(denoiser, "label", ""),
                   strength=getattr(denoiser, "strength", None), ensemble=getattr(denoiser, "ensemble", None),
                   precision=getattr(denoiser, "precision", None))

    def _with(self, status: str) -> list:
        return [r for r in self.items if r.status == status]

    @property
    def done(self) -> list:
        return self._with("done")

    @property
    def skipped(self) -> list:
        return self._with("skipped")

    @property
    def failed(self) -> list:
        return self._with("failed")

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def lines(self) -> list[str]:
        """The summary as the CLI prints it on stderr."""
        out = [f"fpdenoise: summary: {len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed "
               f"(of {len(self.items)} in {self.input})"]
        out += [f"fpdenoise:   failed: {r.label}: {r.reason}" for r in self.failed]
        return out

    def to_dict(self) -> dict:
        return {
            "input": str(self.input),
            "model": self.model,
            "strength": self.strength,
            "ensemble": self.ensemble,
            "precision": self.precision,
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "items": [
                {"label": r.label, "status": r.status, "output": str(r.output),
                 "outputs": {k: str(v) for k, v in r.outputs.items()}, "fp_score": r.fp_score, "reason": r.reason,
                 **({"model": r.model} if r.model else {})}
                for r in self.items
            ],
        }

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` atomically: a reader seeing the file sees every output complete."""
        from .io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=1))
        return path


# ---------------------------------------------------------------- denoising
def denoise_item(
    denoiser,
    image,
    output: Path,
    *,
    saliency_dir: str | Path | None = None,
    saliency_format: str = "same",
    progress: Callable[[int, int], None] | None = None,
    log: Log = _stderr,
) -> ItemResult:
    """Denoise one image; write the maps (if ``saliency_dir``) first and the denoised image LAST, so the
    existence of the (atomically renamed) denoised output means the item is complete."""
    from .io import write_image

    den, note = denoiser.choose(image.array, modality=image.modality)
    if note:
        log(f"{output.name}: note: {note}")
    elif getattr(denoiser, "auto", False):  # the user asked for a choice: say which model it made here too
        log(f"{output.name}: auto: the default model ({den.name})")
    res = den.run(image, saliency=bool(saliency_dir), progress=progress)
    outputs: dict = {}
    if saliency_dir:
        targets = map_paths(output, saliency_dir, saliency_format)
        maps = {"saliency_input": (res.saliency_input, "saliency input"),
                "saliency_output": (res.saliency_output, "saliency denoised"),
                "feature_change": (res.feature_change, "feature change")}
        for role in MAP_ROLES:
            arr, what = maps[role]
            outputs[role] = write_image(arr, targets[role], like=image,
                                        description=f"FPDenoise {what} ({den.name})")
        log(f"{output.name}: feature-preservation score (corr. of GB maps, input vs denoised): {res.fp_score:.4f}")
    outputs["denoised"] = write_image(res.denoised, output, like=image,
                                      description=f"FPDenoise denoised ({den.name})")
    return ItemResult(str(image.source or output), "done", outputs["denoised"], outputs,
                      None if res.fp_score is None else float(res.fp_score), model=den.name)


def output_complete(target: Path) -> bool:
    """True when ``target`` (a file, or a DICOM series folder) exists with content: the item is done."""
    return target.exists() and (target.is_file() or any(target.iterdir()))


def denoise_batch(
    denoiser,
    items: list,
    out: Path,
    *,
    input_root: Path | None = None,
    saliency_dir: str | Path | None = None,
    saliency_format: str = "same",
    progress_factory: ProgressFactory = _no_progress,
    log: Log = _stderr,
    emit: Log = _stdout,
) -> BatchSummary:
    """One output per item under ``out``; items whose output exists are skipped (resume); a failing item
    is recorded and the batch goes on. ``log`` gets the progress messages (stderr in the CLI), ``emit``
    each written path (stdout), ``progress_factory(name)`` a ``(callback(done, total), close)`` per item."""
    from .io import read_image

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: batch mode writes one output per series into a folder, but this is a file")
    summary = BatchSummary.of_run(input_root if input_root is not None else out, denoiser)
    n = len(items)
    for i, item in enumerate(items, 1):
        target = out / item.name
        if output_complete(target):
            summary.items.append(ItemResult(item.label, "skipped", target, {"denoised": target}))
            log(f"[{i}/{n}] skipped (output exists: {target}): {item.label}")
            continue
        log(f"[{i}/{n}] {item.label} -> {target}")
        cb, close = progress_factory(item.name)
        try:
            img = read_image(item.path, series_uid=item.series_uid)
            res = denoise_item(denoiser, img, target, saliency_dir=saliency_dir, saliency_format=saliency_format,
                               progress=cb, log=log)
            res.label = item.label
            for role in (*MAP_ROLES, "denoised"):
                if role in res.outputs:
                    emit(str(res.outputs[role]))
            summary.items.append(res)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one bad series must not stop the batch
            reason = " ".join(str(err).split()) or type(err).__name__
            summary.items.append(ItemResult(item.label, "failed", target, reason=reason))
            log(f"fpdenoise: failed: {item.label}: {reason}")
        finally:
            close()
    for line in summary.lines():
        log(line)
    return summary
