"""Browserless rendering tests of the web viewer's slice views (trame-slicer, no server, no browser).

The views are real trame-slicer ``SliceView``s rendered offscreen by VTK (Mesa EGL/llvmpipe without a
GPU) over the Slicer module's Logic; denoising is the real background worker process. Pixels are
mapped back to voxels with the slice node's XY-to-RAS matrix, so the checks say *where* colours are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
slicer = pytest.importorskip("slicer", reason="slicer-core not installed (pip install 'fpdenoise[web]')")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)
pytest.importorskip("trame_slicer", reason="trame-slicer not installed (pip install 'fpdenoise[web]')")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import SimpleITK as sitk  # noqa: E402
from scipy.ndimage import maximum_filter, minimum_filter  # noqa: E402

from FPDenoiseLib.errors import InputError, OutputError  # noqa: E402
from FPDenoiseWeb.viewer import ViewerSession, resolve_under  # noqa: E402


def _is_heat(rgb: np.ndarray) -> np.ndarray:
    """Pixels with a warm hue (overlay): red clearly above blue; the CT underneath is grey (R = G = B)."""
    rgb = rgb.astype(int)
    return (rgb[..., 0] - rgb[..., 2]) > 40


def _voxel_at_pixels(session: ViewerSession, view_name: str, volume_node, shape) -> np.ndarray:
    """(h, w, 3) integer (k, j, i) voxel index shown at each pixel of the view (-1 outside the volume)."""
    import vtk

    view = session.view(view_name)
    w, h = view.render_window().GetSize()
    xy_to_ras = vtk.vtkMatrix4x4()
    xy_to_ras.DeepCopy(view.get_view_node().GetXYToRAS())
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    m = np.array([[ras_to_ijk.GetElement(r, c) for c in range(4)] for r in range(4)]) @ np.array(
        [[xy_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)]
    )
    ys, xs = np.mgrid[0:h, 0:w]
    # VTK's XY origin is the bottom-left pixel; captured images have the top row first.
    pts = np.stack([xs.ravel() + 0.5, (h - 1 - ys).ravel() + 0.5, np.zeros(xs.size), np.ones(xs.size)])
    ijk = np.rint((m @ pts)[:3].T).astype(int).reshape(h, w, 3)
    kji = ijk[..., ::-1]
    inside = np.all((kji >= 0) & (kji < np.asarray(shape)), axis=-1)
    kji[~inside] = -1
    return kji


@pytest.fixture()
def session(tmp_path, checkpoint):
    data = tmp_path / "data"
    data.mkdir()
    s = ViewerSession(data_root=data, output_dir=tmp_path / "out", model=checkpoint, device="cpu",
                      offscreen_views=True, view_size=(240, 240))
    yield s
    s.close()


def test_overlay_follows_saliency_threshold_in_right_view(session, tmp_path):
    session.load_sample()
    session.start_denoise()
    assert session.status.state == "running"
    status = session.wait_denoise(timeout=300)
    assert status.state == "done", status.message
    res = session.result
    sal_node = res["outputSaliencyNode"]
    assert -1.0 <= session.scores.fp_score <= 1.0
    # Third overlay: the feature change, a volume with the input's geometry, on the right by default.
    change = res["featureChangeNode"]
    assert change is not None and change.GetName().endswith("feature change")
    assert slicer.util.arrayFromVolume(change).shape == slicer.util.arrayFromVolume(session.input_node).shape
    np.testing.assert_allclose(change.GetSpacing(), session.input_node.GetSpacing())
    comp = session.logic.sliceCompositeNode("Yellow")
    assert comp.GetForegroundVolumeID() == change.GetID()
    legend = session.legend()
    assert legend["score_text"].startswith("feature score ") and "1.0 = every feature kept" in legend["score_text"]
    assert legend["gradient"].startswith("linear-gradient(") and legend["change_ticks"] is not None
    session.set_right_overlay("saliency")
    assert comp.GetForegroundVolumeID() == sal_node.GetID()
    # The worker's scratch folder is gone and nothing else was written.
    assert list((tmp_path / "out").iterdir()) == []

    # The right view without overlay: a pixel shows the overlay where it differs from this frame (the
    # heat map's top end is white, so hue alone would miss the most salient voxels).
    session.set_opacity(0.0)
    ct_only = session.capture("Yellow").astype(int)
    session.set_opacity(1.0)
    sal = slicer.util.arrayFromVolume(sal_node)
    kji = _voxel_at_pixels(session, "Yellow", sal_node, sal.shape)
    inside = kji[..., 0] >= 0
    assert inside.mean() > 0.3, "the volume should fill the view"
    # Pixels on the volume's outermost in-plane voxels may be cut by the slice edge: left out.
    border = (kji[..., 1] % (sal.shape[1] - 1) == 0) | (kji[..., 2] % (sal.shape[2] - 1) == 0)
    at = (kji[..., 0], kji[..., 1], kji[..., 2])
    # A pixel may straddle a voxel boundary: judge it by its 3x3 in-plane neighbourhood, with margins.
    sal_min = minimum_filter(sal, size=(1, 3, 3))
    sal_max = maximum_filter(sal, size=(1, 3, 3))
    # The threshold is a percentile of the two saliency maps (the display module's rule).
    both = np.concatenate([slicer.util.arrayFromVolume(res[k]).ravel() for k in ("inputSaliencyNode", "outputSaliencyNode")])
    for percentile in (50.0, 80.0):
        session.set_threshold(percentile)
        display = sal_node.GetDisplayNode()
        lower = display.GetLowerThreshold()
        assert lower == pytest.approx(np.percentile(both, percentile), rel=1e-5)
        rgb = session.capture("Yellow").astype(int)
        drawn = _is_heat(rgb) | (np.abs(rgb - ct_only).max(axis=-1) > 12)
        high = inside & ~border & (sal_min[at] > 1.2 * lower)
        low = inside & ~border & (sal_max[at] < 0.8 * lower)
        assert high.sum() > 50 and low.sum() > 50, (percentile, high.sum(), low.sum())
        assert drawn[high].mean() > 0.9, f"overlay missing where saliency is high: {drawn[high].mean():.3f}"
        assert drawn[low].mean() < 0.05, f"overlay drawn below the threshold: {drawn[low].mean():.3f}"

    # Left view: input + its saliency, same colour map; opacity 0 removes every overlay pixel.
    assert _is_heat(session.capture("Red")).mean() > 0.005
    session.set_opacity(0.0)
    assert _is_heat(session.capture("Yellow")).mean() < 0.001
    assert _is_heat(session.capture("Red")).mean() < 0.001

    # Linked views: scrolling the left view moves the right one to the same slice.
    n = session.slice_count()
    assert n == slicer.util.arrayFromVolume(session.input_node).shape[0]
    session.set_slice_index(1)
    assert session.slice_index() == 1
    red, yellow = session.view("Red"), session.view("Yellow")
    assert yellow.get_slice_value() == pytest.approx(red.get_slice_value())

    saved = session.save("../../escape")
    assert [p.parent for p in saved] == [tmp_path / "out"] * 4
    assert sorted(p.name for p in saved) == [
        "escape_denoised.nrrd", "escape_denoised_saliency.nrrd", "escape_feature_change.nrrd", "escape_saliency.nrrd"
    ]

    # Strength 0 re-run: the output is the input exactly and nothing changed.
    session.set_strength(0.0)
    session.start_denoise()
    assert session.wait_denoise(timeout=300).state == "done"
    np.testing.assert_array_equal(
        slicer.util.arrayFromVolume(session.result["outputVolumeNode"]), slicer.util.arrayFromVolume(session.input_node)
    )
    assert not slicer.util.arrayFromVolume(session.result["featureChangeNode"]).any()
    assert session.result["outputVolumeNode"].GetAttribute("FPDenoise.Ensemble") == "1"

    # "Best quality": the background CLI averages the 8 flipped and rotated passes, and the output says so
    session.set_strength(1.0)
    session.set_best_quality(True)
    session.start_denoise()
    assert session.wait_denoise(timeout=300).state == "done"
    assert session.result["outputVolumeNode"].GetAttribute("FPDenoise.Ensemble") == "8"
    session.set_best_quality(False)
    assert session.ensemble == 1


def test_lps_volume_orientation(session, tmp_path):
    """A voxel at the patient's right-anterior corner appears top-left in axial views, as in Slicer
    (radiological convention), for a volume stored with a flipped, non-identity LPS direction."""
    shape = (3, 40, 50)  # z, y, x
    a = np.zeros(shape, np.int16)
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.0, 1.2, 2.0))
    img.SetOrigin((20.0, 10.0, -5.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # i -> patient right, j -> anterior
    # Patient right-anterior = most negative L and P coordinates (LPS): the largest i and j here.
    corner = {}
    for i in range(shape[2]):
        for j in range(shape[1]):
            x, y, _ = img.TransformIndexToPhysicalPoint((i, j, 1))
            corner[(i, j)] = (x, y)
    i_ra, j_ra = min(corner, key=lambda ij: corner[ij][0] + corner[ij][1])
    assert (i_ra, j_ra) == (shape[2] - 1, shape[1] - 1)
    arr = np.full(shape, 0, np.int16)
    arr[:, j_ra - 9 : j_ra + 1, i_ra - 9 : i_ra + 1] = 1000  # bright 10x10 block at that corner
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    path = tmp_path / "data" / "lps.nrrd"
    sitk.WriteImage(out, str(path))

    session.load("lps.nrrd")
    session.set_window_preset("ct_bone")
    rgb = session.capture("Red").astype(int)
    bright = rgb.sum(axis=-1) > 600
    ys, xs = np.nonzero(bright)
    assert bright.sum() > 50
    h, w = bright.shape
    assert xs.mean() < w / 2 and ys.mean() < h / 2, (xs.mean(), ys.mean())  # top-left: right-anterior
    # Neither flipped copy is drawn at the other corners.
    assert not bright[h // 2 :, :].any() and not bright[:, w // 2 :].any()


def test_paths_outside_data_root_are_refused(session, tmp_path):
    outside = tmp_path / "secret.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 4), np.int16)), str(outside))
    for bad in ("../secret.nrrd", str(outside), "sub/../../secret.nrrd"):
        with pytest.raises(InputError, match="outside the data root"):
            session.load(bad)
    link = tmp_path / "data" / "link.nrrd"
    link.symlink_to(outside)
    with pytest.raises(InputError, match="outside the data root"):
        session.load("link.nrrd")
    with pytest.raises(InputError, match="not found"):
        session.load("missing.nrrd")
    with pytest.raises(OutputError, match="Denoise first"):
        session.save()
    with pytest.raises(InputError, match="window preset"):
        session.set_window_preset("brain")
    assert resolve_under(tmp_path, ".") == tmp_path.resolve()


def test_model_choice_by_name_or_file(session, checkpoint):
    """The viewer's model list: a shipped name or a file; a missing one is refused and the current kept."""
    assert session.model == str(checkpoint)
    session.set_model("ct_texture")
    assert session.model == "ct_texture"
    with pytest.raises(InputError, match="not found"):
        session.set_model("nope.pt")
    assert session.model == "ct_texture"
    session.set_model("default")
    assert session.model == "default"
    session.set_model(None)
    assert session.model is None


