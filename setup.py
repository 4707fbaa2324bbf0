"""Build hook: the wheel carries the shipped models and the sample volume as package data.

``Resources/`` at the repository root stays the one source of truth (the Slicer extension's CMake
installs from it too); at build time its ``Models/`` and ``SampleData/`` files are copied into the
wheel as ``FPDenoiseLib/Resources/``, where :func:`FPDenoiseLib.inference.resources_dir` finds them.
Editable installs copy nothing: they read ``<checkout>/Resources`` directly. Everything else about the
package is in ``pyproject.toml``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Resources/<folder> -> file patterns that go into the wheel (training and test data stay out).
SHIPPED = {"Models": ("*.pt", "README.md"), "SampleData": ("*.nrrd", "README.md")}


def shipped_resources(root: Path = ROOT) -> list[Path]:
    """The files under ``root/Resources`` that the wheel carries, relative to ``root/Resources``."""
    found = []
    for folder, patterns in SHIPPED.items():
        for pattern in patterns:
            found += [p.relative_to(root / "Resources") for p in (root / "Resources" / folder).glob(pattern)]
    return sorted(set(found))


class BuildPyWithResources(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        files = shipped_resources()
        if not any(f.suffix == ".pt" for f in files):
            raise SystemExit(f"setup.py: no model under {ROOT / 'Resources' / 'Models'}; the wheel would not denoise")
        target = Path(self.build_lib) / "FPDenoiseLib" / "Resources"
        for rel in files:
            self.mkpath(str((target / rel).parent))
            self.copy_file(str(ROOT / "Resources" / rel), str(target / rel))


setup(cmdclass={"build_py": BuildPyWithResources})
