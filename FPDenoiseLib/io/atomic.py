"""Atomic writes: a temp name in the destination folder, then ``os.replace``; OS errors become
:class:`~FPDenoiseLib.errors.OutputError` with the reason ("disk full", "permission denied", ...)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError
from .image import _itk_msg, _short, _suffix

_TMP_TAG = ".fpdtmp-"


def _is_hidden_or_tmp(path: Path) -> bool:
    return path.name.startswith(".") or _TMP_TAG in path.name


_DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "read-only file system", errno.ENOTDIR: "a parent is not a folder"}


def _output_error(path: Path, err: BaseException) -> OutputError:
    if isinstance(err, OutputError):
        return err
    reason = _DISK_ERRNOS.get(getattr(err, "errno", None) or -1)
    if reason is None:
        low = str(err).lower()
        if "no space" in low:
            reason = "disk full"
        elif "file too large" in low:
            reason = "file too large"
        elif "permission" in low:
            reason = "permission denied"
        else:
            reason = _short(err)
    return OutputError(f"{path}: cannot write ({reason})")


def _diagnose_write_error(path: Path, err: BaseException, nbytes: int) -> OutputError:
    """ITK exceptions carry no errno: reproduce the failure with a plain write of the same size to
    tell 'disk full' / 'file too large' / 'permission denied' apart from format problems."""
    probe = path.parent / f".probe{_TMP_TAG}{uuid.uuid4().hex[:10]}"
    try:
        with open(probe, "wb") as fh:
            chunk = b"\0" * (1 << 20)
            left = min(int(nbytes), 256 << 20)
            while left > 0:
                fh.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as oserr:
        return _output_error(path, oserr)
    finally:
        _remove(probe)
    return OutputError(f"{path}: cannot write ({_itk_msg(err)})")


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it is renamed onto ``path``.

    The temp name keeps the suffix (``.nii.gz`` too) so format-by-extension writers work. The
    caller may create a file or a folder there. On any exception the temp is removed and
    ``OSError``s (disk full, no permission...) become :class:`OutputError`. An existing non-empty
    destination folder is replaced only when ``overwrite`` (old one removed after the swap).

    >>> with atomic_path("out.nrrd") as tmp:  # doctest: +SKIP
    ...     sitk.WriteImage(im, str(tmp))
    """
    path = Path(path)
    suffix = _suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _output_error(path, err) from err
    tmp = path.parent / f".{stem}{_TMP_TAG}{uuid.uuid4().hex[:10]}{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"{path}: writer produced no output")
        if tmp.is_dir() and path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise OutputError(f"{path}: output folder exists and is not empty")
            old = path.parent / f".{stem}{_TMP_TAG}old-{uuid.uuid4().hex[:10]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.exists() and not overwrite:
                raise OutputError(f"{path}: output exists")
            os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError):
            if getattr(err, "errno", None) is None:  # e.g. a short write reported without errno
                raise _diagnose_write_error(path, err, 1 << 20) from err
            raise _output_error(path, err) from err
        raise
