"""Headless tests of the FPDenoise Slicer Logic on a real MRML scene (``pip install slicer-core``).

The Logic (FPDenoise/FPDenoiseSlicerLib/logic.py) is driven exactly as the module, the batch script
and the browser viewer drive it: real ``vtkMRMLScene``, real volume/display/colour/slice-composite
/layout nodes, real FPDenoiseLib inference, real files and real background processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core not installed (pip install 'fpdenoise[test]')")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FPDenoise"))

import SimpleITK as sitk  # noqa: E402
from FPDenoiseSlicerLib import process  # noqa: E402
from FPDenoiseSlicerLib.logic import ENSEMBLE_BEST, SALIENCY_COLOR_NODE_NAME, FPDenoiseMRMLLogic  # noqa: E402

from FPDenoiseLib.errors import FPDenoiseError, InputError  # noqa: E402

SPACING = (0.7, 0.8, 2.5)  # mm, anisotropic
ORIGIN_RAS = (-12.5, 30.25, 100.0)


def _ijk_to_ras() -> np.ndarray:
    """Oblique (30 deg about S) and j-flipped directions, anisotropic spacing, an origin."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag(SPACING)
    m[:3, 3] = ORIGIN_RAS
    return m


def _ct_phantom(seed: int = 0, shape=(3, 40, 48)) -> np.ndarray:
    """int16 HU: air, soft-tissue ellipse (40 HU), a bone disc (1000 HU), 20 HU noise."""
    _, y, x = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    hu = np.full(shape, -1000.0)
    hu[((y - 20) / 15) ** 2 + ((x - 24) / 20) ** 2 < 1] = 40.0
    hu[((y - 20) / 5) ** 2 + ((x - 30) / 5) ** 2 < 1] = 1000.0
    hu += np.random.default_rng(seed).normal(0, 20, shape)
    return np.rint(hu).astype(np.int16)


def _matrix(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture()
def logic():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    return FPDenoiseMRMLLogic()


@pytest.fixture()
def ct(logic):
    return slicer.util.addVolumeFromArray(_ct_phantom(), ijkToRAS=_ijk_to_ras(), name="chest CT")


# ----------------------------------------------------------------------------- denoise
def test_denoise_keeps_geometry_units_and_names(logic, ct, checkpoint):
    before = slicer.util.arrayFromVolume(ct).copy()
    calls = []
    res = logic.denoise(ct, checkpoint, device="cpu", progress=lambda d, t: calls.append((d, t)))
    out, sIn, sOut = res["outputVolumeNode"], res["inputSaliencyNode"], res["outputSaliencyNode"]
    change = res["featureChangeNode"]

    assert out.GetName() == "chest CT denoised"
    assert sIn.GetName() == "chest CT saliency"
    assert sOut.GetName() == "chest CT denoised saliency"
    assert change.GetName() == "chest CT feature change"
    for node in (out, sIn, sOut, change):
        np.testing.assert_allclose(_matrix(node), _ijk_to_ras(), atol=1e-9)
        np.testing.assert_allclose(node.GetSpacing(), SPACING, atol=1e-12)
        np.testing.assert_allclose(node.GetOrigin(), ORIGIN_RAS, atol=1e-12)
        assert slicer.util.arrayFromVolume(node).shape == before.shape

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), before)  # input untouched
    den = slicer.util.arrayFromVolume(out)
    assert den.dtype == np.int16  # HU stays HU, same pixel type
    # Values in HU, not the normalised range: air stays near -1000, bone near +1000.
    air = before < -900
    bone = before > 900
    assert abs(float(den[air].mean()) + 1000) < 150, den[air].mean()
    assert abs(float(den[bone].mean()) - 1000) < 250, den[bone].mean()
    assert calls and calls[-1][0] == calls[-1][1] == before.shape[0]

    both = np.concatenate([slicer.util.arrayFromVolume(n).ravel() for n in (sIn, sOut)])
    for node in (sIn, sOut, change):
        sal = slicer.util.arrayFromVolume(node)
        # The two saliency maps share one window (equal colour = equal saliency); the change has its own.
        background = np.percentile(sal if node is change else both, 60)
        assert sal.dtype == np.float32 and np.isfinite(sal).all() and sal.min() >= 0 and sal.max() > 0
        display = node.GetDisplayNode()
        assert display.GetColorNode().GetName() == SALIENCY_COLOR_NODE_NAME
        # Background (values at or below the window's bottom) hidden: the display module's rule.
        assert display.GetApplyThreshold() and display.GetLowerThreshold() > display.GetWindowLevelMin()
        assert display.GetLowerThreshold() == pytest.approx(background, rel=1e-5, abs=1e-12)
        assert not display.GetAutoWindowLevel()
    # The change map is |GB(out) - GB(in)| of the signed maps: at most |GB(in)| + |GB(out)|.
    s_in, s_out, d = (slicer.util.arrayFromVolume(n) for n in (sIn, sOut, change))
    assert (d <= s_in + s_out + 1e-5).all() and (d >= np.abs(s_out - s_in) - 1e-5).all()
    # One display range for both maps, so equal colours mean equal saliency.
    assert sIn.GetDisplayNode().GetWindowLevelMax() == pytest.approx(sOut.GetDisplayNode().GetWindowLevelMax())
    assert -1.0 <= res["fpScore"] <= 1.0
    assert out.GetAttribute("FPDenoise.SourceVolumeID") == ct.GetID()


