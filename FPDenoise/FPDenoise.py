"""FPDenoise: explainable, feature-preserving denoising of CT, X-ray and MR volumes in 3D Slicer.

Module = ScriptedLoadableModule + Widget (Qt, this file) + Logic (Qt-free, in
``FPDenoiseSlicerLib/logic.py`` so the batch script, the headless tests and the browser viewer reuse
it) + Test (Slicer self-test on the bundled sample). All math is in ``FPDenoiseLib``.
"""

from __future__ import annotations

import os
import unittest
from typing import Annotated

import ctk  # noqa: F401  (ctk widgets in the .ui)
import qt
import slicer
import vtk
from FPDenoiseSlicerLib.jobs import JobManager
from FPDenoiseSlicerLib.logic import (
    DEVICE_CHOICES,
    ENSEMBLE_BEST,
    FPDenoiseMRMLLogic,
    ensureLibraryImportable,
    missingDependencies,
)
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

ensureLibraryImportable()  # FPDenoiseLib from a source checkout; display.py needs numpy only (no torch)
from FPDenoiseLib.display import BACKGROUND_PERCENTILE  # noqa: E402

NOISE_NAMES = (
    "gaussian", "poisson", "speckle", "noncentral_chi", "rician", "salt_pepper", "structured",
    "thermal", "magnetic_field", "chemical_shift", "motion", "wrap_around", "susceptibility", "ct_correlated",
)  # fmt: skip  (same as FPDenoiseLib.noise.NOISE_NAMES; listed here so the GUI builds before torch is installed)
PAPER = (
    "Medical Image Denoising via Explainable AI Feature Preserving Loss "
    "(residual loss + lambda * ||GB_f(D(x~)) - GB_f(x)||^2, GB = Guided Backpropagation)"
)


