"""FPDenoise browser viewer: trame + trame-slicer over the Slicer module's Qt-free Logic.

``fpdenoise view`` (or ``fpdenoise-view``) serves the module's side-by-side noisy / denoised slice
views with Guided-Backprop saliency overlays in a web page. :mod:`FPDenoiseWeb.viewer` holds the
server-free session (scene, Logic, views, background denoising, safety checks on paths);
:mod:`FPDenoiseWeb.app` the trame page and the command line.
"""
