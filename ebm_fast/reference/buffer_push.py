"""Reference replay-buffer push: choose a slot for each chain, quantise it, store it.

Slots (chain i, chain index c = chain_offset + i, noise-spec step = the buffer's draw counter):

* write-back: the slots given in ``idx``.
* "fifo": class k's chains go, in batch order, to k * S + (count[k] + rank) % S, where S is the
  slots per class, rank the number of earlier chains of class k in the batch and count[k] the
  number of chains of class k ever appended (so count % S is the ring's head).
* "reservoir" (Vitter's algorithm R): item t = count[k] + rank of class k goes to slot t while
  t < S; after that j = (r * (t + 1)) >> 32 (exactly, in integers) with r the Philox word of c on
  stream 5 (uniform in [0, t]) and the item replaces slot j if j < S, else it is dropped.

Pushes are sequential in batch order: where two chains target one slot, the later one is stored.
Storage: float32 / bfloat16 rows are x rounded to float32 then to the storage dtype; uint8 codes
are v = clamp((x - lo) * 255 / (hi - lo), 0, 255) rounded to nearest (half up), or with
stochastic rounding rounded up when a uniform of element n = c * D + j on stream 6 is below
v - floor(v) (unbiased). Every slot written has its ``written`` flag set.
"""

from __future__ import annotations

import torch

from ebm_fast.noise import MASK32, STREAM_BUFFER_QUANTIZE, STREAM_BUFFER_RESERVOIR
from ebm_fast.reference.buffer_sample import UINT8_LEVELS, float32, uint8_scales
from ebm_fast.reference.philox import philox_bits_ref, philox_uniform_ref

POLICIES = ("fifo", "reservoir")


def last_writer_only(targets: torch.Tensor) -> torch.Tensor:
    """targets with -1 wherever a later chain targets the same slot."""
    ordered, order = torch.sort(targets, stable=True)
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[:-1] = ordered[:-1] != ordered[1:]
    keep = torch.empty_like(last)
    keep[order] = last
    return torch.where(keep, targets, torch.full_like(targets, -1))


def push_targets(batch, idx, y, count, slots_per_class, policy, seed, step, chain_offset, device):
    """(slot of each chain or -1 for not stored, count after the push) in pure torch.

    No host synchronisation: usable on any device (the Triton backend calls it too).
    """
    if idx is not None:
        return last_writer_only(idx), count
    n_classes = count.shape[0]
    cls = torch.zeros(batch, dtype=torch.int64, device=device) if y is None else y
    onehot = (cls[:, None] == torch.arange(n_classes, device=device)[None, :]).to(torch.int64)
    rank = ((onehot.cumsum(0) - onehot) * onehot).sum(1)
    seen = count[cls] + rank
    base = cls * slots_per_class
    if policy == "fifo":
        targets = base + seen % slots_per_class
    else:
        r = (
            philox_bits_ref(
                (batch,),
                seed=seed,
                step=step,
                stream=STREAM_BUFFER_RESERVOIR,
                chain_offset=chain_offset,
                device=device,
            ).to(torch.int64)
            & MASK32
        )
        # (r * (seen + 1)) >> 32 without overflowing int64 once a class has seen 2**31 items:
        # r in 16-bit halves (exact while a class has seen fewer than 2**46 items).
        m = seen + 1
        j = ((r >> 16) * m + (((r & 0xFFFF) * m) >> 16)) >> 16
        targets = torch.where(
            seen < slots_per_class,
            base + seen,
            torch.where(j < slots_per_class, base + j, torch.full_like(j, -1)),
        )
    return last_writer_only(targets), count + onehot.sum(0)


def quantize(x, storage_dtype, lo, hi, stochastic, seed, step, chain_offset) -> torch.Tensor:
    """Rows of x (batch, D) in the storage dtype (uint8: codes over [lo, hi])."""
    x32 = x.to(torch.float32)
    if storage_dtype != torch.uint8:
        return x32.to(storage_dtype)
    inv_step = float32(uint8_scales(lo, hi)[1]).to(x.device)
    v = ((x32 - float32(lo).to(x.device)) * inv_step).clamp(0.0, float(UINT8_LEVELS))
    floor = torch.floor(v)
    frac = v - floor
    if stochastic:
        u = philox_uniform_ref(
            x.shape,
            seed=seed,
            step=step,
            stream=STREAM_BUFFER_QUANTIZE,
            chain_offset=chain_offset,
            device=x.device,
        )
        up = u < frac
    else:
        up = frac >= 0.5
    return (floor + up.to(torch.float32)).to(torch.uint8)


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
    """Store x (batch, D) into storage (capacity, D); update written (capacity,) and count."""
    targets, new_count = push_targets(
        x.shape[0], idx, y, count, slots_per_class, policy, seed, step, chain_offset, x.device
    )
    rows = quantize(x, storage.dtype, lo, hi, stochastic, seed, step, chain_offset)
    stored = targets >= 0
    storage[targets[stored]] = rows[stored]
    written[targets[stored]] = 1
    count.copy_(new_count)
