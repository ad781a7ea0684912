"""argparse types the experiment commands share: a bad option is a usage error (exit 2) that
names it, raised while parsing, before any work starts. Numbers go through the library's own
rules (ebm_fast.validation); the rest is what only a command line has: files and devices."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ebm_fast import validation

__all__ = [
    "count",
    "non_negative_count",
    "grid_cells",
    "positive_real",
    "non_negative_real",
    "probability",
    "seed",
    "output_file",
    "output_dir",
    "device",
    "PRECISIONS",
]

#: --precision choices -> the samplers' autocast option: "auto" (bf16 where the device computes
#: it natively, else fp32; ebm_fast.precision), or an explicit dtype for the energy's passes.
PRECISIONS = {"auto": "auto", "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

count = validation.argparse_type(validation.integer, low=1)
non_negative_count = validation.argparse_type(validation.integer, low=0)
grid_cells = validation.argparse_type(validation.integer, low=2)
positive_real = validation.argparse_type(validation.real, low=0.0, low_open=True)
non_negative_real = validation.argparse_type(validation.real, low=0.0)
probability = validation.argparse_type(validation.real, low=0.0, high=1.0)
# The experiments derive a few seeds as seed + small offsets: below 2**63 they all stay 64-bit.
seed = validation.argparse_type(validation.integer, low=0, high=2**63)


def output_file(text: str) -> str:
    """A file the command will write at the end: its directory must exist and be writable now,
    so that a long run does not die at its last line."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, expected a file name")
    folder = path.parent  # "." for a bare file name
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} is not writable")
    return text


def output_dir(text: str) -> Path:
    """A directory the command will write into (created at the end if missing): it, or the
    folder that will hold it, must be writable now."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    existing = path if path.exists() else path.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"directory {existing} does not exist")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{existing} is not writable")
    return path


def device(text: str) -> str:
    """argparse type for an option with choices ("cpu", "cuda"): "cuda" only where torch sees a
    GPU (the choices themselves are argparse's to check)."""
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            "cuda requested, but torch sees no CUDA device here "
            f"(torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda})"
        )
    return text
