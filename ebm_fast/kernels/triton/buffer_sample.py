"""Triton ``buffer_sample_out``: the replay buffer's fused draw (slot, dequantise, reinit).

Semantics: ebm_fast/reference/buffer_sample.py. A 2-D grid of (CHAINS x BLOCK) tiles of the
(batch, D) output: each program draws its chains' slots and reinit decisions once (per-chain
noise), then gathers the stored rows of its block of features, draws per-element init noise
only where the tile holds a reinitialised chain, and writes each element once. Stored rows of
reinitialised chains are not read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ebm_fast.kernels.triton._launch import counter_args, read_scalar
from ebm_fast.kernels.triton._noise_spec import spec_normal, spec_uniform, spec_words
from ebm_fast.kernels.triton.langevin_update import round_to
from ebm_fast.noise import (
    STREAM_BUFFER_REINIT_DECISION,
    STREAM_BUFFER_REINIT_VALUES,
    STREAM_BUFFER_SLOT,
)
from ebm_fast.reference.buffer_sample import uint8_scales

CHAINS = 4
BLOCK = 1024
INIT_CODES = {"uniform": 0, "gaussian": 1, "values": 2}
# lo + q * step (dequantisation) and lo + width * u (uniform init) must round twice, as the
# reference does, for bit-identical rows: a GPU build with Triton's default fp fusion turns them
# into one fma (the interpreter never fuses, so only a GPU would show the difference).
FP_FUSION = False


@triton.jit(
    do_not_specialize=[
        "seed",
        "step",
        "chain_offset",
        "batch",
        "features",
        "slots_per_class",
        "reinit_prob",
        "lo",
        "width",
        "uint8_step",
    ]
)
def _buffer_sample_kernel(
    out_ptr,
    slots_ptr,
    storage_ptr,
    written_ptr,
    y_ptr,
    values_ptr,
    seed,
    step,
    chain_offset,
    batch,
    features,
    slots_per_class,
    reinit_prob,
    lo,
    width,
    uint8_step,
    SEED_IS_POINTER: tl.constexpr,
    STEP_IS_POINTER: tl.constexpr,
    HAS_Y: tl.constexpr,
    INIT: tl.constexpr,
    STREAM_DECISION: tl.constexpr,
    STREAM_VALUES: tl.constexpr,
    STREAM_SLOT: tl.constexpr,
    COMPUTE: tl.constexpr,
    CHAINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seed = read_scalar(seed, SEED_IS_POINTER)
    step = read_scalar(step, STEP_IS_POINTER)
    i = tl.program_id(0).to(tl.int64) * CHAINS + tl.arange(0, CHAINS)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    chain_mask = i < batch
    chain = chain_offset + i
    r = spec_words(seed, step, STREAM_SLOT, chain)
    slot = ((r.to(tl.uint64) * slots_per_class.to(tl.uint64)) >> 32).to(tl.int64)
    if HAS_Y:
        slot += tl.load(y_ptr + i, mask=chain_mask, other=0) * slots_per_class
    written = tl.load(written_ptr + slot, mask=chain_mask, other=1)
    reinit = (spec_uniform(seed, step, STREAM_DECISION, chain) < reinit_prob) | (written == 0)
    mask = chain_mask[:, None] & (j < features)[None, :]
    stored = tl.load(
        storage_ptr + slot[:, None] * features + j[None, :], mask=mask & ~reinit[:, None], other=0
    )
    if storage_ptr.dtype.element_ty == tl.uint8:
        stored = lo + stored.to(tl.float32) * uint8_step
    # float32 values, float64 ones for float64 outputs (exact for every other source).
    value = stored.to(COMPUTE)
    # Most tiles hold no reinitialised chain (5% of chains by default): skip their noise.
    if tl.max(reinit.to(tl.int32), axis=0) > 0:
        n = chain[:, None] * features + j[None, :]
        if INIT == 2:
            fresh = tl.load(
                values_ptr + i[:, None] * features + j[None, :],
                mask=mask & reinit[:, None],
                other=0,
            )
        elif INIT == 1:
            fresh = spec_normal(seed, step, STREAM_VALUES, n)
        else:
            fresh = lo + width * spec_uniform(seed, step, STREAM_VALUES, n)
        value = tl.where(reinit[:, None], fresh.to(COMPUTE), value)
    tl.store(
        out_ptr + i[:, None] * features + j[None, :],
        round_to(value, out_ptr.dtype.element_ty),
        mask=mask,
    )
    if tl.program_id(1) == 0:
        tl.store(slots_ptr + i, slot, mask=chain_mask)


def buffer_sample_out(
    out,
    slots,
    storage,
    written,
    y,
    init_values,
    seed,
    step,
    chain_offset,
    slots_per_class,
    reinit_prob,
    init_kind,
    lo,
    hi,
):
    device = out.device
    seed_arg, step_arg, counter_flags = counter_args(seed, step, device)
    batch, features = out.shape
    width = float(torch.tensor(hi - lo, dtype=torch.float32))
    block = min(BLOCK, triton.next_power_of_2(features))
    grid = (triton.cdiv(batch, CHAINS), triton.cdiv(features, block))
    _buffer_sample_kernel[grid](
        out,
        slots,
        storage,
        written,
        y if y is not None else slots,
        init_values if init_values is not None else out,
        seed_arg,
        step_arg,
        chain_offset,
        batch,
        features,
        slots_per_class,
        reinit_prob,
        lo,
        width,
        uint8_scales(lo, hi)[0],
        **counter_flags,
        HAS_Y=y is not None,
        INIT=INIT_CODES[init_kind],
        STREAM_DECISION=STREAM_BUFFER_REINIT_DECISION,
        STREAM_VALUES=STREAM_BUFFER_REINIT_VALUES,
        STREAM_SLOT=STREAM_BUFFER_SLOT,
        COMPUTE=tl.float64 if out.dtype == torch.float64 else tl.float32,
        CHAINS=CHAINS,
        BLOCK=block,
        enable_fp_fusion=FP_FUSION,
    )
