"""Triton ``philox_out``: fill a (chains, ...) tensor with draws from the noise spec.

One program per tile of GROUPS x 4 elements; Philox (and Box-Muller) run once per four elements.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ebm_fast.kernels.triton._launch import counter_args, read_scalar, tile_grid, tile_offsets
from ebm_fast.kernels.triton._noise_spec import spec_normal_tile, spec_uniform_tile, spec_words_tile

GROUPS = 512
NUM_WARPS = 4
_DISTRIBUTIONS = {
    "bits": (0, torch.int32),
    "uniform": (1, torch.float32),
    "normal": (2, torch.float32),
}


@triton.jit(do_not_specialize=["seed", "step", "first_group"])
def _philox_kernel(
    out_ptr,
    seed,
    step,
    stream,
    first_group,
    numel,
    SEED_IS_POINTER: tl.constexpr,
    STEP_IS_POINTER: tl.constexpr,
    DISTRIBUTION: tl.constexpr,
    SHIFT: tl.constexpr,
    GROUPS: tl.constexpr,
):
    seed = read_scalar(seed, SEED_IS_POINTER)
    step = read_scalar(step, STEP_IS_POINTER)
    g, flat = tile_offsets(first_group, GROUPS, SHIFT)
    mask = (flat >= 0) & (flat < numel)
    if DISTRIBUTION == 0:
        values = spec_words_tile(seed, step, stream, g).to(tl.int32, bitcast=True)
    elif DISTRIBUTION == 1:
        values = spec_uniform_tile(seed, step, stream, g)
    else:
        values = spec_normal_tile(seed, step, stream, g)
    tl.store(out_ptr + flat, values, mask=mask)


def philox_out(
    out: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    stream: int,
    chain_offset: int,
    distribution: str,
) -> None:
    """Write the spec's draws for the elements of ``out`` (contiguous, shape (chains, ...))."""
    code, dtype = _DISTRIBUTIONS[distribution]
    if out.dtype != dtype:
        raise TypeError(f"out must be {dtype} for distribution {distribution!r}, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.numel() == 0:
        return
    per_chain = math.prod(out.shape[1:])
    first_group, shift, grid = tile_grid(out.numel(), chain_offset * per_chain, GROUPS)
    seed_arg, step_arg, counter_flags = counter_args(seed, step, out.device)
    _philox_kernel[grid](
        out,
        seed_arg,
        step_arg,
        stream,
        first_group,
        out.numel(),
        **counter_flags,
        DISTRIBUTION=code,
        SHIFT=shift,
        GROUPS=GROUPS,
        num_warps=NUM_WARPS,
    )
