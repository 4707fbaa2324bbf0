"""How the FPDenoise Logic shows results on an MRML scene: the Inferno colour node, the saliency display
rule of :mod:`FPDenoiseLib.display`, the side-by-side layout of two linked slice views. No Qt.

:class:`SliceDisplayMixin` is a base of :class:`FPDenoiseSlicerLib.logic.FPDenoiseMRMLLogic`; it works on
``slicer.mrmlScene`` at call time, so it runs in Slicer, on a bare ``vtkMRMLScene`` and in the viewer.
"""

from __future__ import annotations

import numpy as np
import slicer

# Slicer's own Inferno table (ColorFiles/Inferno.txt, loaded by the Colors module in the application).
# It is used as is when the display rule has no gamma; otherwise, and in a bare MRML scene without
# Slicer's colour files, the Logic adds one colour table node holding FPDenoiseLib.display's table.
SLICER_INFERNO_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"
SALIENCY_COLOR_NODE_NAME = "FPDenoise Inferno"
LEFT_VIEW, RIGHT_VIEW = "Red", "Yellow"
# Layout XML Slicer's layout manager uses for SlicerLayoutSideBySideView; registered only when the
# scene's layout node does not know that layout (bare scene without a layout manager).
_SIDE_BY_SIDE_XML = (
    '<layout type="horizontal">'
    '<item><view class="vtkMRMLSliceNode" singletontag="Red">'
    '<property name="orientation" action="default">Axial</property>'
    '<property name="viewlabel" action="default">R</property>'
    '<property name="viewcolor" action="default">#F34A33</property></view></item>'
    '<item><view class="vtkMRMLSliceNode" singletontag="Yellow">'
    '<property name="orientation" action="default">Axial</property>'
    '<property name="viewlabel" action="default">Y</property>'
    '<property name="viewcolor" action="default">#EDD54C</property></view></item>'
    "</layout>"
)


