#!/usr/bin/env bash
# The GPU check (docs/gpu-check.md): scripts/gpu_check.sh OUT_DIR [--dry-run] [--budget SECONDS]
# Uses the checkout as it is, with no network: the package from this checkout (PYTHONPATH), on
# the machine's own torch and triton; .venv's Python where there is one, else $PYTHON or python3.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m ebm_fast.commands.gpu_check "$@"
