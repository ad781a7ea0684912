"""Resolve an op's kernel for the backend that serves a device.

Every op follows one convention on every backend: an entry point named ``<op>_out`` whose first
argument is a contiguous output tensor it writes into, followed by the op's normalised inputs
(contiguous tensors, parameters already validated by the op's Python wrapper):

* reference: ``ebm_fast.reference.<op>.<op>_out``
* cpu:       ``torch.ops.ebm_fast_cpu.<op>_out`` (registered by ebm_fast/csrc/<op>.cpp)
* triton:    ``ebm_fast.kernels.triton.<op>.<op>_out``
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch

from ebm_fast import _cpp
from ebm_fast.backends import backend_for, forced_backend


def kernel_entry(op: str, backend: str) -> Callable:
    name = f"{op}_out"
    if backend == "cpu":
        # The overload itself: calling it skips the packet's overload resolution (5 us per
        # call instead of 8 on this CPU, for every update of a sampler).
        return getattr(_cpp.ops(), name).default
    package = {"reference": "ebm_fast.reference", "triton": "ebm_fast.kernels.triton"}[backend]
    return getattr(importlib.import_module(f"{package}.{op}"), name)


def kernel_for(op: str, device: torch.device) -> Callable:
    """The ``<op>_out`` entry point of the backend chosen for ``device``."""
    return kernel_entry(op, backend_for(device))


def float_kernel_for(op: str, x: torch.Tensor) -> Callable:
    """``kernel_for`` for an op whose Triton kernel computes in float32 only: float64 tensors go
    to the reference unless a backend is forced. Callers running many steps on the same
    tensors (the samplers) resolve it once."""
    backend = backend_for(x.device)
    if backend == "triton" and x.dtype == torch.float64 and forced_backend() is None:
        backend = "reference"
    return kernel_entry(op, backend)


def call_op(registered_op: Callable, implementation: Callable, *args):
    """Run an op: torch.compile traces the registered custom op; eager calls run the same
    implementation directly. The custom-op dispatcher costs about 0.1 ms of Python per call on a
    CPU (measured: 100 us against 9 us for a 16-element langevin_update), as much as the whole
    update of a few hundred thousand elements."""
    if torch.compiler.is_compiling():
        return registered_op(*args)
    return implementation(*args)


# Global element indices n of the noise spec stay below this: int64 arithmetic in the reference
# and the kernels never overflows.
MAX_ELEMENT_INDEX = 1 << 62


def check_int(value, name: str, low: int, high: int) -> int:
    """value, an int in [low, high); else a TypeError or ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def check_chain_offset(chain_offset, shape) -> int:
    """chain_offset of a (chains, ...) tensor of draws: an int >= 0 that keeps every global
    element index (chain_offset + chain) * elements_per_chain + j below 2**62."""
    chain_offset = check_int(chain_offset, "chain_offset", 0, MAX_ELEMENT_INDEX)
    if (chain_offset + shape[0]) * math.prod(shape[1:]) > MAX_ELEMENT_INDEX:
        raise ValueError(f"chain_offset {chain_offset} with shape {tuple(shape)} gives global "
                         "element indices beyond 2**62")
    return chain_offset


def check_devices(device: torch.device, owner: str, **tensors) -> None:
    """Each given tensor (None skipped) must be on ``device``, the device of ``owner``: the
    kernels read raw pointers, so a tensor elsewhere would be read from the wrong memory."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {owner} is on {device}")


def as_int64_scalar(value, name: str, bits: int) -> torch.Tensor:
    """A seed (bits=64) or step counter (bits=32), given as int or 0-dim integer tensor, as a
    0-dim int64 tensor. Ints stay on the CPU (free to read on every backend); tensors keep their
    device so a CUDA-graph-captured counter is read by the kernel, never by the host."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex \
                or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int or a 0-dim integer tensor, got "
                            f"{tuple(value.shape)} {value.dtype}")
        return value if value.dtype == torch.int64 else value.to(torch.int64)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a 0-dim integer tensor, got {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} must be in [0, 2**{bits}), got {value}")
    if value >= 1 << 63:  # a 64-bit seed: keep its bits as two's complement
        value -= 1 << 64
    return torch.tensor(value, dtype=torch.int64)
