"""Qt-free helpers of the FPDenoise Slicer module (a sub-package so Slicer does not load them as modules).

- :mod:`.logic`: :class:`~.logic.FPDenoiseMRMLLogic`, the module's Logic on any MRML scene.
- :mod:`.jobs`: background jobs (denoise = the library CLI ``python -m FPDenoiseLib.cli denoise``,
  training = ``... train``), cancelled on scene close.
- :mod:`.process`: background process, progress-line parser, process-tree kill.
- :mod:`.views`: colour node, saliency display rule, side-by-side slice views (a base of the Logic).
- :mod:`.dependencies`: library requirements by installed version; torch through the PyTorch extension.
"""