def test_denoise_without_saliency_and_bad_input(logic, ct, checkpoint):
    res = logic.denoise(ct, checkpoint, device="cpu", computeSaliency=False)
    assert res["inputSaliencyNode"] is None and res["fpScore"] is None
    label = slicer.util.addVolumeFromArray(np.zeros((2, 8, 8), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="label map|scalar volume"):
        logic.denoise(label, checkpoint, device="cpu")


def test_geometry_matches_simpleitk_lps(logic, ct, tmp_path):
    """The RAS<->LPS conversion agrees with an independent reader: voxel (i,j,k) lands on the same point."""
    path = logic.saveVolume(ct, tmp_path / "ct.nrrd")
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(img.GetSpacing(), SPACING, atol=1e-9)
    m = _ijk_to_ras()
    for ijk in [(0, 0, 0), (47, 0, 2), (5, 39, 1)]:
        ras = m @ np.array([*ijk, 1.0])
        lps = img.TransformIndexToPhysicalPoint([int(v) for v in ijk])
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), slicer.util.arrayFromVolume(ct))
    # And back: a file read by the library becomes a node with the original IJK-to-RAS.
    back = logic.loadImageAsVolume(path)
    np.testing.assert_allclose(_matrix(back), m, atol=1e-6)


# ----------------------------------------------------------------------------- display
def test_side_by_side_layout_overlays_and_opacity(logic, ct, checkpoint):
    res = logic.denoise(ct, checkpoint, device="cpu")
    views = logic.showSideBySide(ct, res["inputSaliencyNode"], res["outputVolumeNode"], res["outputSaliencyNode"], 0.4)

    layout = logic.layoutNode()
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    assert layout.IsLayoutDescription(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    red, yellow = logic.sliceCompositeNode("Red"), logic.sliceCompositeNode("Yellow")
    assert views == {"Red": red, "Yellow": yellow}
    assert red.GetBackgroundVolumeID() == ct.GetID()
    assert red.GetForegroundVolumeID() == res["inputSaliencyNode"].GetID()
    assert yellow.GetBackgroundVolumeID() == res["outputVolumeNode"].GetID()
    assert yellow.GetForegroundVolumeID() == res["outputSaliencyNode"].GetID()
    for comp in (red, yellow):
        assert comp.GetForegroundOpacity() == pytest.approx(0.4)
        assert comp.GetLinkedControl()
    # Both views show the same plane, aligned to the oblique volume.
    r = slicer.util.arrayFromVTKMatrix(logic.sliceNode("Red").GetSliceToRAS())
    y = slicer.util.arrayFromVTKMatrix(logic.sliceNode("Yellow").GetSliceToRAS())
    np.testing.assert_allclose(r, y)
    assert not np.allclose(r[:3, :3], np.eye(3))  # rotated to the volume plane

    logic.setOverlayOpacity(0.8)
    assert red.GetForegroundOpacity() == pytest.approx(0.8) == yellow.GetForegroundOpacity()
    # Calling again reuses the scene's nodes instead of adding duplicates.
    n = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    logic.showSideBySide(ct, res["inputSaliencyNode"], res["outputVolumeNode"], res["outputSaliencyNode"])
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == n == 2


def _display_of(node):
    d = node.GetDisplayNode()
    return d.GetWindowLevelMin(), d.GetWindowLevelMax(), d.GetLowerThreshold(), d.GetApplyThreshold()


def test_rewindow_overlays_follows_the_display_rule(logic, ct):
    from FPDenoiseLib.display import BACKGROUND_PERCENTILE, saliency_window

    rng = np.random.default_rng(3)
    shape = (3, 40, 48)
    # Heavy-tailed maps as |GB| is; the output's is weaker, the change smaller still (own window).
    salIn = rng.exponential(1.0, shape).astype(np.float32) ** 3
    salOut = (0.5 * rng.exponential(1.0, shape) ** 3).astype(np.float32)
    change = np.abs(salIn - salOut) * np.float32(0.1)
    nodes = [
        slicer.util.addVolumeFromArray(a, ijkToRAS=_ijk_to_ras(), name=n)
        for a, n in ((salIn, "sal in"), (salOut, "sal out"), (change, "change"))
    ]
    sIn, sOut, sChange = nodes
    default = saliency_window(salIn, salOut)
    for node in (sIn, sOut):
        logic.setSaliencyDisplay(node, window=default)
    logic.setSaliencyDisplay(sChange)
    before = [_display_of(n) for n in nodes]

    for pct in (20.0, 90.0, BACKGROUND_PERCENTILE):
        windows = logic.rewindowOverlays(pct, sIn, sOut, sChange)
        shared = saliency_window(salIn, salOut, background_percentile=pct)
        own = saliency_window(change, background_percentile=pct)
        assert windows["saliency"] == shared
        assert windows["featureChange"].lo == pytest.approx(own.lo, rel=1e-5)
        for node, w in ((sIn, shared), (sOut, shared), (sChange, own)):
            lo, hi, threshold, applied = _display_of(node)
            assert (lo, hi) == pytest.approx((w.lo, w.hi), rel=1e-5)
            assert applied and w.lo < threshold <= w.lo * (1 + 1e-6) + 1e-30  # strictly above lo
        # The fraction of voxels drawn is what the percentile says (shared window: over both maps).
        for arrays, node in (((salIn, salOut), sIn), ((change,), sChange)):
            drawn = np.mean(np.concatenate([a.ravel() for a in arrays]) >= _display_of(node)[2])
            assert drawn == pytest.approx(1.0 - pct / 100.0, abs=0.005)
        if pct == 20.0:
            assert _display_of(sIn)[0] < before[0][0]  # a lower threshold really changed the display
    # Back at the default the display is exactly as Apply left it.
    np.testing.assert_allclose([_display_of(n) for n in nodes], before, rtol=1e-6)
    # Missing overlays (Apply without saliency) are skipped.
    assert logic.rewindowOverlays(50.0, None, None, None) == {"saliency": None, "featureChange": None}
    assert "50th percentile" in logic.legendText(50.0)
    assert f"{BACKGROUND_PERCENTILE:g}th percentile" in logic.legendText()


def test_side_by_side_without_saliency_shows_input_and_output(logic, ct):
    out = slicer.util.addVolumeFromArray(_ct_phantom(seed=1), ijkToRAS=_ijk_to_ras(), name="chest CT denoised")
    views = logic.showSideBySide(ct, None, out, None, 0.5)
    layout = logic.layoutNode()
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    red, yellow = views["Red"], views["Yellow"]
    assert red.GetBackgroundVolumeID() == ct.GetID()
    assert yellow.GetBackgroundVolumeID() == out.GetID()
    assert red.GetForegroundVolumeID() is None and yellow.GetForegroundVolumeID() is None
    assert red.GetLinkedControl() and yellow.GetLinkedControl()
    r = slicer.util.arrayFromVTKMatrix(logic.sliceNode("Red").GetSliceToRAS())
    y = slicer.util.arrayFromVTKMatrix(logic.sliceNode("Yellow").GetSliceToRAS())
    np.testing.assert_allclose(r, y)
    assert not np.allclose(r[:3, :3], np.eye(3))  # aligned to the oblique volume
    # Overlays from an earlier run with saliency are cleared, not left on top of the new result.
    sal = slicer.util.addVolumeFromArray(np.ones((3, 40, 48), np.float32), ijkToRAS=_ijk_to_ras(), name="old saliency")
    logic.showSideBySide(ct, sal, out, sal)
    logic.showSideBySide(ct, None, out, None)
    assert red.GetForegroundVolumeID() is None and yellow.GetForegroundVolumeID() is None


def test_inferno_colour_node_bare_scene_and_slicer_inferno(logic):
    from FPDenoiseLib.display import colour_table

    nodeID = logic.saliencyColorNodeID()  # bare scene: one Inferno table node is added, then reused
    node = slicer.mrmlScene.GetNodeByID(nodeID)
    assert node.IsA("vtkMRMLColorTableNode") and node.GetName() == SALIENCY_COLOR_NODE_NAME
    assert logic.saliencyColorNodeID() == nodeID
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 1
    # Graded, not near-flat: 256 entries, luminance rising from black to pale yellow, the library's table.
    assert node.GetNumberOfColors() == 256
    rgb = np.array([node.GetLookupTable().GetTableValue(i)[:3] for i in range(256)])
    np.testing.assert_allclose(rgb, colour_table(), atol=1e-6)
    lum = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert lum[0] < 0.02 and lum[-1] > 0.9 and (np.diff(lum) >= -1e-3).all()
    assert len(np.unique(np.round(rgb * 255), axis=0)) > 150

    # gamma 1 in a scene with Slicer's own "Inferno" node (the application): that node is used.
    slicer_inferno = slicer.vtkMRMLColorTableNode()
    slicer_inferno.SetName("Inferno")
    slicer_inferno.SetTypeToUser()
    slicer.mrmlScene.AddNode(slicer_inferno)
    assert logic.saliencyColorNodeID(gamma=1.0) == slicer_inferno.GetID()
    # In a scene with Slicer's default colour nodes (no Inferno file in slicer-core) a table is added.
    slicer.mrmlScene = slicer.vtkMRMLScene()
    colorLogic = slicer.vtkMRMLColorLogic()
    colorLogic.SetMRMLScene(slicer.mrmlScene)
    gid = logic.saliencyColorNodeID(gamma=1.0)
    g1 = np.array([slicer.mrmlScene.GetNodeByID(gid).GetLookupTable().GetTableValue(i)[:3] for i in range(256)])
    np.testing.assert_allclose(g1, colour_table(1.0), atol=1e-6)


def test_strength_passes_through_logic_and_cli(logic, ct, checkpoint, tmp_path):
    cmd = logic.denoiseCommand(tmp_path / "in.nrrd", tmp_path / "w", strength=0.5)
    assert cmd[cmd.index("--strength") + 1] == "0.5"
    # Strength 0 returns the input exactly: no feature change, and the change overlay hides all of it.
    res = logic.denoise(ct, checkpoint, device="cpu", strength=0.0)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(res["outputVolumeNode"]), slicer.util.arrayFromVolume(ct))
    assert res["outputVolumeNode"].GetAttribute("FPDenoise.Strength") == "0"
    change = slicer.util.arrayFromVolume(res["featureChangeNode"])
    assert change.max() == 0.0
    assert res["featureChangeNode"].GetDisplayNode().GetLowerThreshold() > 0.0
    assert res["fpScore"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="strength"):
        logic.denoise(ct, checkpoint, device="cpu", strength=5.0)
    # The background CLI gets --strength and records it.
    cmd, work = logic.prepareBackgroundDenoise(
        ct, tmp_path / "work", modelPath=checkpoint, device="cpu", strength=0.0, computeSaliency=False
    )
    job = process.BackgroundJob(cmd, env=logic.backgroundEnvironment())
    assert job.wait(timeout=300) == 0, job.error_summary()
    res = logic.loadBackgroundDenoiseResults(ct, work)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(res["outputVolumeNode"]), slicer.util.arrayFromVolume(ct))
    assert res["outputVolumeNode"].GetAttribute("FPDenoise.Strength") == "0"


