"""Qt-free helpers of the FPDenoise Slicer module (a sub-package so Slicer does not load them as modules).

- :mod:`.logic`: :class:`~.logic.FPDenoiseMRMLLogic`, the module's Logic on any MRML scene.
- :mod:`.process`: background process, progress-line parser, process-tree kill.
- :mod:`.worker`: the background denoise process (``python -m FPDenoiseSlicerLib.worker``).
"""
