"""SimpleITK volume formats (NRRD, NIfTI, MetaImage), PNG and TIFF: readers and writers."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from .atomic import _TMP_TAG, _diagnose_write_error, _output_error, _remove, atomic_path
from .image import _FORMAT_BY_EXT, IDENTITY, Image, _itk_msg, _norm_modality, _short, _suffix


def _read_sitk(p: Path) -> Image:
    import SimpleITK as sitk

    try:
        im = sitk.ReadImage(str(p))
    except RuntimeError as err:
        raise InputError(f"{p}: cannot read ({_itk_msg(err)})") from err
    if im.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{p}: has {im.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector); "
                         "only single-channel grayscale is supported")
    dim = im.GetDimension()
    size = im.GetSize()
    if dim > 3:
        if all(s == 1 for s in size[3:]):
            im = im[(slice(None),) * 3 + (0,) * (dim - 3)]
            dim = 3
        else:
            raise InputError(f"{p}: {dim}D data of size {size} is not supported (need 2D or 3D)")
    arr = sitk.GetArrayFromImage(im)
    if dim == 2:
        sx, sy = im.GetSpacing()
        ox, oy = im.GetOrigin()
        d = im.GetDirection()
        spacing, origin = (sx, sy, 1.0), (ox, oy, 0.0)
        direction = (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
        arr = arr[None]
        is_2d = True
    else:
        spacing, origin, direction = im.GetSpacing(), im.GetOrigin(), im.GetDirection()
        is_2d = False
    mod = im.GetMetaData("FPDenoise_modality") if im.HasMetaDataKey("FPDenoise_modality") else "OT"
    return Image(arr, tuple(map(float, spacing)), tuple(map(float, origin)), tuple(map(float, direction)),
                 _norm_modality(mod), is_2d, str(p), _FORMAT_BY_EXT[_suffix(p)])


# ---- PNG / TIFF
def _gray_from_rgb(arr: np.ndarray, p: Path) -> np.ndarray:
    """RGB(A) whose colour channels are identical (grayscale saved as RGB) -> one channel."""
    c = arr[..., :3]
    if np.array_equal(c[..., 0], c[..., 1]) and np.array_equal(c[..., 0], c[..., 2]):
        return np.ascontiguousarray(c[..., 0])
    raise InputError(f"{p}: colour (RGB) image; only grayscale images are supported")


def _read_png(p: Path) -> Image:
    from PIL import Image as PILImage

    try:
        with PILImage.open(p) as im:
            im.load()
            n_frames = getattr(im, "n_frames", 1)
            mode = im.mode
            if n_frames > 1:
                raise InputError(f"{p}: animated PNG with {n_frames} frames is not supported")
            if mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.array(im)
            elif mode == "1":
                arr = np.array(im, dtype=np.uint8) * 255
            elif mode in ("RGB", "RGBA", "LA", "P", "PA"):
                rgb = np.array(im.convert("RGB")) if mode in ("P", "PA") else np.array(im)
                arr = rgb[..., 0] if mode == "LA" else _gray_from_rgb(rgb, p)
            else:
                raise InputError(f"{p}: unsupported PNG pixel mode '{mode}'")
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{p}: cannot read PNG ({_short(err)})") from err
    if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # PIL opens some 16-bit PNGs as mode "I"
    return Image(arr[None], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY, "XR", True, str(p), "png")


def _read_tiff(p: Path) -> Image:
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            s = tf.series[0]
            axes, arr = s.axes, s.asarray()
            page = tf.pages[0]
            spacing = _tiff_spacing(page)
            desc = str(page.description or "")
    except Exception as err:
        raise InputError(f"{p}: cannot read TIFF ({_short(err)})") from err
    if "S" in axes and arr.shape[axes.index("S")] > 1:
        arr = np.moveaxis(arr, axes.index("S"), -1)
        if arr.ndim != 3:
            raise InputError(f"{p}: multi-page colour TIFF (axes {axes}, shape {arr.shape}) is not supported")
        arr = _gray_from_rgb(arr, p)
    else:
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise InputError(f"{p}: multi-page TIFF (axes {axes}, shape {s.shape}) is not supported; "
                             "save volumes as NRRD/NIfTI/MHA")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    mod = desc.split("modality=", 1)[1].split()[0] if desc.startswith("FPDenoise modality=") else "XR"
    return Image(np.ascontiguousarray(arr)[None], spacing, (0.0, 0.0, 0.0), IDENTITY, _norm_modality(mod), True,
                 str(p), "tiff")


def _tiff_spacing(page) -> tuple[float, float, float]:
    """Pixel size in mm from X/YResolution when the unit is cm or inch, else 1.0."""
    try:
        tags = page.tags
        # only centimetre resolutions are physical; inch resolutions are usually screen dpi
        if "ResolutionUnit" in tags and int(tags["ResolutionUnit"].value) == 3:
            xr, yr = tags["XResolution"].value, tags["YResolution"].value
            xr, yr = xr[0] / xr[1], yr[0] / yr[1]
            if xr > 0 and yr > 0:
                return (10.0 / xr, 10.0 / yr, 1.0)
    except Exception:  # missing / odd resolution tags: no physical size
        pass
    return (1.0, 1.0, 1.0)
def _write_sitk(image: Image, arr: np.ndarray, path: Path, overwrite: bool) -> None:
    import SimpleITK as sitk

    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    d = tuple(float(x) for x in image.direction)
    flat = arr.shape[0] == 1 and image.is_2d and d[2] == 0 and d[5] == 0 and d[6] == 0 and d[7] == 0 \
        and abs(d[8] - 1) < 1e-9 and float(image.origin[2]) == 0.0
    if flat:  # keep 2D images 2D so they read back with is_2d=True
        im = sitk.GetImageFromArray(arr[0])
        im.SetSpacing(tuple(float(s) for s in image.spacing[:2]))
        im.SetOrigin(tuple(float(s) for s in image.origin[:2]))
        im.SetDirection((d[0], d[1], d[3], d[4]))
    else:
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing(tuple(float(s) for s in image.spacing))
        im.SetOrigin(tuple(float(s) for s in image.origin))
        im.SetDirection(d)
    im.SetMetaData("FPDenoise_modality", str(image.modality))
    if _suffix(path) in (".mhd", ".nhdr"):  # detached header: the data file must get its final name too
        _write_mhd(im, path, overwrite, arr.nbytes)
        return
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            sitk.WriteImage(im, str(tmp), useCompression=_suffix(path) in (".nrrd", ".mha", ".nii.gz"))
        except RuntimeError as err:
            raise _diagnose_write_error(path, err, arr.nbytes) from err


def _write_mhd(im, path: Path, overwrite: bool, nbytes: int) -> None:
    """.mhd + .raw (or .nhdr + .raw.gz): written with their final names into a temp folder, then moved
    (data file first, the header last)."""
    import SimpleITK as sitk

    if path.exists() and not overwrite:
        raise OutputError(f"{path}: output exists (overwrite=False)")
    tmpdir = path.parent / f".{path.stem}{_TMP_TAG}{uuid.uuid4().hex[:10]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir.mkdir()
        sitk.WriteImage(im, str(tmpdir / path.name), useCompression=True)
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
    except OSError as err:
        raise _output_error(path, err) from err
    except RuntimeError as err:
        raise _diagnose_write_error(path, err, nbytes) from err
    finally:
        _remove(tmpdir)


def _png_target_dtype(arr: np.ndarray, like: Image | None):
    if arr.dtype in (np.uint8, np.uint16):
        return arr.dtype
    if like is not None and np.asarray(like.array).dtype in (np.uint8, np.uint16):
        return np.asarray(like.array).dtype
    if arr.dtype == bool:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16)


def _to_uint(arr: np.ndarray, dt, path: Path, clip: bool) -> np.ndarray:
    dt = np.dtype(dt)
    if arr.dtype == dt:
        return arr
    if arr.dtype == bool:
        return arr.astype(dt) * np.iinfo(dt).max
    info = np.iinfo(dt)
    v = np.rint(arr.astype(np.float64)) if arr.dtype.kind == "f" else arr.astype(np.int64)
    lo, hi = float(v.min()), float(v.max())
    if lo < info.min or hi > info.max:
        if not clip:
            raise InputError(f"{path}: values [{lo:g}, {hi:g}] do not fit {dt.name} [{info.min}, {info.max}]; "
                             "rescale first, pass clip=True, or write .tif/.nrrd")
        v = np.clip(v, info.min, info.max)
    return v.astype(dt)


def _write_png(arr: np.ndarray, path: Path, like: Image | None, clip: bool, overwrite: bool,
               rescale: bool = False) -> None:
    from PIL import Image as PILImage

    if arr.shape[0] != 1:
        raise InputError(f"{path}: PNG holds one 2D image but the image has {arr.shape[0]} slices; "
                         "write .nrrd/.nii.gz/.mha or a DICOM folder")
    dt = np.dtype(_png_target_dtype(arr, like))
    if rescale and arr.dtype != bool:
        a = arr[0].astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        out = np.rint((a - lo) / (hi - lo) * np.iinfo(dt).max).astype(dt) if hi > lo else np.zeros(a.shape, dt)
    else:
        out = _to_uint(arr[0], dt, path, clip)
    with atomic_path(path, overwrite=overwrite) as tmp:
        im = PILImage.fromarray(np.ascontiguousarray(out))
        im.save(tmp, format="PNG")


def _write_tiff(image: Image, arr: np.ndarray, path: Path, overwrite: bool) -> None:
    import tifffile

    if arr.shape[0] != 1:
        raise InputError(f"{path}: TIFF output is 2D only but the image has {arr.shape[0]} slices; "
                         "write .nrrd/.nii.gz/.mha or a DICOM folder")
    a = arr[0]
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    sx, sy = float(image.spacing[0]), float(image.spacing[1])
    with atomic_path(path, overwrite=overwrite) as tmp:
        tifffile.imwrite(tmp, np.ascontiguousarray(a), resolution=(10.0 / sx, 10.0 / sy),
                         resolutionunit="CENTIMETER", description=f"FPDenoise modality={image.modality}",
                         metadata=None)
