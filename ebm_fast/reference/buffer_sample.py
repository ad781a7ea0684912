"""Reference replay-buffer draw: pick slots, dequantise them, re-initialise some chains from noise.

For chain i of a batch (chain index c = chain_offset + i, noise-spec step = the buffer's draw
counter):

* slot: r = Philox word of c on stream 4; local = (r * slots_per_class) >> 32; with classes the
  slot is y[i] * slots_per_class + local (class y[i] owns a contiguous block of slots).
* reinit decision: uniform of c on stream 2 < reinit_prob, or the slot was never written.
* reinit values: per element n = c * D + j of the (batch, D) tensor on stream 3: uniform over
  [lo, hi) as lo + (hi - lo) * u, or standard normal; or taken from ``init_values``.
* otherwise the stored row, dequantised: uint8 q -> lo + q * (hi - lo) / 255.

Float arithmetic runs in float32 (every constant rounded to float32 first); the result is rounded
to the output dtype once.
"""

from __future__ import annotations

import torch

from ebm_fast.noise import (
    MASK32,
    STREAM_BUFFER_REINIT_DECISION,
    STREAM_BUFFER_REINIT_VALUES,
    STREAM_BUFFER_SLOT,
)
from ebm_fast.reference.philox import philox_bits_ref, philox_normal_ref, philox_uniform_ref

INIT_KINDS = ("uniform", "gaussian", "values")
UINT8_LEVELS = 255


def float32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def uint8_scales(lo: float, hi: float) -> tuple[float, float]:
    """(step, inverse step) of the uint8 grid over [lo, hi], each rounded to float32."""
    return (float(float32((hi - lo) / UINT8_LEVELS)), float(float32(UINT8_LEVELS / (hi - lo))))


def draw_slots(batch, y, slots_per_class, seed, step, chain_offset, device) -> torch.Tensor:
    """Slot index of each chain (int64): uniform within its class's block of slots."""
    r = (
        philox_bits_ref(
            (batch,),
            seed=seed,
            step=step,
            stream=STREAM_BUFFER_SLOT,
            chain_offset=chain_offset,
            device=device,
        ).to(torch.int64)
        & MASK32
    )
    local = (r * slots_per_class) >> 32
    return local if y is None else y * slots_per_class + local


def reinit_mask(u, threshold, written, slots) -> torch.Tensor:
    """The reinit rule: a chain gets init values when its uniform u is below the float32
    reinit probability, or when its slot was never written."""
    return (u < threshold) | (written[slots] == 0)


def reinit_decisions(batch, slots, written, reinit_prob, seed, step, chain_offset) -> torch.Tensor:
    u = philox_uniform_ref(
        (batch,),
        seed=seed,
        step=step,
        stream=STREAM_BUFFER_REINIT_DECISION,
        chain_offset=chain_offset,
        device=slots.device,
    )
    return reinit_mask(u, float32(reinit_prob).to(slots.device), written, slots)


def init_noise(shape, init_kind, lo, hi, seed, step, chain_offset, device) -> torch.Tensor:
    """Fresh init values (float32) for a (batch, D) tensor, per element on stream 3."""
    draw = philox_uniform_ref if init_kind == "uniform" else philox_normal_ref
    values = draw(
        shape,
        seed=seed,
        step=step,
        stream=STREAM_BUFFER_REINIT_VALUES,
        chain_offset=chain_offset,
        device=device,
    )
    if init_kind == "gaussian":
        return values
    return float32(lo).to(device) + float32(hi - lo).to(device) * values


def dequantize(rows: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Stored rows as float32 (uint8 codes map to lo + q * step)."""
    if rows.dtype != torch.uint8:
        return rows.to(torch.float32)
    step = float32(uint8_scales(lo, hi)[0]).to(rows.device)
    return float32(lo).to(rows.device) + rows.to(torch.float32) * step


def buffer_sample_ref(
    storage,
    written,
    y,
    init_values,
    batch,
    dtype,
    seed,
    step,
    chain_offset,
    slots_per_class,
    reinit_prob,
    init_kind,
    lo,
    hi,
):
    """(x (batch, D) in dtype, slots (batch,) int64) for a (capacity, D) storage."""
    slots = draw_slots(batch, y, slots_per_class, seed, step, chain_offset, storage.device)
    reinit = reinit_decisions(batch, slots, written, reinit_prob, seed, step, chain_offset)
    if init_kind == "values":
        fresh = init_values.to(dtype)
    else:
        fresh = init_noise(
            (batch, storage.shape[1]), init_kind, lo, hi, seed, step, chain_offset, storage.device
        ).to(dtype)
    stored = dequantize(storage[slots], lo, hi).to(dtype)
    return torch.where(reinit[:, None], fresh, stored), slots


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
    x, drawn = buffer_sample_ref(
        storage,
        written,
        y,
        init_values,
        out.shape[0],
        out.dtype,
        seed,
        step,
        chain_offset,
        slots_per_class,
        reinit_prob,
        init_kind,
        lo,
        hi,
    )
    out.copy_(x)
    slots.copy_(drawn)
