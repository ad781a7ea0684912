#!/usr/bin/env bash
# Set up a virtual environment in .venv with the CPU build of PyTorch (pinned on the command line,
# not in the package metadata, so GPU users keep their own torch), the package, its test extras,
# and the C++ kernels built once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q "torch==${EBM_FAST_TORCH_VERSION:-2.13.0}" -e '.[test]'
.venv/bin/ebm-fast build
