"""Triton ``buffer_push_out``: quantise and store chains into the replay buffer.

Semantics: ebm_fast/reference/buffer_push.py. Slot choice (FIFO ring, reservoir decisions, last
writer wins) is O(batch) index arithmetic done by the reference's :func:`push_targets` in torch on
the device (no host sync); the kernel then moves the (batch, D) rows once: a 2-D grid of
(CHAINS x BLOCK) tiles loads, quantises and scatters them to their slots and sets the slots'
written flags.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ebm_fast.kernels.triton._launch import counter_args, read_scalar
from ebm_fast.kernels.triton._noise_spec import spec_uniform
from ebm_fast.kernels.triton.langevin_update import round_to
from ebm_fast.noise import STREAM_BUFFER_QUANTIZE
from ebm_fast.reference.buffer_push import push_targets
from ebm_fast.reference.buffer_sample import uint8_scales

CHAINS = 4
BLOCK = 1024


@triton.jit(
    do_not_specialize=["seed", "step", "chain_offset", "batch", "features", "lo", "inv_step"]
)
def _buffer_push_kernel(
    storage_ptr,
    written_ptr,
    x_ptr,
    targets_ptr,
    seed,
    step,
    chain_offset,
    batch,
    features,
    lo,
    inv_step,
    SEED_IS_POINTER: tl.constexpr,
    STEP_IS_POINTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    STREAM_QUANTIZE: tl.constexpr,
    CHAINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * CHAINS + tl.arange(0, CHAINS)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    target = tl.load(targets_ptr + i, mask=i < batch, other=-1)
    stored = target >= 0
    mask = stored[:, None] & (j < features)[None, :]
    x = tl.load(x_ptr + i[:, None] * features + j[None, :], mask=mask, other=0).to(tl.float32)
    if storage_ptr.dtype.element_ty == tl.uint8:
        v = tl.minimum(tl.maximum((x - lo) * inv_step, 0.0), 255.0)
        floor = tl.floor(v)
        frac = v - floor
        if STOCHASTIC:
            seed = read_scalar(seed, SEED_IS_POINTER)
            step = read_scalar(step, STEP_IS_POINTER)
            n = (chain_offset + i)[:, None] * features + j[None, :]
            up = spec_uniform(seed, step, STREAM_QUANTIZE, n) < frac
        else:
            up = frac >= 0.5
        row = (floor + up.to(tl.float32)).to(tl.uint8)
    else:
        row = round_to(x, storage_ptr.dtype.element_ty)
    tl.store(storage_ptr + target[:, None] * features + j[None, :], row, mask=mask)
    if tl.program_id(1) == 0:
        tl.store(written_ptr + target, tl.full((CHAINS,), 1, tl.uint8), mask=stored)


def buffer_push_out(
    storage,
    written,
    count,
    x,
    idx,
    y,
    seed,
    step,
    chain_offset,
    slots_per_class,
    policy,
    lo,
    hi,
    stochastic,
):
    device = storage.device
    targets, new_count = push_targets(
        x.shape[0], idx, y, count, slots_per_class, policy, seed, step, chain_offset, device
    )
    seed_arg, step_arg, counter_flags = counter_args(seed, step, device)
    batch, features = x.shape
    block = min(BLOCK, triton.next_power_of_2(features))
    grid = (triton.cdiv(batch, CHAINS), triton.cdiv(features, block))
    _buffer_push_kernel[grid](
        storage,
        written,
        x,
        targets.contiguous(),
        seed_arg,
        step_arg,
        chain_offset,
        batch,
        features,
        lo,
        uint8_scales(lo, hi)[1],
        **counter_flags,
        STOCHASTIC=bool(stochastic),
        STREAM_QUANTIZE=STREAM_BUFFER_QUANTIZE,
        CHAINS=CHAINS,
        BLOCK=block,
    )
    count.copy_(new_count)
