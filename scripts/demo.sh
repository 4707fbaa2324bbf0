#!/usr/bin/env bash
# Fresh machine -> denoised sample, two saliency maps and a PNG panel in demo_output/.
# Needs only python3 + pip. torch is installed FIRST and pinned: a bare "torch" requirement
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e .
.venv/bin/fpdenoise demo --out demo_output "$@"
