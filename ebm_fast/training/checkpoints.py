"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (model, EMA and
optimiser state dicts, the loss's sampler counters and buffer, the data order, the global RNG
states, the iteration), so loading it never unpickles code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_save", "load", "atomic_write_text"]


def _atomic_replace(path: Path, write) -> None:
    """write(file) into a temporary file next to path, flushed to disk, then os.replace: a crash
    mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save(obj: dict, path) -> None:
    """torch.save(obj, path) atomically (temporary file + os.replace)."""
    _atomic_replace(Path(path), lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path) -> None:
    """Replace the text file at path atomically."""
    _atomic_replace(Path(path), lambda f: f.write(text.encode()))


def load(path, map_location=None) -> dict:
    """A checkpoint dict, loaded with weights_only=True (no code is unpickled). A missing file
    is a FileNotFoundError, an unreadable one (truncated, damaged, holding code) a ValueError,
    each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # What torch.load raises on a cut or damaged file: an empty one, a zip without its
    # directory, a cut record, a pickle holding code.
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError) as exc:
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or damaged?): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a checkpoint dict (got {type(state).__name__})")
    return state
