"""Which kernel implementations loaded, and which one runs for a given tensor.

Backends: ``reference`` (pure torch, any device), ``cpu`` (the C++ extension in ebm_fast/csrc,
built on first use and cached), ``triton`` (CUDA tensors; CPU tensors too under
TRITON_INTERPRET=1, but only when forced). ``auto`` picks the fastest one that serves the tensor's
device. A missing backend never breaks import: the first time it would have been picked, one
warning says what is missing and how to get it, and the next backend runs instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

import torch

from ebm_fast import validation

KERNEL_BACKENDS = ("reference", "cpu", "triton")
# What use_backend and a sampler's backend= accept: "auto" leaves the choice to backend_for.
BACKENDS = ("auto",) + KERNEL_BACKENDS

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ebm_fast_forced_backend", default=None
)


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({exc}); install it with `pip install 'ebm_fast[gpu]'`"
    return None


def _triton_unavailable_reason() -> str | None:
    reason = _triton_import_error()
    if reason is None and not (torch.cuda.is_available() or triton_interpret()):
        reason = "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    return reason


def _cpu_unavailable_reason() -> str | None:
    from ebm_fast import _cpp

    return _cpp.load_error()


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name not in KERNEL_BACKENDS:  # backend_for asks on every op: the rule only for a bad name
        validation.choice(name, "backend", KERNEL_BACKENDS)
    if name == "cpu":
        return _cpu_unavailable_reason()
    if name == "triton":
        return _triton_unavailable_reason()
    return None


def available_backends() -> list[str]:
    """The backends that loaded on this machine (the C++ one is built on first call)."""
    return [name for name in KERNEL_BACKENDS if unavailable_reason(name) is None]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for every op inside the block (tests, benchmarks, bug reports).

    ``use_backend("auto")`` restores automatic choice. Raises ValueError for an unknown name and
    RuntimeError for a backend that cannot run here (TypeError for a name not a string).
    """
    if validation.choice(name, "backend", BACKENDS) != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
    token = _forced_backend.set(None if name == "auto" else name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


def forced_backend() -> str | None:
    return _forced_backend.get()


_warned: set[str] = set()


def _warn_once(name: str, reason: str, fallback: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"ebm_fast: the {name!r} backend is not available ({reason}); using {fallback!r}.",
            RuntimeWarning,
            stacklevel=3,
        )


def backend_for(device: torch.device) -> str:
    """The backend an op runs on for tensors on ``device``."""
    forced = _forced_backend.get()
    if forced is not None:
        if forced == "cpu" and device.type != "cpu":
            raise RuntimeError(f"backend 'cpu' was forced but the tensors are on {device}")
        if forced == "triton" and device.type == "cpu" and not triton_interpret():
            raise RuntimeError(
                "backend 'triton' was forced for CPU tensors; set TRITON_INTERPRET=1 to run "
                "the Triton kernels on the CPU"
            )
        return forced
    preferred = {"cpu": "cpu", "cuda": "triton"}.get(device.type)
    if preferred is None:
        return "reference"
    reason = unavailable_reason(preferred)
    if reason is None:
        return preferred
    _warn_once(preferred, reason, "reference")
    return "reference"
