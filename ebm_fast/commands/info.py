"""List the backends and why any is unavailable."""

from __future__ import annotations

import torch

from ebm_fast.backends import BACKENDS, unavailable_reason


def add_arguments(parser) -> None:
    """No options."""


def main(args) -> int:
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name in BACKENDS:
        reason = unavailable_reason(name)
        print(f"  {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0