def test_best_quality_ensemble_passes_through_logic_and_cli(logic, ct, checkpoint, tmp_path):
    """The panel's "Best" quality: 8 flipped/rotated passes averaged, in-process and in the background CLI,
    the same voxels as the library's ``Denoiser(ensemble=8)``, recorded on the output node."""
    from FPDenoiseLib.inference import Denoiser

    plain = logic.denoiseCommand(tmp_path / "in.nrrd", tmp_path / "w")
    assert plain[plain.index("--ensemble") + 1] == "1"
    # an empty model is the shipped default here, named, since the CLI's own default is "auto"
    assert plain[plain.index("--model") + 1] == "default"
    chosen = logic.denoiseCommand(tmp_path / "in.nrrd", tmp_path / "w", modelPath="auto")
    assert chosen[chosen.index("--model") + 1] == "auto"
    cmd = logic.denoiseCommand(tmp_path / "in.nrrd", tmp_path / "w", ensemble=ENSEMBLE_BEST)
    assert cmd[cmd.index("--ensemble") + 1] == "8"
    one = logic.denoise(ct, checkpoint, device="cpu", computeSaliency=False)
    best = logic.denoise(ct, checkpoint, device="cpu", computeSaliency=False, ensemble=ENSEMBLE_BEST)
    got = slicer.util.arrayFromVolume(best["outputVolumeNode"])
    image = logic.imageFromVolume(ct)
    want = Denoiser(checkpoint, device="cpu", ensemble=8).run(image, saliency=False).denoised.array
    np.testing.assert_array_equal(got, want.astype(got.dtype))
    assert not np.array_equal(got, slicer.util.arrayFromVolume(one["outputVolumeNode"]))
    assert best["outputVolumeNode"].GetAttribute("FPDenoise.Ensemble") == "8"
    assert one["outputVolumeNode"].GetAttribute("FPDenoise.Ensemble") == "1"
    with pytest.raises(InputError, match="ensemble"):
        logic.denoise(ct, checkpoint, device="cpu", ensemble=3)
    # the background CLI gets --ensemble 8 and records it: the same voxels
    cmd, work = logic.prepareBackgroundDenoise(
        ct, tmp_path / "work", modelPath=checkpoint, device="cpu", ensemble=ENSEMBLE_BEST, computeSaliency=False
    )
    job = process.BackgroundJob(cmd, env=logic.backgroundEnvironment())
    assert job.wait(timeout=300) == 0, job.error_summary()
    res = logic.loadBackgroundDenoiseResults(ct, work)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(res["outputVolumeNode"]), got)
    assert res["outputVolumeNode"].GetAttribute("FPDenoise.Ensemble") == "8"


