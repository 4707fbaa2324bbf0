"""Server-free core of the browser viewer: one MRML scene, the Slicer module's Logic, two slice views.

:class:`ViewerSession` is everything the web page does, without trame: open a volume under the data
root (or the bundled sample), simulate noise, denoise in a background process with progress and
Cancel, strength, overlay opacity / background threshold, saliency or feature-change overlay on the
right, colour legend, window/level presets, scores, saving. The page
(:mod:`FPDenoiseWeb.app`) calls it from its callbacks; the rendering tests drive it with trame-slicer's
serverless ``DirectViewFactory``. All MRML work goes through
:class:`FPDenoiseSlicerLib.logic.FPDenoiseMRMLLogic` (nodes, overlays, colour maps, scores): the viewer
adds no second copy of it.

Example (no server, no browser)::

    from FPDenoiseWeb.viewer import ViewerSession
    s = ViewerSession(data_root="data", output_dir="out", offscreen_views=True)
    s.load_sample()
    s.start_denoise(); s.wait_denoise()
    rgb = s.capture("Yellow")            # (h, w, 3) uint8 of the right view
"""

from __future__ import annotations

import os

# EGL first: with no X server VTK would otherwise try X11 before falling back (Mesa llvmpipe, no GPU).
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import shutil  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

# The Logic lives in the Slicer module folder (FPDenoise/FPDenoiseSlicerLib); the package installs it as
# the top-level package FPDenoiseSlicerLib (pyproject.toml package-dir), so no sys.path edit is needed.
import slicer  # noqa: E402
from FPDenoiseSlicerLib.logic import (  # noqa: E402
    ENSEMBLE_BEST,
    LEFT_VIEW,
    RIGHT_VIEW,
    FPDenoiseMRMLLogic,
)
from FPDenoiseSlicerLib.process import BackgroundJob  # noqa: E402

from FPDenoiseLib.display import BACKGROUND_PERCENTILE, colorbar_ticks, colour_table  # noqa: E402
from FPDenoiseLib.errors import InputError, OutputError  # noqa: E402

#: What the right view overlays on the denoised volume.
RIGHT_OVERLAYS = ("saliency", "feature_change")

