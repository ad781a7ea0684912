"""Build the C++ CPU kernels now (otherwise built on first use)."""

from __future__ import annotations

import os
import sys

from ebm_fast import _cpp  # loads lazily: the environment below still decides the build's output


def add_arguments(parser) -> None:
    """No options."""


def main(args) -> int:
    os.environ.setdefault("EBM_FAST_VERBOSE_BUILD", "1")
    error = _cpp.load_error()
    if error is not None:
        print(f"C++ backend: FAILED: {error}", file=sys.stderr)
        return 1
    print("C++ backend: built and loaded")
    return 0
