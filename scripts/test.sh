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