def _ordinal(value: float) -> str:
    """``60`` -> ``"60th"``, ``1`` -> ``"1st"``, ``22.5`` -> ``"22.5th"``."""
    text = f"{value:g}"
    n = int(value)
    if n != value or 10 <= n % 100 <= 20:
        return text + "th"
    return text + {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


class SliceDisplayMixin:
    """Colour node, saliency display, layout and slice views (see the module docstring)."""

    @staticmethod
    def _scene():
        return slicer.mrmlScene

    def saliencyColorNodeID(self, gamma: float | None = None) -> str:
        """ID of the colour node for saliency / feature-change overlays.

        With ``gamma`` 1 Slicer's own "Inferno" node is used where the scene has it (the application).
        Otherwise (the default gamma 0.5 of :mod:`FPDenoiseLib.display`, or a bare MRML scene) one
        ``vtkMRMLColorTableNode`` named :data:`SALIENCY_COLOR_NODE_NAME` holding
        :func:`FPDenoiseLib.display.colour_table` is added once and reused: a graded 256-entry Inferno,
        never a near-flat fallback.
        """
        from FPDenoiseLib.display import DISPLAY_GAMMA, colour_table

        gamma = DISPLAY_GAMMA if gamma is None else float(gamma)
        scene = self._scene()
        if gamma == 1.0:
            node = scene.GetNodeByID(SLICER_INFERNO_NODE_ID) or scene.GetFirstNodeByName("Inferno")
            if node is not None and node.IsA("vtkMRMLColorNode"):
                return node.GetID()
        name = SALIENCY_COLOR_NODE_NAME if gamma == DISPLAY_GAMMA else f"{SALIENCY_COLOR_NODE_NAME} gamma {gamma:g}"
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
            if node.GetName() == name:
                return node.GetID()
        table = colour_table(gamma)
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(name)
        node.SetTypeToUser()
        node.SetNumberOfColors(len(table))
        node.GetLookupTable().SetTableRange(0, len(table) - 1)
        for i, (r, g, b) in enumerate(table):
            node.SetColor(i, f"{i}", float(r), float(g), float(b), 1.0)
        node.SetAttribute("Category", "Continuous")
        node.SetHideFromEditors(False)
        return scene.AddNode(node).GetID()

    def setSaliencyDisplay(
        self,
        saliencyNode,
        colorNodeID: str | None = None,
        window=None,
        backgroundPercentile: float | None = None,
    ) -> None:
        """Show a saliency or feature-change volume with the display rule of :mod:`FPDenoiseLib.display`.

        ``window``: a :class:`FPDenoiseLib.display.DisplayWindow` (or ``(lo, hi)``); by default computed
        from the volume with ``backgroundPercentile`` (default
        :data:`FPDenoiseLib.display.BACKGROUND_PERCENTILE`). Values at or below ``lo`` are transparent
        (background), ``lo .. hi`` runs over the graded Inferno table.
        """
        from FPDenoiseLib.display import BACKGROUND_PERCENTILE, DisplayWindow, saliency_window

        if saliencyNode.GetDisplayNode() is None:
            saliencyNode.CreateDefaultDisplayNodes()
        display = saliencyNode.GetDisplayNode()
        if window is None:
            pct = BACKGROUND_PERCENTILE if backgroundPercentile is None else float(backgroundPercentile)
            window = saliency_window(slicer.util.arrayFromVolume(saliencyNode), background_percentile=pct)
        elif not isinstance(window, DisplayWindow):
            window = DisplayWindow(float(window[0]), float(window[1]))
        display.SetAndObserveColorNodeID(colorNodeID or self.saliencyColorNodeID(window.gamma))
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(window.lo, window.hi)
        display.SetAutoThreshold(False)
        # Strictly above lo: a map with many exact zeros (nothing changed) stays transparent there.
        display.SetLowerThreshold(float(np.nextafter(np.float32(window.lo), np.float32(np.inf))))
        display.SetUpperThreshold(float(np.finfo(np.float32).max))
        display.SetApplyThreshold(True)
        display.SetInterpolate(False)
        saliencyNode.SetAttribute("FPDenoise.DisplayWindow", f"{window.lo:.6g} {window.hi:.6g} {window.gamma:g}")

    def rewindowOverlays(
        self,
        backgroundPercentile: float,
        inputSaliencyNode=None,
        outputSaliencyNode=None,
        featureChangeNode=None,
    ) -> dict:
        """Show the existing overlays with another background threshold (the module's slider).

        ``backgroundPercentile``: the percentile of each map at or below which voxels are transparent
        (:data:`FPDenoiseLib.display.BACKGROUND_PERCENTILE` by default in the module). The rule is
        :func:`FPDenoiseLib.display.saliency_window`, as at Apply: the two saliency maps share one window
        (equal colour = equal saliency left and right), the feature change has its own. Missing nodes
        (None, e.g. Apply without saliency) are skipped. Returns ``{"saliency": DisplayWindow or None,
        "featureChange": DisplayWindow or None}``.
        """
        from FPDenoiseLib.display import saliency_window

        pct = float(backgroundPercentile)
        saliency = [n for n in (inputSaliencyNode, outputSaliencyNode) if n is not None]
        windows = {"saliency": None, "featureChange": None}
        if saliency:
            window = saliency_window(*(slicer.util.arrayFromVolume(n) for n in saliency), background_percentile=pct)
            for node in saliency:
                self.setSaliencyDisplay(node, window=window)
            windows["saliency"] = window
        if featureChangeNode is not None:
            self.setSaliencyDisplay(featureChangeNode, backgroundPercentile=pct)
            windows["featureChange"] = self.displayWindowOf(featureChangeNode)
        return windows

    @staticmethod
    def scoreText(fpScore: float | None) -> str:
        """The feature score with its one-line meaning, for the module panel and the viewer."""
        from FPDenoiseLib.display import feature_score_text

        return feature_score_text(fpScore)

    @staticmethod
    def legendText(backgroundPercentile: float | None = None) -> str:
        """One-line colour legend of the overlays (the module panel shows it under the overlay choice).

        ``backgroundPercentile``: the threshold in use (default :data:`FPDenoiseLib.display.BACKGROUND_PERCENTILE`).
        """
        from FPDenoiseLib.display import BACKGROUND_PERCENTILE

        pct = BACKGROUND_PERCENTILE if backgroundPercentile is None else float(backgroundPercentile)
        return (
            "Inferno colours: dark purple = low, orange = mid, pale yellow = high; values at or below "
            f"the {_ordinal(pct)} percentile of each map (background) are not drawn. Feature change = "
            "|GB(denoised) - GB(input)|: bright where denoising changed structure."
        )

    def displayWindowOf(self, saliencyNode):
        """The :class:`FPDenoiseLib.display.DisplayWindow` a saliency node is shown with (for legends)."""
        from FPDenoiseLib.display import DisplayWindow

        text = saliencyNode.GetAttribute("FPDenoise.DisplayWindow")
        if text:
            lo, hi, gamma = (float(v) for v in text.split())
            return DisplayWindow(lo, hi, gamma)
        display = saliencyNode.GetDisplayNode()
        return DisplayWindow(display.GetWindowLevelMin(), display.GetWindowLevelMax())

    def layoutNode(self):
        """The scene's layout node (the one Slicer's layout manager observes); added in a bare scene."""
        scene = self._scene()
        node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if node is None:
            node = slicer.vtkMRMLLayoutNode()
            node.SetSingletonTag("vtkMRMLLayoutNode")
            node = scene.AddNode(node)
        return node

    def sliceNode(self, layoutName: str):
        """The slice node of view ``layoutName`` ("Red", "Yellow"...); added if the scene lacks it."""
        scene = self._scene()
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
            if node.GetLayoutName() == layoutName:
                return node
        node = slicer.vtkMRMLSliceNode()
        node.SetName(layoutName)
        node.SetLayoutName(layoutName)
        node.SetSingletonTag(layoutName)
        return scene.AddNode(node)

    def sliceCompositeNode(self, layoutName: str):
        """The slice composite node (layers of a view) of ``layoutName``; added if missing."""
        scene = self._scene()
        sliceNode = self.sliceNode(layoutName)
        node = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode)
        if node is None:
            node = slicer.vtkMRMLSliceCompositeNode()
            node.SetLayoutName(layoutName)
            node.SetSingletonTag(layoutName)
            node = scene.AddNode(node)
        return node

    def showSideBySide(self, inputNode, inputSaliencyNode, outputNode, outputSaliencyNode, opacity: float = 0.5) -> dict:
        """Side-by-side layout of two linked slice views: left (Red) the input with its saliency overlay,
        right (Yellow) the denoised volume with its overlay, both aligned to the volume's planes.

        The overlays may be None (Apply without saliency): then the views show input | output with no
        foreground layer, still linked and aligned.

        Returns ``{"Red": compositeNode, "Yellow": compositeNode}``.
        """
        layout = self.layoutNode()
        arrangement = slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
        if not layout.IsLayoutDescription(arrangement):
            layout.AddLayoutDescription(arrangement, _SIDE_BY_SIDE_XML)
        layout.SetViewArrangement(arrangement)
        views = {}
        for viewName, background, foreground in (
            (LEFT_VIEW, inputNode, inputSaliencyNode),
            (RIGHT_VIEW, outputNode, outputSaliencyNode),
        ):
            comp = self.sliceCompositeNode(viewName)
            comp.SetBackgroundVolumeID(background.GetID() if background else None)
            comp.SetForegroundVolumeID(foreground.GetID() if foreground else None)
            comp.SetForegroundOpacity(float(opacity))
            comp.SetLinkedControl(True)
            views[viewName] = comp
        # Same orientation in both views (Yellow is sagittal by default in Slicer's 4-up layout).
        left, right = self.sliceNode(LEFT_VIEW), self.sliceNode(RIGHT_VIEW)
        reference = inputNode if inputNode is not None else outputNode
        if reference is not None:
            if left.HasSliceOrientationPreset("Axial"):
                left.SetOrientation("Axial")
            left.RotateToVolumePlane(reference)
            right.GetSliceToRAS().DeepCopy(left.GetSliceToRAS())
            right.SetFieldOfView(*left.GetFieldOfView())
            right.UpdateMatrices()
        self._fitSliceViews()
        return views

    def setRightOverlay(self, overlayNode) -> None:
        """Overlay of the right (denoised) view: its saliency or the feature change (a volume node or None)."""
        self.sliceCompositeNode(RIGHT_VIEW).SetForegroundVolumeID(overlayNode.GetID() if overlayNode else None)

    def setOverlayOpacity(self, opacity: float) -> None:
        """Foreground (saliency) opacity of both side-by-side views, 0..1."""
        for viewName in (LEFT_VIEW, RIGHT_VIEW):
            self.sliceCompositeNode(viewName).SetForegroundOpacity(float(opacity))

    @staticmethod
    def _fitSliceViews() -> None:
        # Only the Slicer application has a layout manager (no Qt import: just an attribute check).
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "layoutManager") and app.layoutManager() is not None:
            slicer.util.resetSliceViews()