# ----------------------------------------------------------------------------- simulate + metrics
def test_simulate_noise_and_metrics(logic, ct):
    clean = slicer.util.arrayFromVolume(ct).copy()
    mild = logic.simulateNoise(ct, "gaussian", 0.2, seed=1)
    strong = logic.simulateNoise(ct, "gaussian", 0.9, seed=1)
    again = logic.simulateNoise(ct, "gaussian", 0.2, seed=1)
    assert mild.GetName() == "chest CT gaussian 0.20"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(mild), slicer.util.arrayFromVolume(again))
    np.testing.assert_allclose(_matrix(mild), _ijk_to_ras(), atol=1e-9)
    assert slicer.util.arrayFromVolume(mild).dtype == np.int16
    assert not np.array_equal(slicer.util.arrayFromVolume(mild), clean)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), clean)
    assert logic.groundTruthFor(mild) is ct

    m_mild, m_strong = logic.computeMetrics(ct, mild), logic.computeMetrics(ct, strong)
    assert 10 < m_strong["psnr"] < m_mild["psnr"] < 80
    assert m_strong["ssim"] < m_mild["ssim"] < 1.0
    with pytest.raises(InputError, match="unknown"):
        logic.simulateNoise(ct, "not-a-noise", 0.5)

    # Every one of the 14 noise types runs through the Logic on an oblique CT volume.
    from FPDenoiseLib.noise import NOISE_NAMES

    for name in NOISE_NAMES:
        node = logic.simulateNoise(ct, name, 0.5, seed=0)
        assert slicer.util.arrayFromVolume(node).shape == clean.shape, name


def test_check_device_messages(logic, ct):
    ok, msg = logic.checkDevice("cpu", ct)
    assert ok and "CPU" in msg
    import torch

    if not torch.cuda.is_available():
        ok, msg = logic.checkDevice("cuda", ct)
        assert not ok and "CUDA" in msg and "cpu" in msg


