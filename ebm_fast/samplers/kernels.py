"""The fused kernels a chain calls each step, resolved once per chain.

The chains call the backend's ``<op>_out`` entry point directly, without the custom-op layer:
their arguments are contiguous and validated by construction, and the Python dispatch of a
custom op costs ~0.1 ms per call. They call it by keyword: every backend's entry point takes
the same parameter names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ebm_fast.ops._dispatch import kernel_for


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """t, made contiguous only when it is not: is_contiguous() is a cheap attribute read,
    .contiguous() a dispatched op call (microseconds per step on a CPU)."""
    return t if t.is_contiguous() else t.contiguous()


def update_kernel(x: torch.Tensor) -> Callable:
    """langevin_update_out(out, x, grad, step_size, noise_scale, seed, step, stream,
    chain_offset, grad_clip, grad_clip_mode, clamp_lo, clamp_hi) for chains like x."""
    return kernel_for("langevin_update", x)


def accept_kernel(x: torch.Tensor) -> Callable:
    """mala_accept_out(accepted, accept_prob, x, y (the proposal), grad_x, grad_y, energy_x,
    energy_y, step_size, temperature, seed, step, stream, chain_offset) for chains like x."""
    return kernel_for("mala_accept", x)
