"""The package as users install it: a real wheel in a fresh venv, and the library's import boundary.

The wheel test builds ``fpdenoise-*.whl`` from a copy of the checkout, installs it (no dependencies)
into a new venv whose only extra path is this interpreter's site-packages (torch etc. are reused; the
editable install's import hook lives in a ``.pth`` there, which a path added by a ``.pth`` does not run),
and runs the installed ``fpdenoise`` from a folder outside the checkout: the default model, the sample
and the viewer's Slicer Logic must all come from the venv.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Top-level folders of the checkout a build does not need (copying them only costs time).
_NOT_COPIED = {".git", ".venv", ".venv39", "build", "dist", "runs", "data", "out", "demo_output", "Testing",
               "docs", "benchmarks", "examples", "scripts", "node_modules"}


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "FPDENOISE_RESOURCES")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1", **extra)
    return env


def _run(cmd: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _copy_checkout(dest: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(folder).resolve() == REPO:
            skip |= _NOT_COPIED & set(names)
        return skip

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def _host_site_dirs() -> list[str]:
    dirs = list(site.getsitepackages()) + [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    out = []
    for d in dirs:
        p = Path(d)
        if p.is_dir() and str(p) not in out:
            out.append(str(p))
    return out


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv with the built wheel installed; returns the venv folder."""
    pytest.importorskip("setuptools")
    root = tmp_path_factory.mktemp("wheel")
    src = _copy_checkout(root / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src, "-w", root / "dist"],
         cwd=root)
    wheels = sorted((root / "dist").glob("fpdenoise-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root).stdout.strip()
    # Reuse this interpreter's installed dependencies (torch is too big to install per test).
    (Path(purelib) / "_fpdenoise_test_host.pth").write_text("\n".join(_host_site_dirs()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheels[0]],
         cwd=root)
    return venv


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / (name + (".exe" if os.name == "nt" else ""))


def test_wheel_imports_from_the_venv_with_models_sample_and_viewer_logic(wheel_venv, tmp_path):
    check = textwrap.dedent(f"""
        import importlib.util, sys
        from pathlib import Path
        venv = Path({str(wheel_venv.resolve())!r})
        import FPDenoiseLib, FPDenoiseLib.cli
        from FPDenoiseLib import inference
        assert venv in Path(FPDenoiseLib.__file__).resolve().parents, FPDenoiseLib.__file__
        assert "FPDenoiseWeb" not in sys.modules
        assert venv in inference.resources_dir().resolve().parents, inference.resources_dir()
        assert inference.default_model_path().is_file(), inference.default_model_path()
        assert inference.default_twin_path().is_file(), inference.default_twin_path()
        assert inference.sample_data_path().is_file(), inference.sample_data_path()
        import FPDenoiseSlicerLib, FPDenoiseWeb
        for mod in (FPDenoiseSlicerLib, FPDenoiseWeb):
            assert venv in Path(mod.__file__).resolve().parents, mod.__file__
        if importlib.util.find_spec("slicer") is not None:   # the [web] extra: the viewer imports
            import FPDenoiseWeb.viewer, FPDenoiseWeb.app
            assert venv in Path(sys.modules["FPDenoiseSlicerLib.logic"].__file__).resolve().parents
            print("viewer imported")
        """)
    proc = _run([_bin(wheel_venv, "python"), "-c", check], cwd=tmp_path)
    if "viewer imported" not in proc.stdout:
        pytest.skip("wheel checked; viewer import skipped (slicer-core not installed)")


def test_installed_fpdenoise_lists_noises_and_denoises_with_the_default_model(wheel_venv, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    from FPDenoiseLib.noise import NOISE_NAMES

    fpdenoise = _bin(wheel_venv, "fpdenoise")
    out = _run([fpdenoise, "noises"], cwd=tmp_path).stdout.split()
    assert out == list(NOISE_NAMES)

    rng = np.random.default_rng(0)
    vol = (rng.normal(0, 40, (2, 32, 40)) + 40).astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.7, 0.8, 2.5))
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    _run([fpdenoise, "denoise", "in.nrrd", "out.nrrd", "--device", "cpu"], cwd=tmp_path)
    res = sitk.ReadImage(str(tmp_path / "out.nrrd"))
    arr = sitk.GetArrayFromImage(res)
    assert arr.shape == vol.shape
    assert res.GetSpacing() == pytest.approx((0.7, 0.8, 2.5))
    assert not np.array_equal(arr, vol)  # the model ran


def test_library_does_not_import_the_web_app():
    """FPDenoiseLib (the CLI included) imports no FPDenoiseWeb at import time: the viewer is optional."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import FPDenoiseLib, FPDenoiseLib.cli
        assert "FPDenoiseWeb" not in sys.modules, "FPDenoiseLib.cli imported FPDenoiseWeb"
        for info in pkgutil.walk_packages(FPDenoiseLib.__path__, "FPDenoiseLib."):
            importlib.import_module(info.name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("FPDenoiseWeb", "FPDenoiseSlicerLib", "slicer"))
        assert not leaked, leaked
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
