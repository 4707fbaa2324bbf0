"""Regenerate the screenshots in ``docs/screenshots/`` on the real chest CT slice with Gaussian noise.

    python scripts/make_screenshots.py [--only slicer|web] [--level 0.5] [--chromium /usr/bin/chromium]

* ``slicer_real_ct.png``: the Slicer-like view. A real slicer-core MRML scene with the module's Logic
  (``FPDenoiseSlicerLib.logic.FPDenoiseMRMLLogic``) and two trame-slicer slice views rendered offscreen
  by VTK (EGL): the real slice ``Resources/TestData/real_ct_lung1_slice.nrrd`` (as a 3-slice stack) ->
  ``simulateNoise("gaussian", 0.5)`` (sigma 5 % of the CT window, 205 HU) -> the shipped default model
  (background CLI, as the module runs it) -> four panels: noisy input +
  saliency | denoised + saliency | denoised + feature change vs input | vs the clean image, colour bar, score.
* ``web_real_ct.png``: the browser page (``fpdenoise view``) in headless Chromium after opening the same
  stack through the page's path field, adding the same noise and pressing Denoise.

Needs the ``web`` extra (slicer-core, trame-slicer, Playwright) and Chromium. CPU is enough (~1 min).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "FPDenoise"))  # FPDenoiseSlicerLib (the module's Logic) from a source checkout
REAL_SLICE = REPO / "Resources" / "TestData" / "real_ct_lung1_slice.nrrd"
OUT = REPO / "docs" / "screenshots"
STACK_NAME = "real_ct_lung1_stack.nrrd"


def write_real_ct_stack(folder: Path, n: int = 3) -> Path:
    """The real slice repeated ``n`` times along z (2.5 mm apart) as an int16 NRRD volume in ``folder``."""
    import SimpleITK as sitk

    src = sitk.ReadImage(str(REAL_SLICE))
    arr = sitk.GetArrayFromImage(src)
    arr = arr.reshape((-1,) + arr.shape[-2:])[:1]
    img = sitk.GetImageFromArray(np.repeat(arr, n, axis=0))
    sx, sy = src.GetSpacing()[:2]
    img.SetSpacing((sx, sy, 2.5))
    img.SetOrigin(tuple(src.GetOrigin()[:2]) + (0.0,))
    img.SetMetaData("FPDenoise_modality", "CT")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STACK_NAME
    sitk.WriteImage(img, str(path), True)
    return path


def _save_png(img, path: Path, limit: int = 400_000) -> None:
    """Save as PNG; palette-quantised (256 colours) when the RGB file would exceed ``limit`` bytes."""
    from PIL import Image

    img.save(path, optimize=True)
    scale = 1.0 / 0.9  # first try: full size, 256 colours
    while path.stat().st_size > limit and scale > 0.5:  # noise texture compresses badly: shrink a little
        scale *= 0.9
        small = img.convert("RGB")
        if scale < 0.95:
            small = small.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.LANCZOS)
        small.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    img = Image.open(path)
    print(f"{path.relative_to(REPO)}: {img.size[0]}x{img.size[1]}, {path.stat().st_size // 1024} KB")


def slicer_view(level: float, size: int = 360) -> Path:
    """Render the Slicer-like four-panel view from a real MRML scene (see module docstring)."""
    import slicer
    from PIL import Image, ImageDraw

    from FPDenoiseLib.display import colorbar_rgba, colour_table
    from FPDenoiseWeb.viewer import ViewerSession

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_real_ct_stack(data)
        s = ViewerSession(data_root=data, output_dir=Path(tmp) / "out", device="cpu", offscreen_views=True,
                          view_size=(size, size))
        try:
            s.load(STACK_NAME)
            s.simulate_noise("gaussian", level, seed=0)
            s.set_window_preset("ct_lung")
            s.start_denoise()
            st = s.wait_denoise(timeout=600)
            if st.state != "done":
                raise RuntimeError(f"denoise {st.state}: {st.message}")
            s.set_window_preset("ct_lung")
            s.set_opacity(0.75)
            s.set_slice_index(1)
            s._refresh(fit=True)
            s.set_right_overlay("saliency")
            left, mid = s.capture("Red"), s.capture("Yellow")
            s.set_right_overlay("feature_change")
            right = s.capture("Yellow")
            legend = s.legend()
            # The clean image is known here (simulated noise): the change against it shows where the
            # denoiser lost or blurred structure, without the removed noise that dominates the change
            # against the noisy input. Same display rule, shown on the right view as the module does.
            clean = s.logic.groundTruthFor(s.input_node)
            den = s.logic.getDenoiser(device="cpu")
            vs_clean = den.feature_change_array(
                slicer.util.arrayFromVolume(s.result["outputVolumeNode"]), slicer.util.arrayFromVolume(clean),
                modality="CT",
            ).astype(np.float32)
            node = s.logic._newVolumeLike(s.input_node, vs_clean, f"{clean.GetName()} feature change vs clean")
            s.logic.setSaliencyDisplay(node)
            s.logic.setRightOverlay(node)
            s._refresh()
            vs_clean_rgb = s.capture("Yellow")
            sc = s.scores
            noisy_name = s.input_node.GetName()
        finally:
            s.close()

    titles = (
        f"input: {noisy_name} + saliency |GB|",
        "denoised (shipped model) + saliency |GB|",
        "denoised + feature change |GB(out) - GB(in)|",
        "denoised + feature change vs clean |GB(out) - GB(clean)|",
    )
    head, foot, gap = 26, 58, 4
    w = 4 * size + 3 * gap
    canvas = Image.new("RGB", (w, head + size + foot), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for i, (rgb, title) in enumerate(zip((left, mid, right, vs_clean_rgb), titles)):
        x = i * (size + gap)
        canvas.paste(Image.fromarray(rgb), (x, head))
        draw.text((x + 6, 7), title, fill=(235, 235, 235))
    y = head + size + 8
    bar = colorbar_rgba(200, 12)[::-1].transpose(1, 0, 2)  # horizontal, low on the left
    canvas.paste(Image.fromarray(np.ascontiguousarray(bar[..., :3])), (8, y + 4))
    st, ct = legend["saliency_ticks"], legend["change_ticks"]
    draw.text((216, y + 2), f"Inferno, low -> high; saliency {st[0][1]:.3g}..{st[-1][1]:.3g}, "
              f"change {ct[0][1]:.3g}..{ct[-1][1]:.3g}; below the 60th percentile not drawn", fill=(220, 220, 220))
    draw.text((8, y + 24), f"{legend['score_text']}  |  noisy PSNR {sc.psnr_noisy:.2f} dB, SSIM {sc.ssim_noisy:.3f}"
              f"  ->  denoised PSNR {sc.psnr_denoised:.2f} dB, SSIM {sc.ssim_denoised:.3f}  |  slicer-core MRML scene, "
              "FPDenoise Logic, CT lung window", fill=(220, 220, 220))
    assert colour_table(1.0).shape == (256, 3)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "slicer_real_ct.png"
    _save_png(canvas, path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def web_page(level: float, chromium: str) -> Path:
    """Screenshot of the browser page after Open (real CT stack) -> Add noise -> Denoise."""
    from playwright import sync_api

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        write_real_ct_stack(data)
        port = _free_port()
        log = Path(tmp) / "server.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "FPDenoise")])}
        cmd = [sys.executable, "-m", "FPDenoiseWeb.app", "--port", str(port), "--data-root", str(data),
               "--output-dir", str(out), "--device", "cpu"]  # fmt: skip
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True, env=env)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 120
            while url not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"viewer did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.3)
            time.sleep(1.0)
            with sync_api.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
                try:
                    page = browser.new_page(viewport={"width": 1400, "height": 860})
                    path = open_real_ct_in_page(page, url, level)
                    shot = OUT / "web_real_ct.png"
                    OUT.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(shot))
                finally:
                    browser.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
    from PIL import Image

    _save_png(Image.open(shot).convert("RGB"), shot)
    return path


def open_real_ct_in_page(page, url: str, level: float, timeout_ms: int = 300_000):
    """Drive the page: type the stack's path, Open, Gaussian noise at ``level``, Denoise; wait for the views."""
    page.goto(url)
    page.wait_for_selector("#open-btn", timeout=60_000)
    page.wait_for_timeout(1500)
    page.locator("input#input-path, #input-path input").first.fill(STACK_NAME)
    page.keyboard.press("Escape")
    page.click("#open-btn")
    page.wait_for_function(f"() => document.querySelector('#loaded-name').textContent.includes('{STACK_NAME[:-5]}')",
                           timeout=60_000)
    page.locator(".v-select", has=page.locator("#noise-select")).click()
    page.locator(".v-overlay .v-list-item", has_text="gaussian").first.click()
    set_slider(page, "#noise-level", level)
    page.click("#noise-btn")
    page.wait_for_function("() => document.querySelector('#loaded-name').textContent.includes('gaussian')",
                           timeout=60_000)
    page.click("#denoise-btn")
    page.wait_for_function(
        "() => document.querySelector('#status').textContent.includes('Denoised')"
        " || document.querySelector('#error').textContent.length > 0",
        timeout=timeout_ms,
    )
    err = page.locator("#error").text_content().strip()
    if err:
        raise RuntimeError(err)
    page.wait_for_timeout(3000)
    return OUT / "web_real_ct.png"


def set_slider(page, selector: str, value: float, lo: float = 0.05, hi: float = 1.0) -> None:
    """Click the slider track of ``selector`` where ``value`` lies on ``lo..hi``."""
    track = page.locator(f"{selector} .v-slider-track")
    box = track.bounding_box()
    frac = (value - lo) / (hi - lo)
    page.mouse.click(box["x"] + frac * box["width"], box["y"] + box["height"] / 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("slicer", "web"), default=None)
    ap.add_argument("--level", type=float, default=0.5, help="Gaussian noise level (0.5 = sigma 5 %% of the CT window)")
    ap.add_argument("--chromium", default=os.environ.get("FPDENOISE_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args(argv)
    if args.only in (None, "slicer"):
        slicer_view(args.level)
    if args.only in (None, "web"):
        web_page(args.level, args.chromium)
    return 0


if __name__ == "__main__":
    sys.exit(main())
