"""Python requirements of FPDenoiseLib inside Slicer: checked by installed distribution version, installed
with the user's consent, torch through the PyTorch extension. No Qt (the consent dialog is a callback).

* Versions come from :mod:`importlib.metadata` (the *distribution*: ``pydicom 2.4.4``, ``scikit-image``),
  compared with :mod:`packaging` specifiers; an importable but too old package counts as unmet (Slicer
  5.6/5.8 bundle pydicom 2.4, which the DICOM writer accepts only on their Python 3.9).
* :data:`REQUIREMENTS` are pyproject.toml's ``[project] dependencies``, markers included (a test compares
  them); a requirement whose marker does not apply to this Python is skipped.
* torch is installed by the PyTorch extension's ``PyTorchUtils`` module, which picks the build matching
  the machine's GPU driver (CUDA or CPU), as SlicerTotalSegmentator and MONAIAuto3DSeg do; without that
  extension the error says so (the extension declares ``EXTENSION_DEPENDS PyTorch``).
* After installing, :func:`importlib.invalidate_caches` so the new packages import in this session.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Same strings as pyproject.toml [project] dependencies (Testing/test_slicer_logic.py checks it).
REQUIREMENTS = (
    "torch>=2.2",
    "numpy>=1.24",
    "scipy>=1.10",
    "scikit-image>=0.22",
    "pydicom>=3.0; python_version >= '3.10'",
    "pydicom>=2.4; python_version < '3.10'",
    "SimpleITK>=2.3",
    "tqdm>=4.60",
    "PyWavelets>=1.4",
    "matplotlib>=3.7",
    "pillow>=10",
    "tifffile>=2023.1",
)
PYTORCH_EXTENSION_MISSING = (
    "FPDenoise requires the PyTorch extension, which installs the PyTorch build matching this computer's "
    "GPU. Install 'PyTorch' from the Extensions Manager, restart Slicer and try again."
)


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # pip's vendored copy is always there
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import Version
    return Requirement, Version


@dataclass(frozen=True)
class RequirementStatus:
    """One requirement and what is installed: ``installed`` is the distribution's version or None."""

    requirement: str  # without its marker, e.g. "pydicom>=3.0"
    name: str
    installed: str | None

    @property
    def ok(self) -> bool:
        if self.installed is None:
            return False
        Requirement, Version = _packaging()
        try:
            return Requirement(self.requirement).specifier.contains(Version(self.installed), prereleases=True)
        except Exception:  # an unparsable local version: present is the best we can say
            return True

    @property
    def problem(self) -> str:
        """"" when met, else e.g. "pydicom: 2.4.4 installed, needs pydicom>=3.0"."""
        if self.ok:
            return ""
        if self.installed is None:
            return f"{self.name}: not installed (needs {self.requirement})"
        return f"{self.name}: {self.installed} installed, needs {self.requirement}"


def checkRequirements(requirements: Sequence[str] = REQUIREMENTS, environment: dict | None = None) -> list:
    """:class:`RequirementStatus` of every requirement whose marker applies (``environment``: marker
    variables to override, e.g. ``{"python_version": "3.9"}``)."""
    Requirement, _ = _packaging()
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        out.append(RequirementStatus(f"{req.name}{req.specifier}", req.name, installed))
    return out


def unmetRequirements(requirements: Sequence[str] = REQUIREMENTS, environment: dict | None = None) -> list:
    """The requirements that are missing or too old."""
    return [s for s in checkRequirements(requirements, environment) if not s.ok]


def installRequirements(
    unmet: Sequence[RequirementStatus],
    *,
    confirm: Callable[[str], bool],
    pipInstall: Callable | None = None,
) -> bool:
    """Install ``unmet`` after ``confirm(message)`` says yes; False when the user declined.

    torch goes through ``PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
    torchVersionRequirement=...)`` (a RuntimeError names the PyTorch extension when it is missing); the
    others through ``pipInstall`` (default ``slicer.util.pip_install``).
    """
    unmet = [s for s in unmet if not s.ok]
    if not unmet:
        return True
    torch = [s for s in unmet if s.name.lower() == "torch"]
    others = [s for s in unmet if s.name.lower() != "torch"]
    torchLogic = None
    if torch:  # before asking anything: without the extension there is nothing to agree to
        torchLogic = _torchLogic()
    lines = "\n".join(f"  - {s.problem}" for s in unmet)
    if not confirm(
        f"FPDenoise needs these Python packages:\n{lines}\n\nInstall them now? This downloads packages and may "
        "take several minutes (PyTorch through the PyTorch extension, the others with pip); Slicer may need a "
        "restart afterwards."
    ):
        return False
    if torch:
        spec = torch[0].requirement[len(torch[0].name):]
        if torch[0].installed is None or not torchLogic.torchInstalled():
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=spec) is None:
                raise RuntimeError(f"PyTorch was not installed; FPDenoise needs torch{spec}.")
        else:
            raise RuntimeError(
                f"PyTorch {torch[0].installed} is installed but FPDenoise needs torch{spec}. Use the 'PyTorch "
                f"Utils' module to install it with the version requirement '{spec}', then restart Slicer."
            )
    if others:
        if pipInstall is None:
            import slicer

            pipInstall = slicer.util.pip_install
        pipInstall([s.requirement for s in others])
    importlib.invalidate_caches()
    return True


def _torchLogic():
    try:
        import PyTorchUtils
    except ModuleNotFoundError as err:
        raise RuntimeError(PYTORCH_EXTENSION_MISSING) from err
    return PyTorchUtils.PyTorchUtilsLogic()
