"""The FPDenoise web page (trame + trame-slicer) and its command line.

    fpdenoise view [INPUT] [--model CKPT] [--host 127.0.0.1] [--port N] [--data-root DIR]
                   [--output-dir DIR] [--device auto|cpu|cuda]

Serves two linked Slicer slice views rendered on the server (left: input + saliency overlay, right:
denoised + feature-change or saliency overlay, Inferno colours, colour legend and feature score) with
the module's controls, including a Strength slider that re-runs denoising. All work goes through
:class:`FPDenoiseWeb.viewer.ViewerSession`, i.e. the Slicer module's Logic.

Safety: binds 127.0.0.1 unless ``--host`` says otherwise; then it warns, and a ``--data-root`` must be
given. Only files under the data root (plus the bundled sample) can be opened, and only the output
folder is written to.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

NOISE_CHOICES = (
    "gaussian", "poisson", "speckle", "noncentral_chi", "rician", "salt_pepper", "structured", "thermal",
    "magnetic_field", "chemical_shift", "motion", "wrap_around", "susceptibility", "ct_correlated",
)  # fmt: skip  (same order as FPDenoiseLib.noise.NOISE_NAMES; kept here so --help needs no torch)
MODEL_CHOICES = (
    ("default", "Default (all noise types)"),
    ("ct_texture", "CT scanner noise (CT only)"),
    ("gaussian_ct", "White noise on CT (CT only)"),
    ("mse_twin", "MSE-only twin (ablation)"),
    ("auto", "Automatic (a CT model for a CT scanner's noise or white noise)"),
)  # the names of FPDenoiseLib.inference.MODEL_NAMES (a test keeps them equal)


def add_view_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``view`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser("view", help="browser viewer (trame-slicer): noisy vs denoised with saliency overlays")
    _add_arguments(p)
    p.set_defaults(func=run_view)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", default=None, help="volume file or DICOM series folder to open at start")
    p.add_argument("--model", default="auto",
                   help="checkpoint (.pt) or a model's name (default, ct_texture, gaussian_ct, mse_twin, auto); default: auto "
                   "(the CT scanner-noise model for a CT whose correlated noise the default model keeps, the "
                   "white-noise CT model for a CT with white noise, else the default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1 = this machine only)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument(
        "--data-root", default=None, help="only files below this folder can be opened (default: INPUT's folder or cwd)"
    )
    p.add_argument("--output-dir", default=None, help="the only folder written to (default: <cwd>/fpdenoise_outputs)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_app(session, server=None):
    """Build the trame page for a :class:`~FPDenoiseWeb.viewer.ViewerSession`; returns the trame server."""
    from FPDenoiseSlicerLib.logic import LEFT_VIEW, RIGHT_VIEW
    from trame.app import get_server
    from trame.ui.vuetify3 import SinglePageWithDrawerLayout
    from trame.widgets import html
    from trame.widgets import vuetify3 as v3
    from trame_slicer import module as trame_slicer_module
    from trame_slicer.core import LayoutManager
    from trame_slicer.rca_view import register_rca_factories
    from trame_slicer.views import Layout, LayoutDirection

    from FPDenoiseLib.errors import FPDenoiseError

    from .viewer import WINDOW_PRESETS

    server = server or get_server(None, client_type="vue3")
    server.enable_module(trame_slicer_module)
    state, ctrl = server.state, server.controller
    register_rca_factories(session.app.view_manager, server, slice_view_ui_f=lambda *a: None)
    layouts = LayoutManager(session.app.scene, session.app.view_manager, server)
    layouts.register_layout(
        "side_by_side",
        Layout(LayoutDirection.Horizontal, [session.view_definition(LEFT_VIEW), session.view_definition(RIGHT_VIEW)]),
    )
    layouts.set_layout("side_by_side")
    session.fit_on_resize()

    state.trame__title = "FPDenoise"
    state.update(
        {
            "inputs": session.list_inputs(),
            "input_path": "",
            "loaded_name": "",
            "noise": "rician",
            "noise_level": 0.5,
            "opacity": session.opacity,
            "threshold": session.threshold,
            "strength": session.strength,
            "best_quality": session.ensemble > 1,
            "model_name": session.model or "default",
            "model_names": [{"title": t, "value": v} for v, t in MODEL_CHOICES]
            + ([{"title": Path(session.model).name, "value": session.model}]
               if session.model and session.model not in dict(MODEL_CHOICES) else []),
            "right_overlay": session.right_overlay,
            "legend_gradient": "",
            "legend_sal": "",
            "legend_change": "",
            "score_text": "",
            "wl_preset": None,
            "slice_index": 0,
            "slice_max": 0,
            "running": False,
            "progress": 0.0,
            "status": "Open a volume or the sample.",
            "error": "",
            "scores": "",
            "save_stem": "",
            "saved": "",
            "denoised": False,
        }
    )

    def sync_state() -> None:
        s = session.scores
        parts = []
        legend = session.legend()
        state.legend_gradient = legend["gradient"] if legend else ""
        state.score_text = legend["score_text"] if legend else ""

        def ticks(t):
            return "" if not t else f"{t[0][1]:.3g} … {t[-1][1]:.3g}"

        state.legend_sal = ticks(legend["saliency_ticks"]) if legend else ""
        state.legend_change = ticks(legend["change_ticks"]) if legend else ""
        if s.psnr_noisy is not None:
            parts.append(f"noisy PSNR {s.psnr_noisy:.2f} dB / SSIM {s.ssim_noisy:.3f}")
        if s.psnr_denoised is not None:
            parts.append(f"denoised PSNR {s.psnr_denoised:.2f} dB / SSIM {s.ssim_denoised:.3f}")
        state.scores = " · ".join(parts)
        state.loaded_name = session.input_node.GetName() if session.input_node is not None else ""
        state.slice_max = session.slice_count() - 1
        state.slice_index = session.slice_index()
        state.running = session.running
        state.denoised = session.result is not None
        st = session.status
        state.progress = round(100 * st.fraction, 1)
        if st.state == "running":
            state.status = f"Denoising… {st.message}"
        elif st.state == "done":
            model = dict(MODEL_CHOICES).get(session.run_model, Path(session.run_model).name)
            note = "" if st.message == "done" else f" Note: {st.message}"
            state.status = f"Denoised (model: {model}).{note}"
        elif st.state == "cancelled":
            state.status = "Cancelled."
        elif st.state == "error":
            state.error = st.message

    def guarded(fn):
        def wrapper(*args, **kwargs):
            state.error = ""
            try:
                fn(*args, **kwargs)
            except FPDenoiseError as err:  # user mistakes: one line on the page, server keeps running
                state.error = str(err)
            sync_state()

        return wrapper

    @guarded
    def open_input():
        session.load(state.input_path)
        state.status = f"Opened {state.input_path}."

    @guarded
    def open_sample():
        session.load_sample()
        state.status = "Opened the sample CT."

    @guarded
    def add_noise():
        session.simulate_noise(state.noise, float(state.noise_level), seed=0)
        state.status = f"Added {state.noise} noise (level {float(state.noise_level):.2f}); the clean volume is the ground truth."

    @guarded
    def denoise():
        session.start_denoise()

    @guarded
    def cancel():
        session.cancel_denoise()

    @guarded
    def save():
        written = session.save(state.save_stem or None)
        state.saved = "Saved: " + ", ".join(p.name for p in written) + f" in {session.output_dir}"

    ctrl.open_input, ctrl.open_sample, ctrl.add_noise = open_input, open_sample, add_noise
    ctrl.denoise, ctrl.cancel, ctrl.save = denoise, cancel, save

    @state.change("opacity")
    def _opacity(opacity, **_):
        session.set_opacity(float(opacity))

    @state.change("threshold")
    def _threshold(threshold, **_):
        session.set_threshold(float(threshold))
        sync_state()

    @state.change("right_overlay")
    @guarded
    def _right_overlay(right_overlay=None, **_):
        if right_overlay:
            session.set_right_overlay(right_overlay)

    @state.change("strength")
    @guarded
    def _strength(strength, **_):
        # A new strength re-runs the denoise of the open volume (in the background, cancellable).
        if abs(float(strength) - session.strength) < 1e-9:
            return
        session.set_strength(float(strength))
        if session.input_node is not None and session.result is not None:
            session.cancel_denoise()
            session.start_denoise()

    @state.change("best_quality")
    @guarded
    def _best_quality(best_quality=False, **_):
        # as a new strength: re-runs the denoise of the open volume
        if bool(best_quality) == (session.ensemble > 1):
            return
        session.set_best_quality(bool(best_quality))
        if session.input_node is not None and session.result is not None:
            session.cancel_denoise()
            session.start_denoise()

    @state.change("model_name")
    @guarded
    def _model(model_name=None, **_):
        # Another model re-runs the denoise of the open volume, as a new strength does.
        if (model_name or "default") == (session.model or "default"):
            return
        session.set_model(None if model_name == "default" else model_name)
        if session.input_node is not None and session.result is not None:
            session.cancel_denoise()
            session.start_denoise()

    @state.change("wl_preset")
    @guarded
    def _preset(wl_preset=None, **_):
        if wl_preset:
            session.set_window_preset(wl_preset)

    @state.change("slice_index")
    def _slice(slice_index, **_):
        if int(slice_index) != session.slice_index():
            session.set_slice_index(int(slice_index))

    async def poll_loop():
        # The background denoise is a separate process; polling keeps the page live meanwhile.
        while True:
            await asyncio.sleep(0.25)
            if session.running:
                with state:
                    try:
                        session.poll_denoise()
                    except FPDenoiseError as err:
                        state.error = str(err)
                    sync_state()

    ctrl.on_server_ready.add(lambda **_: asyncio.ensure_future(poll_loop()))

    with SinglePageWithDrawerLayout(server, full_height=True) as page:
        page.title.set_text("FPDenoise — explainable, feature-preserving denoising")
        with page.toolbar:
            v3.VSpacer()
            html.Div("{{ loaded_name }}", classes="text-subtitle-1 mr-4", id="loaded-name")
        with page.drawer as drawer:
            drawer.width = 340
            with v3.VContainer(classes="pa-3"):
                v3.VCombobox(
                    v_model=("input_path",), items=("inputs",), label="Volume / DICOM folder (under data root)",
                    density="compact", hide_details=True, id="input-path",
                )
                with v3.VRow(classes="ma-0 my-2", dense=True):
                    v3.VBtn("Open", click=ctrl.open_input, size="small", classes="mr-2", id="open-btn")
                    v3.VBtn("Sample CT", click=ctrl.open_sample, size="small", id="sample-btn")
                v3.VDivider(classes="my-2")
                html.Div("Simulate noise (ground truth = clean volume)", classes="text-caption")
                v3.VSelect(v_model=("noise",), items=("noise_names", list(NOISE_CHOICES)), density="compact",
                           hide_details=True, id="noise-select")
                with html.Div(id="noise-level"):
                    v3.VSlider(v_model=("noise_level",), min=0.05, max=1.0, step=0.05, label="Level",
                               density="compact", hide_details=True, thumb_label=True)
                v3.VBtn("Add noise", click=ctrl.add_noise, size="small", disabled=("!loaded_name || running",),
                        id="noise-btn")
                v3.VDivider(classes="my-2")
                with v3.VRow(classes="ma-0", dense=True):
                    v3.VBtn("Denoise", click=ctrl.denoise, color="primary", disabled=("!loaded_name || running",),
                            id="denoise-btn", classes="mr-2")
                    v3.VBtn("Cancel", click=ctrl.cancel, disabled=("!running",), id="cancel-btn")
                v3.VSelect(v_model=("model_name",), items=("model_names",), label="Model", density="compact",
                           hide_details=True, disabled=("running",), id="model-select", classes="mt-2")
                with html.Div(id="strength"):
                    v3.VSlider(v_model=("strength",), min=0, max=2, step=0.25, label="Strength",
                               density="compact", hide_details=True, thumb_label=True, disabled=("running",))
                html.Div("0 = unchanged · 0.5 low · 1 medium (as trained) · 2 high; changing it re-runs Denoise",
                         classes="text-caption")
                v3.VCheckbox(v_model=("best_quality",), label="Best quality (8 passes, ~8x slower)",
                             density="compact", hide_details=True, disabled=("running",), id="best-quality")
                v3.VProgressLinear(model_value=("progress",), height=8, classes="my-2", id="progress")
                html.Div("{{ status }}", classes="text-caption", id="status")
                html.Div("{{ error }}", classes="text-caption text-error", id="error")
                html.Div("{{ scores }}", classes="text-body-2 my-1", id="scores")
                # Colour legend of the overlays (same table and window rule as Slicer and the PNG panels).
                with html.Div(v_show=("legend_gradient",), id="legend", classes="my-1"):
                    html.Div("{{ score_text }}", classes="text-body-2 font-weight-bold", id="score-text")
                    html.Div(style=("{ background: legend_gradient, height: '12px', borderRadius: '2px' }",),
                             id="colorbar")
                    html.Div("low → high · values at or below the background percentile are not drawn",
                             classes="text-caption")
                    html.Div("saliency |GB|: {{ legend_sal }}", classes="text-caption", id="legend-sal")
                    html.Div("feature change |GB(denoised) − GB(input)|: {{ legend_change }}",
                             classes="text-caption", id="legend-change")
                html.Div("Right overlay", classes="text-caption mt-2")
                with v3.VBtnToggle(v_model=("right_overlay",), density="compact", divided=True, variant="outlined",
                                   id="right-overlay", mandatory=True):
                    v3.VBtn("Feature change", value="feature_change", size="x-small")
                    v3.VBtn("Saliency", value="saliency", size="x-small")
                v3.VDivider(classes="my-2")
                with html.Div(id="opacity"):
                    v3.VSlider(v_model=("opacity",), min=0, max=1, step=0.05, label="Overlay opacity",
                           density="compact", hide_details=True, thumb_label=True)
                with html.Div(id="threshold"):
                    v3.VSlider(v_model=("threshold",), min=0, max=99, step=1, label="Hide background (percentile)",
                           id="threshold", density="compact", hide_details=True, thumb_label=True)
                with html.Div(id="slice"):
                    v3.VSlider(v_model=("slice_index",), min=0, max=("slice_max",), step=1, label="Slice",
                           density="compact", hide_details=True, thumb_label=True)
                html.Div("Window / level", classes="text-caption mt-2")
                with v3.VBtnToggle(v_model=("wl_preset",), density="compact", divided=True, variant="outlined"):
                    for key, text in zip(WINDOW_PRESETS, ("Lung", "Soft tissue", "Bone", "X-ray auto")):
                        v3.VBtn(text, value=key, size="x-small")
                v3.VDivider(classes="my-2")
                v3.VTextField(v_model=("save_stem",), label="Save as (name)", density="compact", hide_details=True)
                v3.VBtn("Save outputs", click=ctrl.save, size="small", disabled=("!denoised",), classes="mt-2",
                        id="save-btn")
                html.Div("{{ saved }}", classes="text-caption", id="saved")
        with page.content:
            # Not `inset:0`: an absolute box is placed in its containing block's *padding* box (here the
            # whole window), so the views slid under the drawer, toolbar and footer and the left view lost
            # its left 340 px (it looked zoomed in and off-centre). Vuetify's VMain publishes the space
            # its bars take as --v-layout-* (they follow the drawer being toggled: views resize and refit).
            views_style = (
                "position:absolute; top:var(--v-layout-top, 0px); bottom:var(--v-layout-bottom, 0px);"
                " left:var(--v-layout-left, 0px); right:var(--v-layout-right, 0px);"
            )
            with html.Div(style=views_style, id="views"):
                layouts.initialize_layout_grid(page)
    return server


def run_view(args: argparse.Namespace) -> int:
    """Start the viewer from parsed arguments; blocks while serving."""
    from FPDenoiseLib.errors import InputError

    from .viewer import ViewerSession, is_loopback, resolve_under

    if not is_loopback(args.host):
        print(
            f"warning: serving on {args.host}: anyone who can reach this address can view and denoise the files "
            "under --data-root; use 127.0.0.1 with an SSH tunnel where possible",
            file=sys.stderr,
        )
        if not args.data_root:
            raise InputError(f"--host {args.host}: give --data-root (the only folder whose files are served)")
    if args.data_root:
        root = Path(args.data_root)
    elif args.input:
        root = Path(args.input).expanduser().resolve().parent
    else:
        root = Path.cwd()
    if not root.is_dir():
        raise InputError(f"{root}: data root is not a folder")
    output_dir = Path(args.output_dir) if args.output_dir else Path.cwd() / "fpdenoise_outputs"
    session = ViewerSession(data_root=root, output_dir=output_dir, model=args.model, device=args.device)
    server = build_app(session)
    if args.input:
        session.load(resolve_under(root, Path(args.input).expanduser().resolve()))
        server.state.loaded_name = session.input_node.GetName()
        server.state.slice_max = session.slice_count() - 1
    port = args.port or free_port(args.host)
    host_in_url = f"[{args.host}]" if ":" in args.host else args.host
    print(f"FPDenoise viewer: http://{host_in_url}:{port}/  (data root {root}, outputs {output_dir})", flush=True)
    argv, sys.argv = sys.argv, sys.argv[:1]  # trame would parse our command line as its own
    try:
        server.start(host=args.host, port=port, open_browser=False, show_connection_info=False)
    finally:
        sys.argv = argv
        session.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``fpdenoise-view`` console script."""
    from FPDenoiseLib.errors import FPDenoiseError

    parser = argparse.ArgumentParser(prog="fpdenoise-view", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_view(args)
    except FPDenoiseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
