"""Finding images on disk: DICOM series grouped by SeriesInstanceUID, and image files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .atomic import _TMP_TAG, _is_hidden_or_tmp
from .image import DICOM_EXTENSIONS, RASTER_EXTENSIONS, VOLUME_EXTENSIONS, _suffix


@dataclass
class SeriesInfo:
    """One DICOM series found on disk (see :func:`find_series`)."""

    uid: str
    files: list[Path]
    folder: Path  # deepest folder holding all its files
    modality: str = ""
    description: str = ""
    series_number: str = ""
    patient_id: str = ""
    study_uid: str = ""

    @property
    def n_files(self) -> int:
        return len(self.files)

    def __str__(self) -> str:
        d = f" '{self.description}'" if self.description else ""
        return f"{self.uid} ({self.modality or '?'}{d}, {self.n_files} file(s) in {self.folder})"
def _looks_like_dicom(path: Path) -> bool:
    """Cheap content test: 'DICM' at byte 128, a .dcm-like suffix, or a data set without preamble and
    meta header (older scanners and some PACS exports: the file starts with a group 0002/0008 tag)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if _suffix(path) in DICOM_EXTENSIONS:
        return True
    if len(head) >= 8:
        group, elem = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
        if group in (0x0002, 0x0008) and elem < 0x0100:
            vr = head[4:6]
            explicit = vr.isalpha() and vr.isupper()
            return explicit or int.from_bytes(head[4:8], "little") < (1 << 16)  # implicit VR: a sane length
    return False


def _read_series_header(path: Path):
    import pydicom

    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            force=True,
            specific_tags=["SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber", "Rows",
                           "PatientID", "StudyInstanceUID", "SOPClassUID"],
        )
    except Exception:  # not DICOM / unreadable: discovery skips it, read_image reports it
        return None
    uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
    if not uid or "Rows" not in ds:  # no series or not an image object (SR, RTSTRUCT, ...)
        return None
    return ds


def _walk(folder: Path, recursive: bool) -> Iterator[Path]:
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _TMP_TAG not in d)
            for f in sorted(files):
                p = Path(root) / f
                if not _is_hidden_or_tmp(p):
                    yield p
    else:
        for p in sorted(folder.iterdir()):
            if p.is_file() and not _is_hidden_or_tmp(p):
                yield p


def find_series(folder: str | os.PathLike, *, recursive: bool = True) -> list[SeriesInfo]:
    """Group the DICOM image files below ``folder`` by SeriesInstanceUID.

    Handles PACS exports: nested folders, several series mixed in one folder, non-DICOM files
    beside them (ignored), files with or without a ``.dcm`` suffix. Non-image objects (SR, RTSTRUCT,
    presentation states) are skipped. Sorted by folder, then series number, then UID.

    >>> for s in find_series("pacs_export/"):  # doctest: +SKIP
    ...     img = read_image(s.folder, series_uid=s.uid)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    groups: dict[str, SeriesInfo] = {}
    for p in _walk(folder, recursive):
        if not _looks_like_dicom(p):
            continue
        ds = _read_series_header(p)
        if ds is None:
            continue
        uid = str(ds.SeriesInstanceUID)
        info = groups.get(uid)
        if info is None:
            info = groups[uid] = SeriesInfo(
                uid=uid, files=[], folder=p.parent, modality=str(getattr(ds, "Modality", "") or ""),
                description=str(getattr(ds, "SeriesDescription", "") or ""),
                series_number=str(getattr(ds, "SeriesNumber", "") or ""),
                patient_id=str(getattr(ds, "PatientID", "") or ""),
                study_uid=str(getattr(ds, "StudyInstanceUID", "") or ""),
            )
        info.files.append(p)
    for info in groups.values():
        info.folder = Path(os.path.commonpath([str(f.parent) for f in info.files]))

    def key(s: SeriesInfo):
        try:
            num = int(float(s.series_number))
        except ValueError:
            num = 0
        return (str(s.folder), num, s.uid)

    return sorted(groups.values(), key=key)


def find_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Every readable image below ``folder``: volume/raster files and DICOM series.

    A DICOM series is listed as its folder when it is the only series in that folder, otherwise as
    its file when it is a single file (e.g. X-rays exported side by side), otherwise as the folder
    (several multi-file series mixed in one folder: use :func:`find_series` and
    ``read_image(folder, series_uid=...)``). ``.raw``/``.zraw`` data files of ``.mhd``/``.nhdr``
    headers are not listed.

    >>> find_images("data/")   # [Path('data/ct1'), Path('data/xr/chest.png'), ...]  # doctest: +SKIP
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    out: list[Path] = []
    for p in _walk(folder, recursive):
        ext = _suffix(p)
        if ext in VOLUME_EXTENSIONS or ext in RASTER_EXTENSIONS:
            out.append(p)
    series = find_series(folder, recursive=recursive)
    per_folder: dict[Path, int] = {}
    for s in series:
        for d in {f.parent for f in s.files}:
            per_folder[d] = per_folder.get(d, 0) + 1
    for s in series:
        parents = {f.parent for f in s.files}
        if len(parents) == 1 and per_folder[s.files[0].parent] > 1 and s.n_files == 1:
            out.append(s.files[0])
        else:
            out.append(s.folder)
    return sorted(set(out), key=str)
