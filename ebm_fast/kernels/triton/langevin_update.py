"""Triton ``langevin_update_out``: out = clamp(x - step_size * clip(grad) + noise_scale * xi).

Semantics: ebm_fast/reference/langevin_update.py. Memory-bound design: a 1-D grid of tiles of
GROUPS x 4 elements, each tile aligned to the noise spec's blocks of four so one Philox call and
two Box-Muller transforms serve four elements; x, grad and out are touched once each. The global
element index is n = chain_offset * per_chain + flat, and the chain index (needed only for
per-chain parameters and norm clipping) is derived per element from flat. Gradient-norm clipping
first reduces each chain's squared norm in two small deterministic kernels (partial sums over
chunks of the chain, then one scale c / max(norm, c) per chain), which the update kernel reads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ebm_fast.kernels.triton._launch import (
    counter_args,
    read_scalar,
    scalar_arg,
    tile_grid,
    tile_offsets,
)
from ebm_fast.kernels.triton._noise_spec import spec_normal_tile

GROUPS = 512  # 2048 elements per program
NUM_WARPS = 4
REDUCE_BLOCK = 1024
MAX_SPLITS = 64  # chunks per chain in the norm reduction (programs enough to fill a GPU)
SCALE_CHAINS = 64  # chains per program when turning partial sums into scales
CLIP_MODES = {None: 0, "value": 1, "norm": 2}
# Chains at least this long (less one tile) take 64-bit chain-index arithmetic.
INT32_CHAIN_LIMIT = 1 << 31
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# How a step_size / noise_scale value reaches the kernel.
PARAM_HOST_SCALAR, PARAM_DEVICE_SCALAR, PARAM_PER_CHAIN = 0, 1, 2


def chain_param_arg(value: torch.Tensor, device: torch.device, name: str):
    """(kernel argument, mode) for a 0-dim or per-chain (chains,) float parameter."""
    if value.dim() == 1:
        return value.to(torch.float32), PARAM_PER_CHAIN
    arg, is_pointer = scalar_arg(value.to(torch.float32), device, name)
    return arg, PARAM_DEVICE_SCALAR if is_pointer else PARAM_HOST_SCALAR


@triton.jit
def read_chain_param(arg, chain, mask, MODE: tl.constexpr):
    """A parameter passed by :func:`chain_param_arg`, for the elements of the given chains."""
    if MODE == 2:
        value = tl.load(arg + chain, mask=mask, other=0.0)
    elif MODE == 1:
        value = tl.load(arg)
    else:
        value = arg
    return value


@triton.jit
def round_to(value, DTYPE: tl.constexpr):
    """float32 value rounded to nearest-even in DTYPE. bfloat16 is rounded by hand because the
    Triton interpreter's float32 -> bfloat16 cast truncates (the GPU's rounds to nearest)."""
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        result = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = value.to(DTYPE)
    return result


@triton.jit(
    do_not_specialize=[
        "seed",
        "step",
        "first_group",
        "per_chain",
        "grad_clip",
        "clamp_lo",
        "clamp_hi",
    ]
)
def _langevin_update_kernel(
    out_ptr,
    x_ptr,
    grad_ptr,
    step_size,
    noise_scale,
    clip_scale_ptr,
    seed,
    step,
    stream,
    first_group,
    numel,
    per_chain,
    grad_clip,
    clamp_lo,
    clamp_hi,
    SEED_IS_POINTER: tl.constexpr,
    STEP_IS_POINTER: tl.constexpr,
    STEP_SIZE_MODE: tl.constexpr,
    NOISE_SCALE_MODE: tl.constexpr,
    CLIP_MODE: tl.constexpr,
    CLAMP_LO: tl.constexpr,
    CLAMP_HI: tl.constexpr,
    LONG_CHAINS: tl.constexpr,
    SHIFT: tl.constexpr,
    GROUPS: tl.constexpr,
):
    seed = read_scalar(seed, SEED_IS_POINTER)
    step = read_scalar(step, STEP_IS_POINTER)
    g, flat = tile_offsets(first_group, GROUPS, SHIFT)
    mask = (flat >= 0) & (flat < numel)
    # Chain of each element: one 64-bit division per program, then 32-bit ones unless a chain
    # is too long for them (64-bit division is slow on GPUs). Dead code unless a mode needs it.
    tile_start = tl.maximum(tl.program_id(0).to(tl.int64) * (4 * GROUPS) - SHIFT, 0)
    first_chain = tile_start // per_chain
    local = flat - first_chain * per_chain  # in [0, per_chain + 4 * GROUPS) where unmasked
    if LONG_CHAINS:
        chain = first_chain + local // per_chain
    else:
        chain = first_chain + local.to(tl.int32) // per_chain.to(tl.int32)

    x = tl.load(x_ptr + flat, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + flat, mask=mask).to(tl.float32)
    if CLIP_MODE == 1:
        grad = tl.minimum(
            tl.maximum(grad, -grad_clip, propagate_nan=tl.PropagateNan.ALL),
            grad_clip,
            propagate_nan=tl.PropagateNan.ALL,
        )
    elif CLIP_MODE == 2:
        grad = grad * tl.load(clip_scale_ptr + chain, mask=mask, other=1.0)
    step_size = read_chain_param(step_size, chain, mask, STEP_SIZE_MODE)
    noise_scale = read_chain_param(noise_scale, chain, mask, NOISE_SCALE_MODE)
    noise = spec_normal_tile(seed, step, stream, g)
    new = (x - step_size * grad) + noise_scale * noise
    if CLAMP_LO:
        new = tl.maximum(new, clamp_lo, propagate_nan=tl.PropagateNan.ALL)
    if CLAMP_HI:
        new = tl.minimum(new, clamp_hi, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + flat, round_to(new, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chain_sumsq_kernel(partial_ptr, grad_ptr, per_chain, chunk, splits, BLOCK: tl.constexpr):
    """partial[chain, split] = sum of grad^2 over the split-th chunk of the chain."""
    chain = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    start = split.to(tl.int64) * chunk
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in range(0, chunk, BLOCK):
        j = start + offset + tl.arange(0, BLOCK)
        value = tl.load(grad_ptr + chain * per_chain + j, mask=j < per_chain, other=0.0)
        value = value.to(tl.float32)
        acc += value * value
    tl.store(partial_ptr + chain * splits + split, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["grad_clip"])
def _norm_scale_kernel(
    scale_ptr, partial_ptr, chains, splits, grad_clip, CHAINS: tl.constexpr, SPLITS: tl.constexpr
):
    """scale[chain] = c / max(norm, c), the factor that clips a chain's gradient to norm <= c.

    A NaN norm stays NaN, as in the reference (torch's clamp): tl.maximum's default on a GPU
    returns c instead (the interpreter's numpy maximum would hide that difference)."""
    chain = tl.program_id(0) * CHAINS + tl.arange(0, CHAINS)
    split = tl.arange(0, SPLITS)
    mask = (chain[:, None] < chains) & (split[None, :] < splits)
    partial = tl.load(
        partial_ptr + chain[:, None].to(tl.int64) * splits + split[None, :], mask=mask, other=0.0
    )
    norm = tl.sqrt(tl.sum(partial, axis=1))
    bound = tl.maximum(norm, grad_clip, propagate_nan=tl.PropagateNan.ALL)
    tl.store(scale_ptr + chain, grad_clip / bound, mask=chain < chains)


def _norm_clip_scales(grad: torch.Tensor, grad_clip: float) -> torch.Tensor:
    """Per-chain factors c / max(||grad_chain||, c) (float32, shape (chains,))."""
    chains = grad.shape[0]
    per_chain = grad.numel() // chains
    block = min(REDUCE_BLOCK, triton.next_power_of_2(per_chain))
    wanted_splits = max(1, min(MAX_SPLITS, triton.cdiv(16 * 1024, chains)))
    chunk = triton.cdiv(triton.cdiv(per_chain, wanted_splits), block) * block
    splits = triton.cdiv(per_chain, chunk)
    partial = torch.empty((chains, splits), dtype=torch.float32, device=grad.device)
    _chain_sumsq_kernel[(chains, splits)](
        partial, grad, per_chain, chunk, splits, BLOCK=block, num_warps=NUM_WARPS
    )
    scales = torch.empty(chains, dtype=torch.float32, device=grad.device)
    _norm_scale_kernel[(triton.cdiv(chains, SCALE_CHAINS),)](
        scales,
        partial,
        chains,
        splits,
        grad_clip,
        CHAINS=SCALE_CHAINS,
        SPLITS=triton.next_power_of_2(splits),
    )
    return scales


def langevin_update_out(
    out: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    noise_scale: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    stream: int,
    chain_offset: int,
    grad_clip: float | None,
    grad_clip_mode: str,
    clamp_lo: float | None,
    clamp_hi: float | None,
) -> None:
    """Write the Langevin update of x into out (contiguous; out may be x itself)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the triton backend computes in float32 and supports x of dtype "
            f"{SUPPORTED_DTYPES}, got {x.dtype} (use the reference or cpu backend)"
        )
    if not (out.is_contiguous() and x.is_contiguous() and grad.is_contiguous()):
        raise ValueError("out, x and grad must be contiguous")
    numel = x.numel()
    if numel == 0:
        return
    per_chain = math.prod(x.shape[1:])
    device = x.device
    clip_mode = CLIP_MODES[None if grad_clip is None else grad_clip_mode]
    # The clip-scale pointer is read only in norm mode (2: grad_clip given); grad stands in
    # otherwise.
    clip_scales = (
        _norm_clip_scales(grad, grad_clip) if clip_mode == 2 and grad_clip is not None else grad
    )
    first_group, shift, grid = tile_grid(numel, chain_offset * per_chain, GROUPS)
    seed_arg, step_arg, counter_flags = counter_args(seed, step, device)
    step_size_arg, step_size_mode = chain_param_arg(step_size, device, "step_size")
    noise_scale_arg, noise_scale_mode = chain_param_arg(noise_scale, device, "noise_scale")
    _langevin_update_kernel[grid](
        out,
        x,
        grad,
        step_size_arg,
        noise_scale_arg,
        clip_scales,
        seed_arg,
        step_arg,
        stream,
        first_group,
        numel,
        per_chain,
        0.0 if grad_clip is None else grad_clip,
        0.0 if clamp_lo is None else clamp_lo,
        0.0 if clamp_hi is None else clamp_hi,
        **counter_flags,
        STEP_SIZE_MODE=step_size_mode,
        NOISE_SCALE_MODE=noise_scale_mode,
        CLIP_MODE=clip_mode,
        CLAMP_LO=clamp_lo is not None,
        CLAMP_HI=clamp_hi is not None,
        LONG_CHAINS=per_chain + 4 * GROUPS >= INT32_CHAIN_LIMIT,
        SHIFT=shift,
        GROUPS=GROUPS,
        num_warps=NUM_WARPS,
    )