# ----------------------------------------------------------------------------- batch
def _write_nrrd(path: Path, arr: np.ndarray, spacing, origin, direction) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def test_batch_example_on_a_folder(tmp_path, checkpoint):

    slicer.mrmlScene = slicer.vtkMRMLScene()
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "sub").mkdir(parents=True)
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    _write_nrrd(inp / "a.nrrd", _ct_phantom(1), (0.6, 0.9, 3.0), (10.0, -20.0, 5.0), oblique)
    _write_nrrd(inp / "sub" / "b.nrrd", _ct_phantom(2, (2, 36, 44)), (1.0, 1.0, 1.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))

    from script_helpers import load_script

    example = load_script("examples/batch_denoise_slicer.py")
    assert example.main([str(inp), str(out), "--model", str(checkpoint), "--device", "cpu"]) == 0

    # The library's batch driver names the outputs (same as `fpdenoise denoise IN OUT`): one per input,
    # the maps in OUT/saliency.
    assert sorted(p.name for p in out.iterdir()) == ["a.nrrd", "saliency", "sub_b.nrrd"]
    roles = ("_saliency_input.nrrd", "_saliency_denoised.nrrd", "_feature_change.nrrd")
    assert sorted(p.name for p in (out / "saliency").iterdir()) == sorted(f"{n}{r}" for n in ("a", "sub_b") for r in roles)
    for src, base in ((inp / "a.nrrd", "a"), (inp / "sub" / "b.nrrd", "sub_b")):
        ref = sitk.ReadImage(str(src))
        for path in (out / f"{base}.nrrd", out / "saliency" / f"{base}_saliency_input.nrrd",
                     out / "saliency" / f"{base}_feature_change.nrrd"):
            got = sitk.ReadImage(str(path))
            np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-9)
            np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-9)
            np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-9)
            assert got.GetSize() == ref.GetSize()
        den = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{base}.nrrd")))
        assert den.dtype == np.int16 and abs(float(den.min()) + 1000) < 200
    # No MRML round trip: no volume node was made.
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    # One path: the CLI's batch mode writes the same files with the same voxels.
    from FPDenoiseLib.cli import main as cli_main

    cli_out = tmp_path / "cli"
    assert cli_main(["denoise", str(inp), str(cli_out), "--model", str(checkpoint), "--device", "cpu",
                     "--saliency-dir", str(cli_out / "saliency")]) == 0
    for path in [*out.glob("*.nrrd"), *(out / "saliency").iterdir()]:
        mine = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(cli_out / path.relative_to(out))))
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    # Resume: a second run skips what is there.
    summary = FPDenoiseMRMLLogic().batchDenoiseFolder(inp, out, checkpoint, device="cpu", log_=None)
    assert (len(summary.done), len(summary.skipped), len(summary.failed)) == (0, 2, 0)
    # Bad input: one-line error, exit code 2.
    assert example.main([str(tmp_path / "missing"), str(out)]) == 2


# ----------------------------------------------------------------------------- background processes
def test_progress_line_parser():
    p = process.parse_progress_line("PROGRESS 3 10 stage 2: step 3")
    assert (p.done, p.total, p.message, p.fraction) == (3, 10, "stage 2: step 3", 0.3)
    assert process.parse_progress_line("PROGRESS 0 0").fraction == 0.0
    tq = "denoise:  45%|####5     | 45/100 [00:01<00:02, 30.0it/s]"
    assert process.parse_progress_line(tq) == process.ProgressLine(45, 100, "denoise")
    # several carriage-return separated tqdm refreshes in one chunk: the last one wins
    assert process.parse_progress_line(" 10%|#   | 1/10 [00:00<?]\r 20%|##  | 2/10 [00:00<00:01]").done == 2
    for junk in ("", "loading checkpoint", "PROGRESS x y", "error: 100%|broken"):
        assert process.parse_progress_line(junk) is None


