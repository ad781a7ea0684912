#!/usr/bin/env bash
# Set up a virtual environment in .venv with the CPU build of PyTorch (pinned on the command line,
# not in the package metadata, so GPU users keep their own torch), the package with its test,
# plotting and bundled-data extras (the demo, study and train commands draw PNGs and read the
# offline digits), and the C++ kernels built once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q "torch==${EBM_FAST_TORCH_VERSION:-2.13.0}" -e '.[test,plots,data]'
.venv/bin/ebm-fast build
