"""The noise spec (ebm_fast/noise.py) in pure torch: the reference every backend is held to, and
the reference ``philox_out``.

Integers are carried in int64 tensors holding uint32 values, so the reference needs no unsigned
dtype support.
"""

from __future__ import annotations

import math

import torch

from ebm_fast.noise import (
    BOX_MULLER_MIN_U,
    MASK32,
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
    PHILOX_ROUNDS,
    TWO_PI,
    UNIFORM_SCALE,
)


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b, for a < 2**32 and b holding uint32."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo  # < 2**48: no int64 overflow
    p_hi = b * a_hi
    low = p_lo + ((p_hi & 0xFFFF) << 16)
    hi = (p_hi >> 16) + (low >> 32)
    return hi & MASK32, low & MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 words (broadcasting)."""
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _as_int64(value, device: torch.device) -> torch.Tensor:
    """A 64-bit seed or 32-bit step, given as int or 0-dim integer tensor, as an int64 tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.int64)
    # Seeds may be given as unsigned 64-bit ints: keep the bits, as two's complement.
    value = int(value) & 0xFFFFFFFFFFFFFFFF
    if value >= 1 << 63:
        value -= 1 << 64
    return torch.tensor(value, dtype=torch.int64, device=device)


def element_counters(shape, chain_offset: int, device) -> torch.Tensor:
    """Global element index n for every element of a (chains, ...) tensor, flattened."""
    chains = shape[0] if len(shape) else 1
    per_chain = math.prod(shape[1:]) if len(shape) > 1 else 1
    chain_index = torch.arange(chains, dtype=torch.int64, device=device) + chain_offset
    within = torch.arange(per_chain, dtype=torch.int64, device=device)
    return (chain_index[:, None] * per_chain + within[None, :]).reshape(-1)


def philox_blocks_ref(n: torch.Tensor, seed, step, stream: int) -> tuple[torch.Tensor, ...]:
    """The four Philox output words of the block g = n // 4 that holds each element n."""
    device = n.device
    seed_t = _as_int64(seed, device)
    step_t = _as_int64(step, device) & MASK32
    g = n // 4
    return philox4x32_10(
        g & MASK32,
        (g >> 32) & MASK32,
        step_t.expand_as(g),
        torch.full_like(g, int(stream) & MASK32),
        seed_t & MASK32,
        (seed_t >> 32) & MASK32,
    )


def _select_word(words, index: torch.Tensor) -> torch.Tensor:
    return torch.stack(words).gather(0, index[None]).squeeze(0)


def uniform_from_bits(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for uint32 words (held in int64) -> float32 in [0, 1)."""
    signed = torch.where(r >= 1 << 31, r - (1 << 32), r).to(torch.int32)
    signed = torch.where(signed < 0, ~signed, signed)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def philox_bits_ref(shape, *, seed, step, stream=0, chain_offset=0, device=None) -> torch.Tensor:
    """Word r = out[n % 4] per element, as int32 (the bitcast of the uint32 word)."""
    shape = tuple(shape)
    n = element_counters(shape, chain_offset, device)
    r = _select_word(philox_blocks_ref(n, seed, step, stream), n % 4)
    return torch.where(r >= 1 << 31, r - (1 << 32), r).to(torch.int32).reshape(shape)


def philox_uniform_ref(shape, *, seed, step, stream=0, chain_offset=0, device=None) -> torch.Tensor:
    bits = philox_bits_ref(
        shape, seed=seed, step=step, stream=stream, chain_offset=chain_offset, device=device
    )
    return uniform_from_bits(bits.to(torch.int64) & MASK32)


def philox_normal_ref(
    shape, *, seed, step, stream=0, chain_offset=0, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Box-Muller normals per the spec; dtype=float64 evaluates log/sqrt/cos/sin in float64
    from the same float32 uniforms (the "exact" value the kernels' tolerance is measured from)."""
    shape = tuple(shape)
    n = element_counters(shape, chain_offset, device)
    words = philox_blocks_ref(n, seed, step, stream)
    pair = (n % 4) // 2  # 0: words (0, 1); 1: words (2, 3)
    u_a = uniform_from_bits(_select_word(words, 2 * pair)).to(dtype)
    u_b = uniform_from_bits(_select_word(words, 2 * pair + 1)).to(dtype)
    rho = torch.sqrt(-2.0 * torch.log(torch.clamp(u_a, min=BOX_MULLER_MIN_U)))
    theta = TWO_PI * u_b
    z = torch.where(n % 2 == 0, rho * torch.cos(theta), rho * torch.sin(theta))
    return z.reshape(shape)


_DRAWS = {"normal": philox_normal_ref, "uniform": philox_uniform_ref, "bits": philox_bits_ref}


def philox_out(out, seed, step, stream, chain_offset, distribution):
    out.copy_(
        _DRAWS[distribution](
            out.shape,
            seed=seed,
            step=step,
            stream=stream,
            chain_offset=chain_offset,
            device=out.device,
        )
    )