def test_background_denoise_cli_matches_in_process(logic, ct, checkpoint, tmp_path):
    cmd, work = logic.prepareBackgroundDenoise(ct, tmp_path / "work", modelPath=checkpoint, device="cpu")
    # The background job is the library's own CLI (as SlicerTotalSegmentator runs its CLI), no worker.
    assert cmd[1:4] == ["-m", "FPDenoiseLib.cli", "denoise"] and "--progress-lines" in cmd
    from FPDenoiseLib.cli import build_parser

    args = build_parser().parse_args(cmd[3:])
    assert args.saliency_dir == str(work) and args.progress_lines and args.summary_json
    import torch

    # Same thread count as this process (conftest): another count sums convolutions in another order,
    # and a 1-ulp difference can flip the int16 rounding of a voxel, which exact equality would report.
    env = {**logic.backgroundEnvironment(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    job = process.BackgroundJob(cmd, env=env)
    assert job.wait(timeout=300) == 0, job.error_summary()
    assert job.progress is not None and job.progress.fraction == 1.0
    assert any(line.startswith("PROGRESS ") for line in job.lines)
    assert (work / "denoised_feature_change.nrrd").is_file() and (work / "summary.json").is_file()
    res = logic.loadBackgroundDenoiseResults(ct, work)
    ref = logic.denoise(ct, checkpoint, device="cpu")
    np.testing.assert_array_equal(
        slicer.util.arrayFromVolume(res["outputVolumeNode"]), slicer.util.arrayFromVolume(ref["outputVolumeNode"])
    )
    np.testing.assert_allclose(_matrix(res["outputVolumeNode"]), _ijk_to_ras(), atol=1e-9)
    assert res["fpScore"] == pytest.approx(ref["fpScore"], abs=1e-5)
    assert res["inputSaliencyNode"].GetDisplayNode().GetApplyThreshold()
    np.testing.assert_allclose(
        slicer.util.arrayFromVolume(res["featureChangeNode"]), slicer.util.arrayFromVolume(ref["featureChangeNode"]),
        rtol=1e-4, atol=1e-6,
    )

    # A bad model path: the CLI fails with a one-line error that the widget shows.
    bad = process.BackgroundJob(
        logic.denoiseCommand(work / "input.nrrd", tmp_path / "w2", modelPath=tmp_path / "nope.pt"),
        env=logic.backgroundEnvironment(),
    )
    assert bad.wait(timeout=120) == 2
    assert "nope.pt" in bad.error_summary() and "not found" in bad.error_summary()


def test_training_command_runs_in_background(logic, ct, tmp_path, checkpoint):
    data = logic.exportVolumesForTraining([ct], tmp_path / "data")
    assert len(data) == 1 and data[0].suffix == ".nrrd"
    out = tmp_path / "finetuned.pt"
    cmd = logic.trainingCommand(tmp_path / "data", out, stage="denoiser", noises=["gaussian", "rician"], steps=2,
                                device="cpu", initModelPath=checkpoint)
    # The command parses with the real CLI (flags exist), and trains a loadable checkpoint.
    from FPDenoiseLib.cli import build_parser

    args = build_parser().parse_args(cmd[3:])
    assert args.stage == "denoiser" and args.noise == ["gaussian", "rician"] and args.steps == 2 and args.progress_lines
    small = ["--batch-size", "2", "--patch-size", "32", "--bank-size", "8", "--val-every", "1000"]
    job = process.BackgroundJob(cmd + small, env=logic.backgroundEnvironment())
    assert job.wait(timeout=300) == 0, job.error_summary()
    assert job.progress is not None and job.progress.total > 0
    assert out.is_file()
    res = logic.denoise(ct, out, device="cpu", computeSaliency=False)  # the result is selectable as a model
    assert slicer.util.arrayFromVolume(res["outputVolumeNode"]).shape == (3, 40, 48)
    with pytest.raises(ValueError):
        logic.trainingCommand(tmp_path, out, stage="everything")
    # the module passes its model field, which may hold a model's name: the command gets the file
    from FPDenoiseLib.inference import resolve_model

    for name, want in (("ct_texture", resolve_model("ct_texture")), ("auto", logic.defaultModelPath()),
                       (None, logic.defaultModelPath())):
        cmd = logic.trainingCommand(tmp_path, out, initModelPath=name)
        assert cmd[cmd.index("--init") + 1] == str(want) and Path(want).is_file(), (name, cmd)


def test_cancel_kills_the_whole_process_tree(tmp_path):
    # A parent that starts a child, reports progress, then sleeps: like training with data workers.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('CHILD', child.pid, flush=True)\n"
        "print('PROGRESS 1 100 step 1', flush=True)\n"
        "time.sleep(120)\n"
    )
    job = process.BackgroundJob([sys.executable, "-c", script])
    child = None
    deadline = time.monotonic() + 30
    while child is None and time.monotonic() < deadline:
        job.poll()
        child = next((int(ln.split()[1]) for ln in job.lines if ln.startswith("CHILD")), None)
        time.sleep(0.05)
    assert child is not None
    while job.progress is None and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.progress.done == 1
    t0 = time.monotonic()
    job.cancel()
    assert job.wait(timeout=20) != 0 and job.cancelled
    assert time.monotonic() - t0 < 15

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie (killed, not yet reaped by its dead parent) counts as gone
        try:
            return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0
        except OSError:
            return True

    for _ in range(100):
        if gone(child):
            break
        time.sleep(0.05)
    assert gone(child), "child process survived Cancel"


def test_kill_without_psutil_uses_ps_walk(monkeypatch):
    """The fallback path (no psutil in Slicer's Python) also ends grandchildren."""
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    proc = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"]
    )
    deadline = time.monotonic() + 20
    kids: list[int] = []
    while not kids and time.monotonic() < deadline:
        kids = process._descendants_posix(proc.pid)
        time.sleep(0.05)
    assert kids
    process.kill_process_tree(proc.pid, timeout=5)
    assert proc.wait(timeout=10) != 0
    for pid in kids:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"grandchild {pid} survived")


def test_errors_are_one_line(logic, ct, tmp_path):
    with pytest.raises(FPDenoiseError) as err:
        logic.denoise(ct, tmp_path / "missing.pt", device="cpu")
    assert "missing.pt" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- Apply reuses nodes, subject hierarchy