#
# FPDenoise
#
class FPDenoise(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FPDenoise"
        self.parent.categories = ["Filtering.Denoising"]
        self.parent.dependencies = []
        self.parent.contributors = ["FPDenoise developers"]
        self.parent.helpText = (
            "Explainable, feature-preserving denoising of CT, X-ray and MR images.<br>"
            "<b>Denoise</b>: pick a volume and a model (shipped default or a checkpoint) and press Apply: "
            "a denoised volume with the same geometry and units (HU stays HU) is added, together with the "
            "Guided-Backpropagation saliency of the input and of the result and the <i>feature change</i> "
            "|GB(denoised) - GB(input)| (where denoising changed structure), shown side by side as Inferno "
            "overlays, and the feature score (1.0 = every feature kept). <b>Strength</b>: 0 = input unchanged, "
            "0.5 low, 1 medium (as trained), 2 high. <b>Quality: Best</b> averages 8 flipped and rotated "
            "passes (a little better, about 8x slower).<br>"
            "<b>Simulate noise</b>: add one of 14 noise / artifact types to a clean volume to try the "
            "denoiser against ground truth (PSNR / SSIM).<br>"
            "<b>Train</b>: fine-tune on your loaded clean volumes in a background process (cancellable); "
            "the result is a checkpoint you can select as the model."
        )
        self.parent.acknowledgementText = (
            "Implements the method of the paper <i>" + PAPER + "</i>. Built on PyTorch and 3D Slicer."
        )


#
# Parameter node: the module's state, saved with the scene.
#
@parameterNodeWrapper
class FPDenoiseParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    inputSaliency: vtkMRMLScalarVolumeNode
    outputSaliency: vtkMRMLScalarVolumeNode
    featureChange: vtkMRMLScalarVolumeNode
    referenceVolume: vtkMRMLScalarVolumeNode
    # "auto": the default model, or the CT scanner-noise model for a CT whose correlated noise the default keeps
    # (a radiologist's low-dose CT is denoised without a choice to make), or the white-noise CT model for a CT
    # with white noise of one level; "" = the shipped default model
    modelPath: str = "auto"
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"  # auto = CUDA > MPS > CPU
    computeSaliency: bool = True
    strength: Annotated[float, WithinRange(0.0, 2.0)] = 1.0  # 0 = input unchanged, 1 = as trained
    bestQuality: bool = False  # the 8-pass flip/rotation ensemble (--ensemble 8): about 8x the time
    rightOverlay: Annotated[str, Choice(["feature change", "saliency"])] = "feature change"
    runInBackground: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    # Saliency / feature-change voxels at or below this percentile of their map are not drawn.
    backgroundPercentile: Annotated[float, WithinRange(0.0, 95.0)] = BACKGROUND_PERCENTILE
    noiseName: Annotated[str, Choice(list(NOISE_NAMES))] = "gaussian"
    noiseLevel: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    # Minimum: without a bound the wrapper opens the spin box to -2**31, and the noise models refuse seeds < 0.
    noiseSeed: Annotated[int, Minimum(0)] = 0
    trainStage: Annotated[str, Choice(["denoiser", "both"])] = "denoiser"
    trainSteps: Annotated[int, WithinRange(1, 1000000)] = 500
    trainNoises: str = "mix"  # space-separated noise names, or "mix"
    trainOutputPath: str = ""


#
# Widget
#
class FPDenoiseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: everything long runs in a background process polled by a QTimer, so Slicer stays responsive."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # jobs.ModuleJob while denoising/training
        self._jobKind = ""
        self._foreground = False  # an in-process denoise is running (Apply/Train off until it returns)
        self.jobs = None  # JobManager: cancels jobs on scene close, drops results whose volume is gone
        self.logBox = None
        self._timer = None
        self._dependenciesChecked = False

    # ---- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FPDenoise.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FPDenoiseLogic()
        self.jobs = JobManager(self.logic, launcher=slicer.util.launchConsoleProcess)
        # Combo boxes bound to Choice fields are filled by the parameter node wrapper.
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.modelPathLineEdit.nameFilters = ["FPDenoise checkpoint (*.pt)"]
        self.ui.trainOutputPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Writable
        self.ui.trainOutputPathLineEdit.nameFilters = ["FPDenoise checkpoint (*.pt)"]
        self.ui.trainVolumesSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.progressBar.setVisible(False)
        self.ui.fpScoreLabel.text = "-"
        self.ui.metricsLabel.text = "-"
        # Log box: the background process's lines, and errors in full. Built in code (not in the .ui)
        # so it needs no layout change there.
        self.logBox = qt.QPlainTextEdit()
        self.logBox.setReadOnly(True)
        self.logBox.setMaximumBlockCount(5000)
        self.logBox.setMaximumHeight(140)
        self.logBox.toolTip = "Output of the background denoise / training process"
        self.layout.addWidget(self.logBox)
        self.ui.legendLabel.text = self.logic.legendText()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.simulateButton.connect("clicked(bool)", self.onSimulateButton)
        self.ui.metricsButton.connect("clicked(bool)", self.onMetricsButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.defaultModelButton.connect("clicked(bool)", self.onDefaultModelButton)
        self.ui.ctTextureModelButton.connect("clicked(bool)", self.onCtTextureModelButton)
        self.ui.autoModelButton.connect("clicked(bool)", self.onAutoModelButton)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.backgroundPercentileSlider.connect("valueChanged(double)", self.onBackgroundPercentileChanged)
        self.ui.sideBySideButton.connect("clicked(bool)", self.onSideBySideButton)
        self.ui.rightOverlayComboBox.connect("currentIndexChanged(int)", self.onRightOverlayChanged)
        # Path fields are plain strings ("" = default model), synced by hand: the wrapper binds
        # ctkPathLineEdit only to pathlib.Path, where "" would read back as ".".
        # Followed through the inner line edit's textChanged: ctkPathLineEdit emits currentPathChanged only for
        # text its validator (built from nameFilters, here *.pt) accepts, never for "", "auto" or "ct_texture".
        for pathEdit, slot in (
            (self.ui.modelPathLineEdit, self.onModelPathChanged),
            (self.ui.trainOutputPathLineEdit, self.onTrainOutputPathChanged),
        ):
            slicer.util.findChildren(pathEdit, className="QLineEdit")[0].connect("textChanged(QString)", slot)

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPollJob)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self.jobs is not None:  # a job must not outlive the module: kill it and delete its temp files
            self.jobs.close()
        self._job, self._jobKind = None, ""

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        # The JobManager observes this event too; cancelling here as well keeps the order explicit: the
        # job dies (and its exported volume is deleted) before the patient's nodes go away.
        if self.jobs is not None:
            self.jobs.cancelAll("the scene was closed")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui are bound to the fields above.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path

    def onTrainOutputPathChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.trainOutputPath != path:
            self._parameterNode.trainOutputPath = path

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is not None:
            for widget, value in (
                (self.ui.modelPathLineEdit, p.modelPath),
                (self.ui.trainOutputPathLineEdit, p.trainOutputPath),
            ):
                if widget.currentPath != value:
                    wasBlocked = widget.blockSignals(True)
                    widget.currentPath = value
                    widget.blockSignals(wasBlocked)
            self.ui.modelLabel.text = self.logic.modelDescription(p.modelPath)
            self.ui.legendLabel.text = self.logic.legendText(p.backgroundPercentile)
        running = "foreground" if self._foreground else (self._jobKind if self._job is not None else "")
        states = self.logic.actionStates(
            running,
            hasInput=bool(p and p.inputVolume),
            hasReference=bool(p and p.referenceVolume),
            hasOutput=bool(p and p.outputVolume),
        )
        for name, (enabled, text) in states.items():
            button = getattr(self.ui, name + "Button")
            button.enabled = enabled
            if text is not None:
                button.text = text

    # ---- dependencies and device
    def ensureDependencies(self) -> bool:
        """On first use: install missing or too old Python packages, with consent (the Logic decides what)."""
        if self._dependenciesChecked:
            return True
        unmet = []
        with slicer.util.tryWithErrorDisplay("Failed to install FPDenoise dependencies.", waitCursor=True):
            unmet = self.logic.setupPythonRequirements(
                lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle="FPDenoise: install dependencies")
            )
            self._dependenciesChecked = not unmet
        if unmet:
            slicer.util.errorDisplay(
                "FPDenoise cannot run yet:\n" + "\n".join(s.problem for s in unmet)
                + "\n\nIf packages were just installed, restart Slicer."
            )
        return self._dependenciesChecked

    def _checkDevice(self) -> bool:
        ok, message = self.logic.checkDevice(self._parameterNode.device, self._parameterNode.inputVolume)
        self.ui.statusLabel.text = message  # e.g. "No CUDA GPU found: ... may take minutes"
        if self.logBox is not None:
            self.logBox.appendPlainText(message)
        if not ok:
            slicer.util.errorDisplay(message, windowTitle="FPDenoise: device")
        return ok

    def _modelPath(self):
        return self._parameterNode.modelPath.strip() or None

    def _ensemble(self) -> int:
        return ENSEMBLE_BEST if self._parameterNode.bestQuality else 1

    # ---- denoise
    def onApplyButton(self) -> None:
        if self._foreground:
            return
        if self._job is not None:
            self._cancelJob()
            return
        if not self.ensureDependencies() or not self._checkDevice():
            return
        p = self._parameterNode
        # Apply overwrites the selected result nodes (the Logic refuses ones made from another volume).
        nodes = {
            "outputVolumeNode": p.outputVolume,
            "inputSaliencyNode": p.inputSaliency,
            "outputSaliencyNode": p.outputSaliency,
            "featureChangeNode": p.featureChange,
        }
        with slicer.util.tryWithErrorDisplay("Denoising failed.", waitCursor=True):
            if p.runInBackground:
                job = self.jobs.startDenoise(
                    p.inputVolume,
                    resultNodes=nodes,
                    modelPath=self._modelPath(),
                    device=p.device,
                    computeSaliency=p.computeSaliency,
                    strength=p.strength,
                    ensemble=self._ensemble(),
                )
                self._startJob(job)
            else:
                self._foreground = True  # processEvents below: no second Apply / Train meanwhile
                self._updateButtons()
                try:
                    self._showProgress(0, 1, "denoising")
                    result = self.logic.denoise(
                        p.inputVolume,
                        self._modelPath(),
                        device=p.device,
                        computeSaliency=p.computeSaliency,
                        progress=lambda d, t: self._showProgress(d, t, "denoising", processEvents=True),
                        strength=p.strength,
                        ensemble=self._ensemble(),
                        **nodes,
                    )
                finally:
                    self._foreground = False
                    self.ui.progressBar.setVisible(False)
                    self._updateButtons()
                self._onDenoiseResult(result)

    def _onDenoiseResult(self, result: dict) -> None:
        p = self._parameterNode
        if p is None:  # module not entered since the scene was closed: show the result, keep no state
            slicer.util.setSliceViewerLayers(background=result["outputVolumeNode"], foreground=None, fit=True)
            return
        p.outputVolume = result["outputVolumeNode"]
        p.inputSaliency = result["inputSaliencyNode"]
        p.outputSaliency = result["outputSaliencyNode"]
        p.featureChange = result.get("featureChangeNode")
        # The result is windowed with the default threshold; apply the slider's.
        self.logic.rewindowOverlays(p.backgroundPercentile, p.inputSaliency, p.outputSaliency, p.featureChange)
        self.ui.fpScoreLabel.text = self.logic.scoreText(result["fpScore"])
        if result.get("modelHint") and self.logBox is not None:  # the background CLI prints it to the log itself
            self.logBox.appendPlainText(f"Note: {result['modelHint']}")
        gt = self.logic.groundTruthFor(p.inputVolume)
        if gt is not None:
            p.referenceVolume = gt
            self.onMetricsButton()
        self.onSideBySideButton()
        self.ui.progressBar.setVisible(False)

    def onSideBySideButton(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        # The combo box's choice, not p.rightOverlay: from the combo box's own signal (onRightOverlayChanged) this
        # runs before the parameter node's slot, connected later by connectGui(), has stored the new choice.
        choice = self.ui.rightOverlayComboBox.currentText
        # Without saliency the overlays are None: input | output, linked, no foreground.
        right = p.featureChange if (choice == "feature change" and p.featureChange) else p.outputSaliency
        self.logic.showSideBySide(p.inputVolume, p.inputSaliency, p.outputVolume, right, p.overlayOpacity)

    def onRightOverlayChanged(self, index: int) -> None:
        if self._parameterNode is not None and self._parameterNode.outputVolume is not None:
            self.onSideBySideButton()

    def onOpacityChanged(self, value: float) -> None:
        self.logic.setOverlayOpacity(value)

    def onBackgroundPercentileChanged(self, value: float) -> None:
        p = self._parameterNode
        if p is not None:  # the rule is FPDenoiseLib.display's, applied by the Logic
            self.logic.rewindowOverlays(value, p.inputSaliency, p.outputSaliency, p.featureChange)

    def onDefaultModelButton(self) -> None:
        self._parameterNode.modelPath = ""

    def onCtTextureModelButton(self) -> None:
        self._parameterNode.modelPath = "ct_texture"

    def onAutoModelButton(self) -> None:
        self._parameterNode.modelPath = "auto"

    # ---- simulate / metrics
    def onSimulateButton(self) -> None:
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Noise simulation failed.", waitCursor=True):
            clean = p.inputVolume
            noisy = self.logic.simulateNoise(clean, p.noiseName, p.noiseLevel, p.noiseSeed)
            p.referenceVolume = clean
            p.inputVolume = noisy
            slicer.util.setSliceViewerLayers(background=noisy, foreground=None, fit=True)
            self.ui.statusLabel.text = f"Added {noisy.GetName()}; it is now the input (ground truth: {clean.GetName()})."

    def onMetricsButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Metrics failed."):
            lines = []
            for label, node in (("input", p.inputVolume), ("denoised", p.outputVolume)):
                if node is not None and node is not p.referenceVolume:
                    m = self.logic.computeMetrics(p.referenceVolume, node)
                    lines.append(f"{label}: PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}")
            self.ui.metricsLabel.text = "\n".join(lines) or "-"

    # ---- training
    def onTrainButton(self) -> None:
        if self._foreground:
            return
        if self._job is not None:
            self._cancelJob()
            return
        if not self.ensureDependencies() or not self._checkDevice():
            return
        p = self._parameterNode
        nodes = list(self.ui.trainVolumesSelector.checkedNodes())
        if not nodes:
            slicer.util.errorDisplay("Check at least one clean volume to train on.")
            return
        out = p.trainOutputPath.strip() or os.path.join(
            slicer.app.defaultScenePath, "fpdenoise_finetuned.pt"
        )
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            job = self.jobs.startTraining(
                nodes,
                out,
                stage=p.trainStage,
                noises=p.trainNoises.split() or ["mix"],
                steps=p.trainSteps,
                device=p.device,
                initModelPath=self._modelPath(),
            )
            self._startJob(job)

    # ---- background job plumbing (lifecycle and scene safety: FPDenoiseSlicerLib/jobs.py)
    def _startJob(self, job) -> None:
        self._job, self._jobKind = job, job.kind
        if self.logBox is not None:
            self.logBox.clear()
            self.logBox.appendPlainText("$ " + " ".join(job.process.args))
        self._showProgress(0, 0, f"{job.kind}: starting")
        self._updateButtons()
        self._timer.start()

    def _showProgress(self, done: int, total: int, message: str, processEvents: bool = False) -> None:
        bar = self.ui.progressBar
        bar.setVisible(True)
        bar.maximum = max(0, int(total))  # 0 = busy indicator while the total is unknown
        bar.value = int(done)
        self.ui.statusLabel.text = message
        if processEvents:
            slicer.app.processEvents()

    def onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        newLines: list = []
        try:
            outcome = self.jobs.poll(job, newLines)
        except Exception as err:  # reading the results failed: the job is over, say why in full
            self._job, self._jobKind = None, ""
            self._timer.stop()
            self.ui.progressBar.setVisible(False)
            self._updateButtons()
            slicer.util.errorDisplay(f"FPDenoise {job.kind}: could not load the results:\n{err}")
            return
        if newLines and self.logBox is not None:
            self.logBox.appendPlainText("\n".join(newLines))
        progress = self.jobs.progress(job)
        if outcome is None:
            if progress is not None:
                self._showProgress(progress.done, progress.total, f"{job.kind}: {progress.message}")
            return
        self._timer.stop()
        self._job, self._jobKind = None, ""
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = outcome.message.splitlines()[0]
        if self.logBox is not None:
            self.logBox.appendPlainText(outcome.message)
        try:
            if outcome.status == "failed":
                slicer.util.errorDisplay(f"FPDenoise: {outcome.message}")
            elif outcome.status == "done" and outcome.kind == "denoise":
                self._onDenoiseResult(outcome.result)
                self.ui.statusLabel.text = outcome.message
            elif outcome.status == "done" and outcome.kind == "train" and self._parameterNode is not None:
                self._parameterNode.modelPath = str(outcome.result)
        finally:
            self._updateButtons()

    def _cancelJob(self) -> None:
        if self._job is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self.jobs.cancel(self._job, "by the user")  # kills the process tree, deletes the temp folder
            self.onPollJob()


#
# Logic
#
class FPDenoiseLogic(ScriptedLoadableModuleLogic, FPDenoiseMRMLLogic):
    """Slicer module logic: the Qt-free :class:`FPDenoiseMRMLLogic` plus the module's parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        FPDenoiseMRMLLogic.__init__(self)

    def getParameterNode(self):
        return FPDenoiseParameterNode(super().getParameterNode())


#
# Test (runs inside Slicer: Developer mode > Reload and Test, or ctest)
#
class FPDenoiseTest(ScriptedLoadableModuleTest):
    """Self-test on the bundled sample: denoise, overlays, simulate noise, metrics."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    @staticmethod
    def skipReason() -> str:
        """Why the self-test cannot run here ("" when it can): extension factory builds have no torch."""
        missing = missingDependencies()
        if not missing:
            return ""
        return (
            "FPDenoise self-test skipped: Python packages missing or too old: "
            + "; ".join(s.problem for s in missing)
            + " (open the module once to install them)."
        )

    def runTest(self):
        self.setUp()
        reason = self.skipReason()
        if reason:  # Reload and Test: a message, not an exception dialog
            self.delayDisplay(reason)
            return
        self.test_FPDenoise_sample()

    def test_FPDenoise_sample(self):
        reason = self.skipReason()
        if reason:  # unittest/ctest runner (slicer_add_python_unittest): reported as skipped
            raise unittest.SkipTest(reason)
        import numpy as np

        logic = FPDenoiseLogic()
        samplePath = logic.sampleDataPath()
        if not os.path.exists(samplePath):
            raise unittest.SkipTest(f"bundled sample not found: {samplePath}")
        self.delayDisplay("Loading the bundled sample")
        volume = logic.loadImageAsVolume(samplePath)
        self.assertIsNotNone(volume)
        original = slicer.util.arrayFromVolume(volume).copy()

        self.delayDisplay("Simulating Gaussian noise")
        noisy = logic.simulateNoise(volume, "gaussian", 0.5, seed=1)
        self.assertEqual(logic.groundTruthFor(noisy), volume)

        self.delayDisplay("Denoising (CPU)")
        result = logic.denoise(noisy, device="cpu")
        out = result["outputVolumeNode"]
        self.assertEqual(slicer.util.arrayFromVolume(out).shape, original.shape)
        self.assertEqual(out.GetSpacing(), volume.GetSpacing())
        self.assertEqual(out.GetOrigin(), volume.GetOrigin())
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), original), "input modified")
        self.assertIsNotNone(result["fpScore"])
        self.assertIsNotNone(result["featureChangeNode"])

        before = logic.computeMetrics(volume, noisy)["psnr"]
        after = logic.computeMetrics(volume, out)["psnr"]
        self.delayDisplay(f"PSNR noisy {before:.2f} dB -> denoised {after:.2f} dB")
        self.assertGreater(after, before)

        views = logic.showSideBySide(noisy, result["inputSaliencyNode"], out, result["outputSaliencyNode"], 0.4)
        self.assertEqual(views["Yellow"].GetBackgroundVolumeID(), out.GetID())
        self.assertAlmostEqual(views["Red"].GetForegroundOpacity(), 0.4)
        self.assertEqual(logic.layoutNode().GetViewArrangement(), slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        self.delayDisplay("Test passed")
