"""How the Triton launchers pass scalars and lay tiles of Philox groups over a tensor.

Scalars (seed, step, 0-dim parameters) reach a kernel through :func:`scalar_arg`: a tensor on the
CPU is read on the host (free, no device sync) and passed by value; a tensor on the kernel's
device is passed by pointer and loaded inside the kernel (:func:`read_scalar`), so counters that
live on the GPU (CUDA graphs) are never read by the host.

:func:`tile_grid` (launcher) and :func:`tile_offsets` (kernel) cover a flat tensor with tiles of
whole Philox groups (four elements n = 4 g + r), whatever the global index of its first element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def scalar_arg(value: torch.Tensor, device: torch.device, name: str):
    """(kernel argument, is_pointer) for a 0-dim tensor used by a kernel running on ``device``."""
    if value.device == device:
        return value, True
    if value.device.type == "cpu":
        return value.item(), False
    raise ValueError(f"{name} is on {value.device} but the kernel runs on {device}")


def counter_args(seed: torch.Tensor, step: torch.Tensor, device: torch.device):
    """(seed argument, step argument, {SEED_IS_POINTER, STEP_IS_POINTER} constexprs) for a kernel
    running on ``device`` that reads both with :func:`read_scalar`."""
    seed_arg, seed_is_pointer = scalar_arg(seed, device, "seed")
    step_arg, step_is_pointer = scalar_arg(step, device, "step")
    return (
        seed_arg,
        step_arg,
        dict(SEED_IS_POINTER=seed_is_pointer, STEP_IS_POINTER=step_is_pointer),
    )


@triton.jit
def read_scalar(arg, IS_POINTER: tl.constexpr):
    """The value of a scalar passed by :func:`scalar_arg`."""
    if IS_POINTER:
        value = tl.load(arg)
    else:
        value = arg
    return value


@triton.jit
def tile_offsets(first_group, GROUPS: tl.constexpr, SHIFT: tl.constexpr):
    """This program's tile over a flat tensor whose element 0 has global index n0.

    The launcher passes first_group = n0 // 4 and SHIFT = n0 % 4 (see :func:`tile_grid`).
    Returns the group indices g (GROUPS,) and the flat positions n - n0 (GROUPS, 4) of the
    elements n = 4 g + r; positions outside [0, numel) must be masked by the caller.
    """
    local = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    flat = local[:, None] * 4 + tl.arange(0, 4)[None, :] - SHIFT
    return first_group + local, flat


def tile_grid(numel: int, n0: int, groups: int):
    """(first_group, SHIFT, grid) for :func:`tile_offsets` over numel elements starting at n0."""
    shift = n0 % 4
    return n0 // 4, shift, (triton.cdiv(triton.cdiv(numel + shift, 4), groups),)
