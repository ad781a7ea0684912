#!/usr/bin/env bash
# Set up (idempotent) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint, format and type checks first (docs/testing.md, "Lint and types"): they fail fast.
CHECKED=(ebm_fast tests benchmarks scripts)
.venv/bin/ruff check "${CHECKED[@]}"
.venv/bin/ruff format --check "${CHECKED[@]}"
.venv/bin/mypy ebm_fast
# The ci hypothesis profile: 100 derandomised examples per property (docs/testing.md), on two
# pytest-xdist workers: most tests keep one core busy, and the project's machines have two.
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} .venv/bin/python -m pytest -q \
    -n "${EBM_FAST_TEST_WORKERS:-2}" "$@"