# Slicer's own CT presets (Volumes module): (window, level) in HU. "auto" = Slicer's automatic
# window/level from the histogram, the right choice for X-ray (arbitrary detector units) and MR.
WINDOW_PRESETS: dict[str, tuple[float, float] | None] = {
    "ct_lung": (1400.0, -500.0),
    "ct_soft_tissue": (350.0, 40.0),
    "ct_bone": (1000.0, 400.0),
    "auto": None,
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def resolve_under(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved, refused unless it stays inside ``root``.

    Symbolic links are resolved first, so a link pointing out of the root is refused too.

    >>> resolve_under("/data", "ct/a.nrrd").as_posix()
    '/data/ct/a.nrrd'
    >>> resolve_under("/data", "../etc/passwd")
    Traceback (most recent call last):
    ...
    FPDenoiseLib.errors.InputError: ../etc/passwd: outside the data root /data
    """
    root_r = Path(root).expanduser().resolve()
    raw = Path(path).expanduser()
    full = (raw if raw.is_absolute() else root_r / raw).resolve()
    if full != root_r and root_r not in full.parents:
        raise InputError(f"{path}: outside the data root {root_r}")
    return full


def safe_name(text: str, default: str = "volume") -> str:
    """A file-name stem with only letters, digits, ``-`` and ``_`` (no separators, no ``..``)."""
    out = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text)).strip("_")
    return out or default


@dataclass
class DenoiseStatus:
    """State of the background denoise shown by the page."""

    state: str = "idle"  # idle | running | done | cancelled | error
    fraction: float = 0.0  # 0..1
    message: str = ""


@dataclass
class Scores:
    """Numbers shown by the page; None when not applicable."""

    fp_score: float | None = None
    psnr_noisy: float | None = None
    ssim_noisy: float | None = None
    psnr_denoised: float | None = None
    ssim_denoised: float | None = None
    extra: dict = field(default_factory=dict)


class ViewerSession:
    """One viewer: a Slicer app (scene, application logic, view manager), the module's Logic, two views.

    ``data_root``: only files below it can be opened (besides the bundled sample). ``output_dir``: the
    only folder written to (saved outputs and the background denoise's scratch folder).
    ``view_factory``: a trame-slicer view factory to register (the web app registers its remote
    views); ``offscreen_views=True`` registers a serverless ``DirectViewFactory`` (tests, scripts).
    """

    def __init__(
        self,
        *,
        data_root: str | os.PathLike,
        output_dir: str | os.PathLike,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        offscreen_views: bool = False,
        view_size: tuple[int, int] = (400, 400),
    ) -> None:
        from trame_slicer.core import SlicerApp

        self.data_root = Path(data_root).expanduser().resolve()
        if not self.data_root.is_dir():
            raise InputError(f"{data_root}: data root is not a folder")
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.model: str | None = None
        self.set_model(model)
        self.run_model = ""
        self.device = device
        self.app = SlicerApp()
        # The Logic works on slicer.mrmlScene: point it at this app's scene (one viewer per process).
        slicer.mrmlScene = self.app.scene
        self.logic = FPDenoiseMRMLLogic()
        self.input_node = None  # volume shown on the left (possibly a simulated-noise volume)
        self.result: dict | None = None
        self.scores = Scores()
        self.status = DenoiseStatus()
        self.threshold = BACKGROUND_PERCENTILE  # percentile of each map hidden as background
        self.opacity = 0.5
        self.strength = 1.0
        self.ensemble = 1  # passes over flips and rotations averaged; ENSEMBLE_BEST = the "Best quality" switch
        self.right_overlay = "feature_change"
        self._job: BackgroundJob | None = None
        self._work: Path | None = None
        if offscreen_views:
            from trame_slicer.views import DirectViewFactory

            self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
            for name in (LEFT_VIEW, RIGHT_VIEW):
                view = self.app.view_manager.create_view(self.view_definition(name))
                view.render_window().SetSize(*view_size)
                view.interactor().SetSize(*view_size)

    # ------------------------------------------------------------------ views
    @staticmethod
    def view_definition(name: str):
        """trame-slicer layout definition of the left ("Red") or right ("Yellow") axial view."""
        from trame_slicer.views import ViewLayoutDefinition

        color = "#F34A33" if name == LEFT_VIEW else "#EDD54C"
        return ViewLayoutDefinition.slice_view("Axial", label=name, color=color)

    def view(self, name: str):
        """The trame-slicer ``SliceView`` of ``name`` ("Red" left, "Yellow" right), or None."""
        return self.app.view_manager.get_view(name)

    def _refresh(self, fit: bool = False) -> None:
        for name in (LEFT_VIEW, RIGHT_VIEW):
            view = self.view(name)
            if view is None:
                continue
            if fit:
                view.fit_view_to_content()
            view.schedule_render()

    def fit_on_resize(self) -> None:
        """Fit both views to the volume whenever the browser resizes them (the first size arrives after load)."""
        from vtkmodules.vtkCommonCore import vtkCommand

        for name in (LEFT_VIEW, RIGHT_VIEW):
            view = self.view(name)

            def fit(*_, view=view):
                if self.input_node is not None:
                    view.fit_view_to_content()
                    view.schedule_render()

            view.interactor().AddObserver(vtkCommand.WindowResizeEvent, fit)

    def capture(self, name: str) -> np.ndarray:
        """Render view ``name`` now and return its pixels, ``(height, width, 3)`` uint8, top row first."""
        from vtkmodules.util.numpy_support import vtk_to_numpy
        from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

        view = self.view(name)
        view.render()
        grab = vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.ReadFrontBufferOff()
        grab.Update()
        img = grab.GetOutput()
        w, h, _ = img.GetDimensions()
        rgb = vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3]
        return rgb[::-1].copy()

    # ------------------------------------------------------------------ opening volumes
    def resolve_input(self, path: str | os.PathLike) -> Path:
        """``path`` under the data root that exists, else a one-line :class:`InputError`."""
        full = resolve_under(self.data_root, path)
        if not full.exists():
            raise InputError(f"{path}: not found under the data root {self.data_root}")
        return full

    def list_inputs(self, limit: int = 200) -> list[str]:
        """Readable images / DICOM series below the data root, as paths relative to it."""
        from FPDenoiseLib.io import find_images

        try:
            found = find_images(self.data_root)
        except InputError:
            return []
        return [p.relative_to(self.data_root).as_posix() or "." for p in found[:limit]]

    def load(self, path: str | os.PathLike):
        """Open a file or DICOM series folder under the data root and show it on both sides."""
        return self._show_new_input(self.logic.loadImageAsVolume(self.resolve_input(path)))

    def load_sample(self):
        """Open the bundled sample CT (``FPDenoiseLib.inference.sample_data_path()``)."""
        return self._show_new_input(self.logic.loadImageAsVolume(self.logic.sampleDataPath(), name="sample CT"))

    def _show_new_input(self, node):
        self.cancel_denoise()
        self.input_node = node
        self.result = None
        self.scores = Scores()
        self.status = DenoiseStatus()
        # Input on the left, right view empty until denoised; layout and links come from the Logic.
        self.logic.showSideBySide(node, None, None, None, opacity=self.opacity)
        self._refresh(fit=True)
        return node

    def simulate_noise(self, noise: str, level: float = 0.5, seed: int | None = 0):
        """Add a noise type to the clean volume (ground truth kept) and make the noisy one the input."""
        if self.input_node is None:
            raise InputError("simulate noise: open a volume first")
        clean = self.logic.groundTruthFor(self.input_node) or self.input_node
        noisy = self.logic.simulateNoise(clean, noise, level=level, seed=seed)
        self._show_new_input(noisy)
        gt = self.logic.groundTruthFor(noisy)
        m = self.logic.computeMetrics(gt, noisy)
        self.scores.psnr_noisy, self.scores.ssim_noisy = m["psnr"], m["ssim"]
        return noisy

    # ------------------------------------------------------------------ denoising (background process)
    def start_denoise(self) -> None:
        """Start denoising the input in a background process (the caller keeps serving; poll it)."""
        if self.input_node is None:
            raise InputError("denoise: open a volume first")
        if self.running:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Scratch folder inside the output folder: nothing is written anywhere else.
        self._work = Path(tempfile.mkdtemp(prefix=".fpdenoise-work-", dir=self.output_dir))
        cmd, _ = self.logic.prepareBackgroundDenoise(
            self.input_node, self._work, modelPath=self.model, device=self.device, strength=self.strength,
            ensemble=self.ensemble,
        )
        self.status = DenoiseStatus("running", 0.0, "starting")
        self.run_model = self.model or "default"  # the model of the run in progress / the result shown
        self._job = BackgroundJob(cmd, env=self.logic.backgroundEnvironment())

    @property
    def running(self) -> bool:
        """True while a background denoise is running."""
        return self._job is not None and self.status.state == "running"

    def poll_denoise(self) -> DenoiseStatus:
        """Read the background denoise's progress (the library CLI); when it ends, load the results and show them. Never blocks long."""
        job = self._job
        if job is None or self.status.state != "running":
            return self.status
        _, progress, code = job.poll()
        if progress is not None:
            self.status.fraction = progress.fraction
            self.status.message = progress.message
        if code is None:
            return self.status
        self._job = None
        try:
            if code != 0:
                self.status = DenoiseStatus("error", 0.0, job.error_summary(2) or f"denoise exit code {code}")
                return self.status
            self._show_result(self.logic.loadBackgroundDenoiseResults(self.input_node, self._work))
            # the CLI's note on the model choice (Denoiser.choose) is the page's too
            notes = [ln.split("note: ", 1)[1] for ln in job.lines if "note: " in ln]
            self.status = DenoiseStatus("done", 1.0, notes[0] if notes else "done")
        finally:
            self._drop_work()
        return self.status

    def wait_denoise(self, timeout: float = 600.0) -> DenoiseStatus:
        """Block until the background denoise ends (scripts and tests)."""
        import time

        deadline = time.monotonic() + timeout
        while self.poll_denoise().state == "running":
            if time.monotonic() > deadline:
                self.cancel_denoise()
                raise TimeoutError(f"denoise still running after {timeout} s")
            time.sleep(0.05)
        return self.status

    def cancel_denoise(self) -> None:
        """Kill the background denoise (and its children) if one runs."""
        if self._job is not None:
            self._job.cancel()
            self._job = None
            self.status = DenoiseStatus("cancelled", 0.0, "cancelled")
        self._drop_work()

    def _drop_work(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def _show_result(self, result: dict) -> None:
        # Replace the nodes of a previous run of the same input instead of piling them up.
        if self.result is not None:
            for key in ("outputVolumeNode", "inputSaliencyNode", "outputSaliencyNode", "featureChangeNode"):
                if self.result.get(key) is not None:
                    slicer.mrmlScene.RemoveNode(self.result[key])
        self.result = result
        self.logic.showSideBySide(
            self.input_node,
            result["inputSaliencyNode"],
            result["outputVolumeNode"],
            self._right_overlay_node(),
            opacity=self.opacity,
        )
        if result["inputSaliencyNode"] is not None and self.threshold != BACKGROUND_PERCENTILE:
            self.set_threshold(self.threshold)
        self.scores.fp_score = result["fpScore"]
        gt = self.logic.groundTruthFor(self.input_node)
        if gt is not None:
            m = self.logic.computeMetrics(gt, result["outputVolumeNode"])
            self.scores.psnr_denoised, self.scores.ssim_denoised = m["psnr"], m["ssim"]
        self._refresh(fit=True)

    # ------------------------------------------------------------------ display
    def set_opacity(self, opacity: float) -> None:
        """Saliency overlay opacity of both views, 0..1."""
        self.opacity = float(np.clip(opacity, 0.0, 1.0))
        self.logic.setOverlayOpacity(self.opacity)
        self._refresh()

    def set_threshold(self, percentile: float) -> None:
        """Hide each map's values at or below its ``percentile`` (0..99) as background, all overlays.

        The Slicer module's slider does the same through the same Logic method
        (``rewindowOverlays``: :func:`FPDenoiseLib.display.saliency_window`, the two saliency maps on
        one window, the feature change on its own).
        """
        self.threshold = float(np.clip(percentile, 0.0, 99.0))
        if self.result is None or self.result["inputSaliencyNode"] is None:
            return
        self.logic.rewindowOverlays(
            self.threshold,
            self.result["inputSaliencyNode"],
            self.result["outputSaliencyNode"],
            self.result.get("featureChangeNode"),
        )
        self._refresh()

    def _right_overlay_node(self):
        if self.result is None:
            return None
        key = "featureChangeNode" if self.right_overlay == "feature_change" else "outputSaliencyNode"
        return self.result.get(key) or self.result.get("outputSaliencyNode")

    def set_right_overlay(self, which: str) -> None:
        """Overlay on the denoised (right) view: ``"saliency"`` or ``"feature_change"``."""
        if which not in RIGHT_OVERLAYS:
            raise InputError(f"right overlay {which!r}: choose one of {', '.join(RIGHT_OVERLAYS)}")
        self.right_overlay = which
        if self.result is not None:
            self.logic.setRightOverlay(self._right_overlay_node())
        self._refresh()

    def set_model(self, model: str | os.PathLike | None) -> None:
        """Model for the next run: a checkpoint file, a model's name (``default``, ``mse_twin``, ``ct_texture``,
        ``auto``) or None (the default). A missing file is refused and the current model kept."""
        from FPDenoiseLib.inference import resolve_model

        key = str(model).strip() if model else ""
        if key and not resolve_model(key).is_file():
            raise InputError(f"{model}: model checkpoint not found")
        self.model = key or None

    def set_strength(self, strength: float) -> None:
        """Denoising strength for the next run (0 = input unchanged, 1 = as trained, 2 = stronger)."""
        self.strength = float(np.clip(strength, 0.0, 2.0))

    def set_best_quality(self, best: bool) -> None:
        """For the next run: average the 8 flipped and rotated passes (``--ensemble 8``, about 8x the time)."""
        self.ensemble = ENSEMBLE_BEST if best else 1

    def legend(self) -> dict | None:
        """Colour legend of the overlays: CSS gradient, tick values of each window, feature score text.

        None before a denoise with saliency. ``ticks`` are ``(fraction along the bar, value)`` pairs.
        """
        from FPDenoiseLib.display import feature_score_text

        if self.result is None or self.result["inputSaliencyNode"] is None:
            return None
        table = colour_table(self.logic.displayWindowOf(self.result["inputSaliencyNode"]).gamma)
        stops = ", ".join(
            f"rgb({int(round(r * 255))},{int(round(g * 255))},{int(round(b * 255))}) {100 * i / 15:.1f}%"
            for i, (r, g, b) in enumerate(table[::17])
        )
        out = {
            "gradient": f"linear-gradient(to right, {stops})",
            "saliency_ticks": colorbar_ticks(self.logic.displayWindowOf(self.result["inputSaliencyNode"])),
            "change_ticks": None,
            "score_text": feature_score_text(self.result.get("fpScore")),
        }
        if self.result.get("featureChangeNode") is not None:
            out["change_ticks"] = colorbar_ticks(self.logic.displayWindowOf(self.result["featureChangeNode"]))
        return out

    def set_window_preset(self, preset: str) -> None:
        """Window/level of both grey-scale volumes: ``ct_lung``, ``ct_soft_tissue``, ``ct_bone`` or ``auto``."""
        if preset not in WINDOW_PRESETS:
            raise InputError(f"window preset {preset!r}: choose one of {', '.join(WINDOW_PRESETS)}")
        nodes = [self.input_node] + ([self.result["outputVolumeNode"]] if self.result else [])
        for node in nodes:
            display = node.GetDisplayNode() if node is not None else None
            if display is None:
                continue
            wl = WINDOW_PRESETS[preset]
            if wl is None:
                display.SetAutoWindowLevel(True)
            else:
                display.SetAutoWindowLevel(False)
                display.SetWindowLevel(*wl)
        self._refresh()

    def slice_count(self) -> int:
        """Number of slices of the input along the view's normal (1 before a volume is open)."""
        view = self.view(LEFT_VIEW)
        if view is None or self.input_node is None:
            return 1
        lo, hi = view.get_slice_range()
        step = view.get_slice_step() or 1.0
        return max(1, int(round((hi - lo) / step)) + 1)

    def slice_index(self) -> int:
        """Index (0 = lowest offset) of the slice shown in the (linked) views."""
        view = self.view(LEFT_VIEW)
        if view is None:
            return 0
        lo, _ = view.get_slice_range()
        return int(round((view.get_slice_value() - lo) / (view.get_slice_step() or 1.0)))

    def set_slice_index(self, index: int) -> None:
        """Show slice ``index`` in both views (the change goes through Slicer's slice link logic)."""
        view = self.view(LEFT_VIEW)
        if view is None:
            return
        lo, hi = view.get_slice_range()
        value = float(np.clip(lo + int(index) * (view.get_slice_step() or 1.0), lo, hi))
        logic = view._logic  # trame-slicer exposes no public accessor to the view's vtkMRMLSliceLogic
        logic.StartSliceOffsetInteraction()  # interacting flag => linked views follow
        logic.SetSliceOffset(value)
        logic.EndSliceOffsetInteraction()
        self._refresh()

    # ------------------------------------------------------------------ saving
    def save(self, stem: str | None = None) -> list[Path]:
        """Write the denoised volume, both saliency maps and the feature change as NRRD into the output folder.

        Names are ``<stem>_denoised.nrrd``, ``<stem>_saliency.nrrd``, ``<stem>_denoised_saliency.nrrd``,
        ``<stem>_feature_change.nrrd``;
        ``stem`` is reduced to a plain file name (no folders), default the input's name.
        """
        if self.result is None:
            raise OutputError("save: nothing to save yet, run Denoise first")
        base = safe_name(stem or self.input_node.GetName())
        self.output_dir.mkdir(parents=True, exist_ok=True)
        written = [self.logic.saveVolume(self.result["outputVolumeNode"], self.output_dir / f"{base}_denoised.nrrd")]
        for key, suffix in (
            ("inputSaliencyNode", "saliency"),
            ("outputSaliencyNode", "denoised_saliency"),
            ("featureChangeNode", "feature_change"),
        ):
            if self.result.get(key) is not None:
                written.append(self.logic.saveVolume(self.result[key], self.output_dir / f"{base}_{suffix}.nrrd"))
        return written

    def close(self) -> None:
        """Stop a running background denoise and detach the volumes from the views.

        Detaching first keeps the scene's teardown quiet: otherwise the views re-run their layer
        pipelines while the display (colour) nodes go away, and VTK prints ``vtkImageMapToColors: No
        LookupTable`` / ``vtkImageExtractComponents`` errors.
        """
        self.cancel_denoise()
        scene = self.app.scene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            comp = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            comp.SetForegroundVolumeID(None)
            comp.SetBackgroundVolumeID(None)
            comp.SetLabelVolumeID(None)
