"""Load the repository's stand-alone scripts (benchmarks/, scripts/, examples/) as modules in the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str, name: str | None = None) -> ModuleType:
    """Import ``REPO / relpath`` as module ``name`` (default: the file's stem), registered in ``sys.modules``
    so its dataclasses and pickling resolve the module by name."""
    name = name or Path(relpath).stem
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