def test_each_apply_reuses_the_result_nodes_under_the_input_study(logic, ct, checkpoint):
    scene = slicer.mrmlScene
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient A")
    study = sh.CreateStudyItem(patient, "CT chest 2024")
    sh.CreateItem(study, ct)  # as the DICOM module loads it: the volume under its study
    keys = ("outputVolumeNode", "inputSaliencyNode", "outputSaliencyNode", "featureChangeNode")

    first = logic.denoise(ct, checkpoint, device="cpu")
    ids = {k: first[k].GetID() for k in keys}
    count = scene.GetNumberOfNodes()
    den1 = slicer.util.arrayFromVolume(first["outputVolumeNode"]).copy()
    second = logic.denoise(ct, checkpoint, device="cpu", strength=0.3, **{k: first[k] for k in keys})
    assert {k: second[k].GetID() for k in keys} == ids  # same nodes...
    assert scene.GetNumberOfNodes() == count  # ...and no new ones
    assert not np.array_equal(slicer.util.arrayFromVolume(second["outputVolumeNode"]), den1)  # new content
    assert second["outputVolumeNode"].GetAttribute("FPDenoise.Strength") == "0.3"
    for k in keys:
        assert sh.GetItemParent(sh.GetItemByDataNode(second[k])) == study, k

    # Another input must not overwrite this input's results, nor may the input itself be overwritten.
    other = slicer.util.addVolumeFromArray(_ct_phantom(5), ijkToRAS=_ijk_to_ras(), name="other CT")
    before = slicer.util.arrayFromVolume(second["outputVolumeNode"]).copy()
    third = logic.denoise(other, checkpoint, device="cpu", computeSaliency=False,
                          outputVolumeNode=second["outputVolumeNode"])
    assert third["outputVolumeNode"].GetID() not in ids.values()
    assert third["outputVolumeNode"].GetName() == "other CT denoised"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(second["outputVolumeNode"]), before)
    own = slicer.util.arrayFromVolume(ct).copy()
    fourth = logic.denoise(ct, checkpoint, device="cpu", computeSaliency=False, outputVolumeNode=ct)
    assert fourth["outputVolumeNode"].GetID() != ct.GetID()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), own)
    # An input outside any study: results stay where Slicer puts new nodes (no parent forced).
    assert sh.GetItemByDataNode(third["outputVolumeNode"]) == 0


# ----------------------------------------------------------------------------- panel state, devices
def test_apply_and_train_are_off_during_a_foreground_run(logic):
    idle = logic.actionStates("", hasInput=True, hasReference=True, hasOutput=True)
    assert all(enabled for enabled, _ in idle.values())
    assert idle["apply"] == (True, "Apply") and idle["train"] == (True, "Train")
    fg = logic.actionStates("foreground", hasInput=True, hasReference=True, hasOutput=True)
    assert not any(enabled for enabled, _ in fg.values())  # no second Apply, no Train meanwhile
    bg = logic.actionStates("denoise", hasInput=True, hasReference=True, hasOutput=True)
    assert bg["apply"] == (True, "Cancel") and bg["train"][0] is False and bg["simulate"][0] is False
    tr = logic.actionStates("train", hasInput=True)
    assert tr["train"] == (True, "Cancel training") and tr["apply"][0] is False
    assert logic.actionStates("", hasInput=False)["apply"][0] is False


def test_device_choices_and_gpu_note(logic, ct):
    from FPDenoiseSlicerLib.logic import DEVICE_CHOICES

    assert DEVICE_CHOICES == ("auto", "cpu", "cuda", "mps")
    assert "Choice(list(DEVICE_CHOICES))" in (REPO / "FPDenoise" / "FPDenoise.py").read_text()
    no_gpu = logic.deviceAdvice("cpu", False)
    assert no_gpu.startswith("No CUDA GPU found") and "minutes" in no_gpu and "mps" not in no_gpu
    assert "mps" in logic.deviceAdvice("cpu", False, mpsAvailable=True)
    assert "GPU" in logic.deviceAdvice("cpu", True, gpuName="RTX") and "No CUDA" not in logic.deviceAdvice("cpu", True)
    small = logic.deviceAdvice("cuda", True, gpuName="tiny", gpuMemoryGB=2.0, sliceShape=(1024, 1024))
    assert "tiny" in small and "may need" in small
    assert "may need" not in logic.deviceAdvice("cuda", True, gpuName="big", gpuMemoryGB=80.0, sliceShape=(512, 512))
    import torch

    ok, msg = logic.checkDevice("auto", ct)  # this machine, real torch
    assert ok and (("No CUDA GPU found" in msg) != torch.cuda.is_available())


# ----------------------------------------------------------------------------- dependencies
def test_requirements_checked_by_installed_distribution_version():
    import importlib.metadata

    from FPDenoiseSlicerLib import dependencies as deps

    status = {s.name: s for s in deps.checkRequirements()}
    assert all(s.ok for s in status.values()), [s.problem for s in status.values() if not s.ok]
    # Distribution names, not import names: scikit-image (import skimage), PyWavelets (pywt), pillow (PIL).
    assert status["scikit-image"].installed == importlib.metadata.version("scikit-image")
    assert status["PyWavelets"].installed and status["pillow"].installed
    # Too old is unmet even though it imports; a missing one says so.
    (too_new,) = deps.checkRequirements(["numpy>=999"])
    assert not too_new.ok and too_new.installed == importlib.metadata.version("numpy")
    assert too_new.problem == f"numpy: {too_new.installed} installed, needs numpy>=999"
    (absent,) = deps.checkRequirements(["fpdenoise-no-such-package>=1"])
    assert absent.installed is None and "not installed" in absent.problem
    # pyproject's markers: pydicom>=2.4 on Slicer 5.6/5.8's Python 3.9, pydicom>=3 from 3.10 on.
    (py39,) = [s for s in deps.checkRequirements(environment={"python_version": "3.9"}) if s.name == "pydicom"]
    (py311,) = [s for s in deps.checkRequirements(environment={"python_version": "3.11"}) if s.name == "pydicom"]
    assert (py39.requirement, py311.requirement) == ("pydicom>=2.4", "pydicom>=3.0")
    assert not deps.RequirementStatus("pydicom>=3.0", "pydicom", "2.4.4").ok  # what Slicer 5.8 bundles


def test_requirements_match_pyproject():
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli")
    from FPDenoiseSlicerLib.dependencies import REQUIREMENTS

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert list(REQUIREMENTS) == project["dependencies"]


