#!/usr/bin/env bash
# Fresh machine -> every test. Needs only python3 + pip (apt for the browser test, optional:
# without chromium the end-to-end browser test is skipped, everything else still runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"          # first: CPU build from local wheel
.venv/bin/python -m pip install -q -e ".[test,web]"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser end-to-end test will be skipped" >&2
fi
export VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"

# Python 3.9 (what Slicer 5.6/5.8 embed): the library's core tests under a python3.9, opt-in with
# FPDENOISE_PY39=1. Opt-in because torch 2.8 (the newest torch for 3.9) exists on PyPI only as a CUDA
# build: the 3.9 venv is ~7 GB, too much for every CI run. pydicom 2.4 is the newest pydicom for 3.9.
# slicer-core has no 3.9 wheel, so the headless Logic tests (test_slicer_*.py) skip themselves there.
PY39=${PYTHON39:-$(command -v python3.9 || ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python3.9 2>/dev/null | head -n1 || true)}
if [ "${FPDENOISE_PY39:-0}" != 1 ]; then
  echo "Python 3.9 run skipped (set FPDENOISE_PY39=1 to run the core tests under python3.9)"
elif [ -z "$PY39" ]; then
  echo "Python 3.9 run skipped: no python3.9 found (set PYTHON39=/path/to/python3.9)"
else
  [ -x .venv39/bin/python ] || "$PY39" -m venv .venv39
  .venv39/bin/python -c "import torch" 2>/dev/null || .venv39/bin/python -m pip install -q "torch==2.8.0"
  .venv39/bin/python -m pip install -q -e . pytest pytest-timeout
  OMP_NUM_THREADS=1 .venv39/bin/python -m pytest -q -p no:cacheprovider \
    Testing/test_core.py Testing/test_metrics.py Testing/test_noise.py Testing/test_slicer_jobs.py
fi
