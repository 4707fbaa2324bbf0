"""FPDenoiseLib: explainable, feature-preserving denoising of CT, X-ray and MR images.

Pure Python + PyTorch backend of the FPDenoise 3D Slicer extension. No Slicer or Qt import here.
See docs/ARCHITECTURE.md for the module map.
"""

__version__ = "0.1.0"