def test_install_asks_first_and_torch_goes_through_the_pytorch_extension(logic):
    from FPDenoiseSlicerLib import dependencies as deps

    def never(text):
        raise AssertionError("asked although nothing is missing")

    assert logic.setupPythonRequirements(never) == []  # this venv has everything: no question
    asked, installed = [], []
    unmet = deps.unmetRequirements(["numpy>=999", "scipy>=1.0"])
    assert [s.name for s in unmet] == ["numpy"]
    assert deps.installRequirements(unmet, confirm=lambda t: asked.append(t) or False, pipInstall=installed.append) is False
    assert installed == [] and "numpy: " in asked[0] and "needs numpy>=999" in asked[0]  # declined: nothing done
    assert deps.installRequirements(unmet, confirm=lambda t: True, pipInstall=installed.append) is True
    assert installed == [["numpy>=999"]]  # pip gets the requirement with its version
    # torch is never pip-installed: without the PyTorch extension (as here) a clear error, before any question.
    torch_unmet = deps.unmetRequirements(["torch>=999"])
    with pytest.raises(RuntimeError, match="PyTorch extension"):
        deps.installRequirements(torch_unmet, confirm=never, pipInstall=installed.append)
    assert installed == [["numpy>=999"]]


def test_shipped_models_by_name(logic):
    """The module's model field takes a shipped model's name; the Logic loads it and says which it is."""
    from FPDenoiseLib.inference import resolve_model

    assert logic.modelDescription("") == logic.modelDescription(None) == "shipped default model (all noise types)"
    assert "CT only" in logic.modelDescription("ct_texture")
    assert logic.modelDescription("/tmp/m.pt") == "/tmp/m.pt"
    den = logic.getDenoiser("ct_texture", "cpu")
    assert den.checkpoint_path == resolve_model("ct_texture") and den.restoration is not None


def test_denoise_result_carries_the_ct_model_hint(logic):
    """A CT volume with a scanner's kernel-correlated noise through the default: the result's modelHint names
    the CT model (the module shows it in its log); through the CT model itself: no hint."""
    from io_helpers import noisy_ct_phantom

    hu = noisy_ct_phantom(64)  # a scanner's kernel-correlated noise, which the default keeps
    node = slicer.util.addVolumeFromArray(np.rint(np.stack([hu] * 3)).astype(np.int16), name="noisy CT")
    node.SetAttribute("FPDenoise.Modality", "CT")
    res = logic.denoise(node, None, device="cpu", computeSaliency=False, modality="CT")
    assert res["modelHint"] and "ct_texture" in res["modelHint"]
    ct = logic.denoise(node, "ct_texture", device="cpu", computeSaliency=False, modality="CT")
    assert ct["modelHint"] is None


def test_automatic_model_choice_on_a_real_scene(logic):
    """modelPath "auto": a CT with a scanner's correlated noise is denoised by the CT model (same voxels as
    choosing it, the note and the output node name it), a real CT slice with white Gaussian noise by the
    white-noise CT model, the phantom with white noise in the body only by the default, with no note."""
    from io_helpers import noisy_ct_phantom, real_ct_with_white_noise

    gauss = real_ct_with_white_noise(0.02, seed=1)
    assert "automatic" in logic.modelDescription("auto")
    for name, hu, model in (("corr", noisy_ct_phantom(64, seed=1), "ct_texture"),
                            ("white", noisy_ct_phantom(64, correlated=False, seed=1), "default"),
                            ("gauss", gauss, "gaussian_ct")):
        node = slicer.util.addVolumeFromArray(np.rint(np.stack([hu] * 3)).astype(np.int16), name=name)
        res = logic.denoise(node, "auto", device="cpu", computeSaliency=False, modality="CT")
        want = logic.denoise(node, model, device="cpu", computeSaliency=False, modality="CT")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(res["outputVolumeNode"]),
                                      slicer.util.arrayFromVolume(want["outputVolumeNode"]))
        assert res["modelName"] == want["modelName"]
        assert res["outputVolumeNode"].GetAttribute("FPDenoise.Model") == want["modelName"]
        if model == "ct_texture":
            assert res["modelHint"].startswith("auto: the CT scanner-noise model"), res["modelHint"]
        elif model == "gaussian_ct":
            assert res["modelHint"].startswith("auto: the white-noise CT model"), res["modelHint"]
        else:
            assert res["modelHint"] is None


def test_panel_builds_before_torch_is_installed():
    """What the widget's setup() asks of the Logic (legend, model description, button states, the parameter
    node's default) works without torch: on a fresh Slicer torch is installed only on the first Apply, with
    consent, so building the panel must not import it (FPDenoiseLib.inference does)."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # import torch -> ImportError, as in a Slicer without PyTorch\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'FPDenoise')!r}]\n"
        "import slicer\n"
        "slicer.mrmlScene = slicer.vtkMRMLScene()\n"
        "from FPDenoiseSlicerLib.logic import FPDenoiseMRMLLogic\n"
        "from FPDenoiseLib.display import BACKGROUND_PERCENTILE\n"
        "logic = FPDenoiseMRMLLogic()\n"
        "assert 'percentile' in logic.legendText(BACKGROUND_PERCENTILE)\n"
        "assert logic.modelDescription('auto').startswith('automatic')\n"
        "assert logic.modelDescription('') == 'shipped default model (all noise types)'\n"
        "assert logic.modelDescription('/x/m.pt') == '/x/m.pt'\n"
        "assert logic.actionStates('', hasInput=True)['apply'] == (True, 'Apply')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
