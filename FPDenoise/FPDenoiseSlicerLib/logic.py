"""Qt-free Logic of the FPDenoise Slicer module: MRML nodes in, MRML nodes out.

Everything here uses only APIs present both in 3D Slicer and in the ``slicer-core`` PyPI package
(MRML + ``slicer.util`` without Qt), so the same class drives the Slicer module, the batch script
(``Slicer --no-main-window --python-script``), the headless tests on a bare ``vtkMRMLScene`` and the
browser viewer. The math lives in :mod:`FPDenoiseLib`; this file only moves arrays and geometry
between MRML nodes and the library and configures how results are displayed.

Geometry: ``slicer.util.arrayFromVolume`` is ``(k, j, i) = (z, y, x)``, the library's order. Slicer
works in RAS, the library (ITK) in LPS; the conversion flips the first two axes.

Example (plain Python with ``pip install slicer-core``)::

    import slicer
    slicer.mrmlScene = slicer.vtkMRMLScene()
    from FPDenoiseSlicerLib.logic import FPDenoiseMRMLLogic
    logic = FPDenoiseMRMLLogic()
    ct = logic.loadImageAsVolume("chest.nrrd")
    result = logic.denoise(ct, strength=1.0)         # dict of nodes + feature-preservation score
    logic.showSideBySide(ct, result["inputSaliencyNode"], result["outputVolumeNode"],
                         result["featureChangeNode"], opacity=0.5)   # or result["outputSaliencyNode"]
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import slicer

from .views import (  # noqa: F401  (re-exported: the viewer and tests import them from here)
    LEFT_VIEW,
    RIGHT_VIEW,
    SALIENCY_COLOR_NODE_NAME,
    SLICER_INFERNO_NODE_ID,
    SliceDisplayMixin,
)

log = logging.getLogger("FPDenoise")

ProgressCallback = Callable[[int, int], None]

# Devices the module offers (FPDenoiseLib.device.pick_device: auto = CUDA > MPS > CPU).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
#: the panel's "Best" quality: the test-time ensemble over all 8 flips and rotations (``--ensemble 8``)
ENSEMBLE_BEST = 8
# What the background denoise (the library CLI) writes last into its work folder, and the batch's map folder.
BACKGROUND_SUMMARY = "summary.json"
BATCH_SALIENCY_FOLDER = "saliency"
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


def ensureLibraryImportable() -> None:
    """Make ``import FPDenoiseLib`` work when the module runs from a source checkout.

    In a built extension the library is copied next to the module script; in a checkout (module path
    ``<repo>/FPDenoise``) it lives in ``<repo>/FPDenoiseLib``.
    """
    if importlib.util.find_spec("FPDenoiseLib") is not None:
        return
    repo = Path(__file__).resolve().parents[2]
    if (repo / "FPDenoiseLib" / "__init__.py").is_file():
        sys.path.insert(0, str(repo))


def missingDependencies() -> list:
    """Library requirements that are missing or too old (by installed version, see :mod:`.dependencies`)."""
    from .dependencies import unmetRequirements

    return unmetRequirements()


class FPDenoiseMRMLLogic(SliceDisplayMixin):
    """Denoising, saliency overlays, noise simulation, metrics and training commands on MRML nodes.

    Works on ``slicer.mrmlScene`` at call time (so it follows a scene replaced by the caller). No Qt.
    """

    def __init__(self) -> None:
        ensureLibraryImportable()
        self._denoisers: dict[tuple[str, str], object] = {}

    # ------------------------------------------------------------------ geometry / conversion
    @staticmethod
    def _scene():
        return slicer.mrmlScene

    @staticmethod
    def ijkToRasFromGeometry(spacing, origin, direction) -> np.ndarray:
        """4x4 IJK-to-RAS matrix from ITK/LPS ``spacing`` (x,y,z), ``origin`` and row-major ``direction``."""
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        m = np.eye(4)
        m[:3, :3] = _LPS_RAS @ d @ np.diag(np.asarray(spacing, dtype=float))
        m[:3, 3] = _LPS_RAS @ np.asarray(origin, dtype=float)
        return m

    @staticmethod
    def geometryFromVolume(volumeNode) -> tuple[tuple, tuple, tuple]:
        """``(spacing, origin, direction)`` of a volume node in ITK/LPS convention (see ARCHITECTURE.md)."""
        import vtk

        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(m)
        ras_dir = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
        lps_dir = _LPS_RAS @ ras_dir
        origin = _LPS_RAS @ np.asarray(volumeNode.GetOrigin(), dtype=float)
        return (
            tuple(float(s) for s in volumeNode.GetSpacing()),
            tuple(float(o) for o in origin),
            tuple(float(v) for v in lps_dir.ravel()),
        )

    @staticmethod
    def guessModality(volumeNode, array: np.ndarray | None = None) -> str:
        """Modality for intensity normalisation: a ``DICOM.Modality``/``FPDenoise.Modality`` node attribute
        when present, else the library's guess ("CT" for HU-looking values), "XR" for a single slice,
        "OT" otherwise (percentile normalisation, as for MR)."""
        from FPDenoiseLib.intensity import guess_modality

        for attr in ("FPDenoise.Modality", "DICOM.Modality"):
            value = volumeNode.GetAttribute(attr)
            if value:
                return str(value).upper()
        a = slicer.util.arrayFromVolume(volumeNode) if array is None else array
        mod = guess_modality(a)
        if mod == "OT" and a.shape[0] == 1:
            return "XR"
        return mod

    def imageFromVolume(self, volumeNode, modality: str | None = None):
        """Copy a scalar volume node into an :class:`FPDenoiseLib.io.Image` (LPS geometry, original units)."""
        from FPDenoiseLib.io import Image

        self._checkVolume(volumeNode)
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        spacing, origin, direction = self.geometryFromVolume(volumeNode)
        return Image(
            array=array,
            spacing=spacing,
            origin=origin,
            direction=direction,
            modality=modality or self.guessModality(volumeNode, array),
            is_2d=array.shape[0] == 1,
            source=f"volume node {volumeNode.GetName()!r}",
        )

    def addVolumeFromImage(self, image, name: str):
        """Add a scalar volume node holding ``image`` (array + LPS geometry converted to RAS)."""
        ijkToRas = self.ijkToRasFromGeometry(image.spacing, image.origin, image.direction)
        node = slicer.util.addVolumeFromArray(np.asarray(image.array), ijkToRAS=ijkToRas, name=name)
        if getattr(image, "modality", None):
            node.SetAttribute("FPDenoise.Modality", str(image.modality))
        return node

    def loadImageAsVolume(self, path: str | os.PathLike, name: str | None = None):
        """Read any file / DICOM series folder the library reads and add it as a volume node."""
        from FPDenoiseLib.batch import strip_ext
        from FPDenoiseLib.io import read_image

        image = read_image(path)
        return self.addVolumeFromImage(image, name or strip_ext(Path(path).name))

    def saveVolume(self, volumeNode, path: str | os.PathLike, *, like=None, description: str = "") -> Path:
        """Write a volume node with the library's atomic writer (format from the extension)."""
        from FPDenoiseLib.io import write_image

        return write_image(self.imageFromVolume(volumeNode), path, like=like, description=description)

    def _newVolumeLike(self, referenceNode, array: np.ndarray, name: str, existingNode=None):
        """A volume node with ``array`` and exactly ``referenceNode``'s geometry (spacing, origin, directions)."""
        node = existingNode
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.CopyOrientation(referenceNode)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        parent = referenceNode.GetParentTransformNode()
        node.SetAndObserveTransformNodeID(parent.GetID() if parent else None)
        return node

    @staticmethod
    def _checkVolume(volumeNode) -> None:
        from FPDenoiseLib.errors import InputError

        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError("input: select a scalar volume (CT, X-ray or MR)")
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"{volumeNode.GetName()}: is a label map, not an image")
        if volumeNode.GetImageData() is None:
            raise InputError(f"{volumeNode.GetName()}: volume has no image data")

    # ------------------------------------------------------------------ model / device
    @staticmethod
    def defaultModelPath() -> Path:
        from FPDenoiseLib.inference import default_model_path

        return default_model_path()

    @staticmethod
    def modelDescription(modelPath: str | os.PathLike | None) -> str:
        """What the module shows as the model in use: a shipped model's role, or the checkpoint's path.

        No torch import: the widget calls this while building its panel, before the dependencies are installed
        (``FPDenoiseLib.inference`` imports torch). The role keys are ``inference.MODEL_NAMES`` (a static test
        checks it)."""
        key = str(modelPath or "").strip() or "default"
        roles = {"default": "shipped default model (all noise types)",
                 "mse_twin": "shipped MSE-only twin (ablation)",
                 "ct_texture": "shipped CT scanner-noise model (CT only)",
                 "gaussian_ct": "shipped white-noise CT model (CT only)",
                 "auto": "automatic: the default model, or the CT scanner-noise model for a CT whose correlated "
                         "noise the default keeps, or the white-noise CT model for a CT with white noise"}
        return roles.get(key, key)

    @staticmethod
    def sampleDataPath() -> Path:
        from FPDenoiseLib.inference import sample_data_path

        return sample_data_path()

    def getDenoiser(
        self,
        modelPath: str | os.PathLike | None = None,
        device: str = "auto",
        batchSize: int | None = None,
        strength: float = 1.0,
        ensemble: int = 1,
    ):
        """A cached :class:`FPDenoiseLib.inference.Denoiser` (loading a checkpoint takes a moment).

        ``modelPath``: a checkpoint file or a model's name ("default", "mse_twin", "ct_texture", "auto").
        ``ensemble``: 1, 2, 4 or 8 passes over flips and rotations, averaged (``--ensemble``).
        """
        from FPDenoiseLib.inference import AUTO_MODEL, Denoiser, resolve_model

        path = str(resolve_model(modelPath))
        auto = str(modelPath or "").strip() == AUTO_MODEL
        # the ensemble is fixed at construction (auto's CT model is built with it), so it is part of the key
        key = (path, auto, device, int(ensemble), os.path.getmtime(path) if os.path.exists(path) else 0.0)
        if key not in self._denoisers:
            self._denoisers = {key: Denoiser(AUTO_MODEL if auto else path, device=device, batch_size=batchSize,
                                             ensemble=int(ensemble))}
        denoiser = self._denoisers[key]
        # Strength is applied at run time (map and correction): same loaded networks, validated like the CLI.
        if float(strength) != denoiser.strength:
            from FPDenoiseLib.errors import InputError

            if not (np.isfinite(strength) and 0.0 <= float(strength) <= 3.0):
                raise InputError(f"strength must be in [0, 3] (1 = as trained, 0 = return the input), got {strength}")
            denoiser.strength = float(strength)
        return denoiser

    @staticmethod
    def checkDevice(device: str, volumeNode=None) -> tuple[bool, str]:
        """Check that ``device`` can run, before any long work: ``(usable, message)``.

        The message is :meth:`deviceAdvice` for this machine: the GPU used, or a note that there is no CUDA
        GPU (slow, and how to get one working), or that the GPU memory looks small for the volume's slices.
        """
        import torch

        from FPDenoiseLib.device import pick_device
        from FPDenoiseLib.errors import FPDenoiseError

        try:
            dev = pick_device(device)
        except FPDenoiseError as err:
            return False, str(err)
        cuda = torch.cuda.is_available()
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        name = memory = shape = None
        if cuda:
            props = torch.cuda.get_device_properties(dev if dev.type == "cuda" else 0)
            name, memory = props.name, props.total_memory / 1024**3
        if volumeNode is not None and volumeNode.GetImageData() is not None:
            shape = slicer.util.arrayFromVolume(volumeNode).shape[1:]
        return True, FPDenoiseMRMLLogic.deviceAdvice(dev.type, cuda, mpsAvailable=mps, gpuName=name,
                                                     gpuMemoryGB=memory, sliceShape=shape)

    @staticmethod
    def deviceAdvice(
        resolved: str,
        cudaAvailable: bool,
        *,
        mpsAvailable: bool = False,
        gpuName: str | None = None,
        gpuMemoryGB: float | None = None,
        sliceShape: tuple | None = None,
    ) -> str:
        """What the panel says about the device ``resolved`` ("cuda", "mps", "cpu") on a machine with or
        without a CUDA GPU: like SlicerTotalSegmentator, a clear note when there is no GPU (it will be slow)
        and when the GPU memory looks too small for slices of ``sliceShape`` (rows, columns)."""
        if resolved == "cuda":
            msg = f"Running on GPU {gpuName or 'CUDA'}" + (f" ({gpuMemoryGB:.1f} GB)." if gpuMemoryGB else ".")
            if gpuMemoryGB and sliceShape:
                h, w = sliceShape
                # U-Net activations + guided-backprop graph: ~2 kB per pixel per slice in the batch
                # (order of magnitude for base_channels 16-64); warn before an out-of-memory crash.
                need = h * w * 2048 * 2 / 1024**3
                if need > 0.8 * gpuMemoryGB:
                    msg += f" Slices of {w}x{h} may need ~{need:.1f} GB: if it runs out of memory, use the CPU."
            return msg
        if resolved == "mps":
            return "Running on the Apple GPU (MPS)."
        if cudaAvailable:
            return f"Running on the CPU as chosen; device 'auto' or 'cuda' would use the GPU {gpuName or ''}".rstrip() + "."
        msg = (
            "No CUDA GPU found: running on the CPU, so a whole volume may take minutes (the progress bar shows "
            "how far it is). With an NVIDIA GPU, install its driver and the CUDA build of PyTorch (PyTorch Utils "
            "module), then restart Slicer."
        )
        return msg + (" This Mac has a GPU: choose device 'mps'." if mpsAvailable else "")

    @staticmethod
    def actionStates(running: str = "", *, hasInput: bool = False, hasReference: bool = False,
                     hasOutput: bool = False) -> dict:
        """``{button: (enabled, text or None = unchanged)}`` for the panel's buttons ("apply", "train", "simulate", "metrics",
        "sideBySide") while ``running`` is "" (idle), "denoise" or "train" (a background job: its own button
        becomes Cancel, the other start buttons are off) or "foreground" (an in-process denoise: every
        button is off until it returns, so a second Apply or a Train cannot start meanwhile)."""
        idle = running == ""
        return {
            "apply": (hasInput and running in ("", "denoise"), "Cancel" if running == "denoise" else "Apply"),
            "train": (running in ("", "train"), "Cancel training" if running == "train" else "Train"),
            "simulate": (hasInput and idle, None),
            "metrics": (hasReference and hasOutput and running != "foreground", None),
            "sideBySide": (hasInput and hasOutput and running != "foreground", None),
        }

    def setupPythonRequirements(self, confirm: Callable[[str], bool], pipInstall: Callable | None = None) -> list:
        """Install the library's missing or too old requirements after ``confirm(message)`` agrees (torch via
        the PyTorch extension, the rest with pip; see :mod:`.dependencies`). Returns what is still unmet
        (empty: ready); raises RuntimeError with a clear message when the PyTorch extension is missing."""
        from .dependencies import installRequirements, unmetRequirements

        unmet = unmetRequirements()
        if unmet and installRequirements(unmet, confirm=confirm, pipInstall=pipInstall):
            unmet = unmetRequirements()
        return unmet

    # ------------------------------------------------------------------ denoising
    def denoise(
        self,
        inputVolumeNode,
        modelPath: str | os.PathLike | None = None,
        device: str = "auto",
        computeSaliency: bool = True,
        progress: ProgressCallback | None = None,
        *,
        modality: str | None = None,
        outputVolumeNode=None,
        inputSaliencyNode=None,
        outputSaliencyNode=None,
        featureChangeNode=None,
        batchSize: int | None = None,
        strength: float = 1.0,
        ensemble: int = 1,
    ) -> dict:
        """Denoise a volume node in this process.

        Returns ``dict(outputVolumeNode, inputSaliencyNode, outputSaliencyNode, featureChangeNode,
        fpScore, modelHint, modelName)``; the output has the input's geometry, dtype and units (HU stays HU) and is named
        ``"<input> denoised"``; saliency maps (|Guided Backprop| of the restoration net, float32) are
        ``"<input> saliency"`` and ``"<input> denoised saliency"``, the feature change
        ``|GB(denoised) - GB(input)|`` is ``"<input> feature change"``, all shown with the display rule
        of :mod:`FPDenoiseLib.display`. Existing nodes passed as ``outputVolumeNode``/``...Node`` are
        overwritten instead of adding new ones. ``fpScore`` is the feature-preservation score (Pearson
        correlation of the two maps) or None. ``strength``: 0 = input unchanged, 1 = as trained, up to 3.
        ``ensemble``: passes over flips and rotations averaged (1, 2, 4 or 8; :data:`ENSEMBLE_BEST` is the
        panel's "Best" quality), recorded as the output's ``FPDenoise.Ensemble``.
        ``modelHint``: a one-line note on the model choice (``Denoiser.choose``): a pointer to the CT
        scanner-noise model when another model leaves a CT's correlated noise in place that it would remove,
        or, with ``modelPath="auto"``, that it was used; else None. ``modelName``: the model that denoised it.
        """
        image = self.imageFromVolume(inputVolumeNode, modality)
        # the same choice and note as the CLI (the background path)
        denoiser, note = self.getDenoiser(modelPath, device, batchSize, strength=strength, ensemble=ensemble).choose(
            image.array, modality=image.modality)
        result = denoiser.run(image, saliency=computeSaliency, progress=progress)

        def arr(img):
            return None if img is None else img.array

        nodes = self._addResultNodes(
            inputVolumeNode,
            result.denoised.array,
            arr(result.saliency_input),
            arr(result.saliency_output),
            result.fp_score,
            change=arr(getattr(result, "feature_change", None)),
            outputVolumeNode=outputVolumeNode,
            inputSaliencyNode=inputSaliencyNode,
            outputSaliencyNode=outputSaliencyNode,
            featureChangeNode=featureChangeNode,
            modelName=getattr(denoiser, "name", ""),
            strength=strength,
            ensemble=denoiser.ensemble,
        )
        nodes["modelHint"] = note
        nodes["modelName"] = denoiser.name
        return nodes

    def _addResultNodes(
        self,
        inputVolumeNode,
        denoised: np.ndarray,
        salIn: np.ndarray | None,
        salOut: np.ndarray | None,
        fpScore: float | None,
        *,
        change: np.ndarray | None = None,
        outputVolumeNode=None,
        inputSaliencyNode=None,
        outputSaliencyNode=None,
        featureChangeNode=None,
        modelName: str = "",
        strength: float | None = None,
        ensemble: int | None = None,
    ) -> dict:
        name = inputVolumeNode.GetName()

        def reuse(node):
            return self.reusableResultNode(inputVolumeNode, node)

        out = self._newVolumeLike(inputVolumeNode, denoised, f"{name} denoised", reuse(outputVolumeNode))
        # Same window/level as the input so the two views compare like for like.
        inDisplay, outDisplay = inputVolumeNode.GetDisplayNode(), out.GetDisplayNode()
        if inDisplay is not None and outDisplay is not None:
            outDisplay.SetAutoWindowLevel(False)
            outDisplay.SetWindowLevel(inDisplay.GetWindow(), inDisplay.GetLevel())
        out.SetAttribute("FPDenoise.SourceVolumeID", inputVolumeNode.GetID())
        out.SetAttribute("FPDenoise.Model", str(modelName))
        if strength is not None:
            out.SetAttribute("FPDenoise.Strength", f"{float(strength):g}")
        if ensemble is not None:
            out.SetAttribute("FPDenoise.Ensemble", str(int(ensemble)))
        modality = inputVolumeNode.GetAttribute("FPDenoise.Modality")
        if modality:
            out.SetAttribute("FPDenoise.Modality", modality)
        result = {
            "outputVolumeNode": out,
            "inputSaliencyNode": None,
            "outputSaliencyNode": None,
            "featureChangeNode": None,
            "fpScore": None,
        }
        if salIn is not None and salOut is not None:
            from FPDenoiseLib.display import saliency_window

            sIn = self._newVolumeLike(inputVolumeNode, salIn.astype(np.float32), f"{name} saliency", reuse(inputSaliencyNode))
            sOut = self._newVolumeLike(
                inputVolumeNode, salOut.astype(np.float32), f"{name} denoised saliency", reuse(outputSaliencyNode)
            )
            # One display window for both maps, so equal colour means equal saliency left and right.
            window = saliency_window(salIn, salOut)
            for node in (sIn, sOut):
                self.setSaliencyDisplay(node, window=window)
            result.update(inputSaliencyNode=sIn, outputSaliencyNode=sOut)
            if change is not None:
                # Its own window: changes are smaller than the saliency itself and would read black on it.
                sChange = self._newVolumeLike(
                    inputVolumeNode, change.astype(np.float32), f"{name} feature change", reuse(featureChangeNode)
                )
                self.setSaliencyDisplay(sChange)
                result["featureChangeNode"] = sChange
            if fpScore is not None:
                result["fpScore"] = float(fpScore)
                out.SetAttribute("FPDenoise.FeaturePreservation", f"{float(fpScore):.6f}")
        nodes = [n for k, n in result.items() if k.endswith("Node") and n is not None]
        for node in nodes:
            node.SetAttribute("FPDenoise.SourceVolumeID", inputVolumeNode.GetID())
        self.placeInInputStudy(inputVolumeNode, nodes)
        return result

    def reusableResultNode(self, inputVolumeNode, node):
        """``node`` when Apply may overwrite it with a result of ``inputVolumeNode``, else None (a new node).

        Never the input itself, a node no longer in the scene, or an FPDenoise result of another volume
        (its ``FPDenoise.SourceVolumeID``): choosing patient B as input must not overwrite "A denoised".
        """
        if node is None or inputVolumeNode is None or node.GetID() == inputVolumeNode.GetID():
            return None
        if node.GetScene() is None or self._scene().GetNodeByID(node.GetID()) is not node:
            return None
        source = node.GetAttribute("FPDenoise.SourceVolumeID")
        return None if source and source != inputVolumeNode.GetID() else node

    def placeInInputStudy(self, inputVolumeNode, nodes) -> None:
        """Put ``nodes`` in the subject hierarchy beside the input (under its study), as SlicerTotalSegmentator
        and MONAIAuto3DSeg do; nothing when the input is not under a study or folder (scene level)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self._scene())
        inputItem = shNode.GetItemByDataNode(inputVolumeNode) if shNode is not None else 0
        parent = shNode.GetItemParent(inputItem) if inputItem else 0
        if not parent or parent == shNode.GetSceneItemID():  # not under a study or folder: leave as is
            return
        for node in nodes:
            item = shNode.GetItemByDataNode(node)
            if not item:
                shNode.CreateItem(parent, node)
            elif shNode.GetItemParent(item) != parent:
                shNode.SetItemParent(item, parent)

    # ------------------------------------------------------------------ simulation and metrics
    def simulateNoise(
        self,
        volumeNode,
        noiseName: str,
        level: float = 0.5,
        seed: int | None = 0,
        *,
        modality: str | None = None,
    ):
        """Add one of the 14 noise types (``FPDenoiseLib.noise.NOISE_NAMES``) at ``level`` in [0, 1].

        Noise is applied in the library's normalised range (CT: fixed HU window) and mapped back, so the
        new volume ``"<input> <noise> <level>"`` is in the input's units and dtype; it remembers the
        clean volume (attribute ``FPDenoise.GroundTruthID``) for PSNR/SSIM.
        """
        from FPDenoiseLib.errors import InputError
        from FPDenoiseLib.intensity import in_normalized_units
        from FPDenoiseLib.noise import NOISE_NAMES, add_noise

        if noiseName not in NOISE_NAMES:
            raise InputError(f"noise {noiseName!r}: unknown; choose one of {', '.join(NOISE_NAMES)}")
        image = self.imageFromVolume(volumeNode, modality)
        noisy = in_normalized_units(
            image.array, lambda x: add_noise(x, noiseName, level=float(level), seed=seed), modality=image.modality
        )
        node = self._newVolumeLike(volumeNode, noisy, f"{volumeNode.GetName()} {noiseName} {float(level):.2f}")
        node.SetAttribute("FPDenoise.GroundTruthID", volumeNode.GetID())
        node.SetAttribute("FPDenoise.Modality", image.modality)
        display, srcDisplay = node.GetDisplayNode(), volumeNode.GetDisplayNode()
        if display is not None and srcDisplay is not None:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(srcDisplay.GetWindow(), srcDisplay.GetLevel())
        return node

    def groundTruthFor(self, volumeNode):
        """The clean volume a simulated-noise volume (or its denoised result) was made from, or None."""
        scene = self._scene()
        node = volumeNode
        for _ in range(4):  # denoised -> noisy -> clean
            if node is None:
                return None
            gt = node.GetAttribute("FPDenoise.GroundTruthID")
            if gt:
                return scene.GetNodeByID(gt)
            src = node.GetAttribute("FPDenoise.SourceVolumeID")
            node = scene.GetNodeByID(src) if src else None
        return None

    def computeMetrics(self, referenceNode, testNode, *, modality: str | None = None) -> dict:
        """PSNR (dB) and SSIM of ``testNode`` against the clean ``referenceNode``.

        Both are computed in the library's normalised range of the reference (CT: the fixed HU window
        -1024..3071 -> 0..1; others: the reference's 0.5-99.5 percentiles), with ``data_range=1``.
        """
        from FPDenoiseLib.errors import InputError
        from FPDenoiseLib.intensity import Normalizer
        from FPDenoiseLib.metrics import psnr, ssim

        ref = self.imageFromVolume(referenceNode, modality)
        test = np.asarray(slicer.util.arrayFromVolume(testNode))
        if test.shape != ref.array.shape:
            raise InputError(
                f"{testNode.GetName()}: shape {test.shape} differs from reference {referenceNode.GetName()} "
                f"{ref.array.shape}"
            )
        norm = Normalizer.for_array(ref.array, modality=ref.modality)
        r, t = norm.forward(ref.array), norm.forward(test)
        return {"psnr": psnr(r, t, data_range=1.0), "ssim": ssim(r, t, data_range=1.0)}

    # ------------------------------------------------------------------ background processes
    @staticmethod
    def moduleDir() -> Path:
        """Folder holding ``FPDenoise.py`` and the ``FPDenoiseSlicerLib`` package."""
        return Path(__file__).resolve().parents[1]

    def backgroundEnvironment(self) -> dict[str, str]:
        """Environment additions for the background process: ``PYTHONPATH`` finding both packages."""
        import FPDenoiseLib

        paths = [str(Path(FPDenoiseLib.__file__).resolve().parents[1]), str(self.moduleDir())]
        old = os.environ.get("PYTHONPATH")
        return {"PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])), "PYTHONUNBUFFERED": "1"}

    def exportVolumesForTraining(self, volumeNodes: Sequence, folder: str | os.PathLike) -> list[Path]:
        """Write clean training volumes as NRRD files into ``folder`` (the library's data loader reads it)."""
        from FPDenoiseLib.batch import safe_name

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, node in enumerate(volumeNodes):
            paths.append(self.saveVolume(node, folder / f"{i:03d}_{safe_name(node.GetName(), 'volume')}.nrrd"))
        return paths

    def trainingCommand(
        self,
        dataDir: str | os.PathLike,
        outputPath: str | os.PathLike,
        *,
        stage: str = "denoiser",
        noises: Sequence[str] = ("mix",),
        steps: int = 500,
        device: str = "auto",
        loss: str = "fp",
        initModelPath: str | os.PathLike | None = None,
        resume: bool = False,
        python: str | None = None,
    ) -> list[str]:
        """Argument list of the background training process (``python -m FPDenoiseLib.cli train ...``).

        ``stage`` "both" trains the restoration net then the denoiser; "denoiser" trains only stage 2,
        starting from ``initModelPath`` (a checkpoint or a model's name; default and "auto": the shipped default
        model, whose restoration net is kept).
        """
        from FPDenoiseLib.inference import resolve_model

        from .process import python_executable

        if stage not in ("both", "denoiser", "restoration"):
            raise ValueError(f"stage {stage!r}: use both, denoiser or restoration")
        cmd = [python or python_executable(), "-m", "FPDenoiseLib.cli", "train"]
        cmd += ["--data", str(dataDir), "--out", str(outputPath), "--stage", stage, "--loss", loss]
        cmd += ["--noise", *[str(n) for n in noises]]
        cmd += ["--steps", str(int(steps)), "--device", device, "--progress-lines"]
        if stage == "denoiser":
            cmd += ["--init", str(resolve_model(initModelPath))]  # the module's model field may hold a name
        if resume:
            cmd += ["--resume"]
        return cmd

    def denoiseCommand(
        self,
        inputPath: str | os.PathLike,
        outputDir: str | os.PathLike,
        *,
        modelPath: str | os.PathLike | None = None,
        device: str = "auto",
        computeSaliency: bool = True,
        strength: float = 1.0,
        ensemble: int = 1,
        python: str | None = None,
    ) -> list[str]:
        """Argument list of a background whole-volume denoise: the library's own CLI, as SlicerTotalSegmentator
        runs its CLI, ``python -m FPDenoiseLib.cli denoise IN DIR/denoised.nrrd --saliency-dir DIR
        --saliency-format nrrd --summary-json DIR/summary.json --progress-lines ...``.

        The CLI prints ``PROGRESS`` lines, writes the maps, then the denoised volume, then the summary (last,
        atomically): :meth:`loadBackgroundDenoiseResults` reads it. Errors: one line, exit code 2.
        """
        from .process import python_executable

        out = Path(outputDir)
        cmd = [python or python_executable(), "-m", "FPDenoiseLib.cli", "denoise", str(inputPath), str(out / "denoised.nrrd")]
        if computeSaliency:
            cmd += ["--saliency-dir", str(out), "--saliency-format", "nrrd"]
        cmd += ["--summary-json", str(out / BACKGROUND_SUMMARY), "--device", device, "--strength", f"{float(strength):g}",
                "--ensemble", str(int(ensemble))]
        # always named: empty means the shipped default here, where the CLI's own default is "auto"
        cmd += ["--model", str(modelPath or "").strip() or "default"]
        return cmd + ["--progress-lines"]

    def prepareBackgroundDenoise(self, inputVolumeNode, workDir: str | os.PathLike | None = None, **kwargs) -> tuple[list[str], Path]:
        """Export the input (with its modality) to a temporary NRRD; return ``(command, workDir)``."""
        from FPDenoiseLib.io import write_image

        work = Path(workDir) if workDir else Path(tempfile.mkdtemp(prefix="FPDenoise-"))
        image = self.imageFromVolume(inputVolumeNode, kwargs.pop("modality", None))
        inPath = write_image(image, work / "input.nrrd")
        return self.denoiseCommand(inPath, work, **kwargs), work

    def loadBackgroundDenoiseResults(self, inputVolumeNode, workDir: str | os.PathLike, **nodes) -> dict:
        """Turn the CLI's files in ``workDir`` into result nodes (same return value as :meth:`denoise`)."""
        from FPDenoiseLib.io import read_image

        info = json.loads((Path(workDir) / BACKGROUND_SUMMARY).read_text())
        item = info["items"][0]
        outputs = item["outputs"]

        def load(role: str):
            return read_image(outputs[role]).array if role in outputs else None

        return self._addResultNodes(
            inputVolumeNode,
            load("denoised"),
            load("saliency_input"),
            load("saliency_output"),
            item.get("fp_score"),
            change=load("feature_change"),
            modelName=item.get("model") or info.get("model", ""),  # the item's own ("auto" chooses per item)
            strength=info.get("strength"),
            ensemble=info.get("ensemble"),
            **nodes,
        )

    # ------------------------------------------------------------------ batch
    def batchDenoiseFolder(
        self,
        inputDir: str | os.PathLike,
        outputDir: str | os.PathLike,
        modelPath: str | os.PathLike | None = None,
        *,
        device: str = "auto",
        computeSaliency: bool = True,
        log_: Callable[[str], None] | None = print,
        strength: float = 1.0,
        ensemble: int = 1,
    ):
        """Denoise every DICOM series and volume file under ``inputDir`` into ``outputDir`` with the library's
        batch driver (:mod:`FPDenoiseLib.batch`, the same as ``fpdenoise denoise IN_DIR OUT_DIR``): one output
        per input, named ``<PatientID>_<SeriesNumber>_<uid hash>`` (a derived DICOM series) or
        ``<relative path joined by _>.<ext>``; with saliency the maps go to ``outputDir/saliency``; inputs
        whose output exists are skipped (resume). No MRML nodes are made. Returns the
        :class:`FPDenoiseLib.batch.BatchSummary` (``done``/``skipped``/``failed``, outputs, feature scores).
        """
        from FPDenoiseLib.batch import denoise_batch, discover
        from FPDenoiseLib.errors import InputError

        inputDir, outputDir = Path(inputDir), Path(outputDir)
        if not inputDir.is_dir():
            raise InputError(f"{inputDir}: input folder not found")
        items = discover(inputDir, outputDir)
        if not items:
            raise InputError(f"{inputDir}: no readable images or DICOM series found")
        outputDir.mkdir(parents=True, exist_ok=True)
        quiet = log_ or (lambda text: None)
        return denoise_batch(
            self.getDenoiser(modelPath, device, strength=strength, ensemble=ensemble),
            items,
            outputDir,
            input_root=inputDir,
            saliency_dir=outputDir / BATCH_SALIENCY_FOLDER if computeSaliency else None,
            log=quiet,
            emit=lambda text: None,
        )