def test_noisy_ct_status_carries_the_ct_model_note(session, tmp_path):
    """The background CLI's note (a noisy CT through the default) reaches the page's status; the CT model's
    own run has none; "auto" runs the CT model and says so."""
    from io_helpers import noisy_ct_phantom

    from FPDenoiseLib.io import Image, write_image

    hu = noisy_ct_phantom(64)  # a scanner's kernel-correlated noise, which the default keeps
    write_image(Image(np.rint(np.stack([hu] * 3)).astype(np.int16), (0.7, 0.7, 2.0), (0, 0, 0), modality="CT"),
                tmp_path / "data" / "noisy_ct.nrrd")
    session.load("noisy_ct.nrrd")
    session.set_model("default")
    session.start_denoise()
    status = session.wait_denoise(timeout=300)
    assert status.state == "done" and "--model ct_texture" in status.message, status.message
    assert session.result["outputVolumeNode"].GetAttribute("FPDenoise.Model") == "default"
    session.set_model("ct_texture")
    session.start_denoise()
    status = session.wait_denoise(timeout=300)
    assert status.state == "done" and status.message == "done", status.message
    assert session.result["outputVolumeNode"].GetAttribute("FPDenoise.Model") == "ct_texture"
    # "auto" through the background CLI: the CT model ran (the note says so, the result node names it)
    session.set_model("auto")
    session.start_denoise()
    status = session.wait_denoise(timeout=300)
    assert status.state == "done" and status.message.startswith("auto: the CT scanner-noise model"), status.message
    assert session.result["outputVolumeNode"].GetAttribute("FPDenoise.Model") == "ct_texture"
