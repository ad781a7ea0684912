"""The noise spec (ebm_fast/noise.py) as @triton.jit helpers.

Element n draws from the Philox block g = n // 4 with counter (g lo, g hi, step, stream) and key
(seed lo, seed hi) (``tl.philox`` splits the 64-bit seed that way), and takes word out[n % 4].

* ``spec_words`` / ``spec_uniform`` / ``spec_normal``: one draw per element of an arbitrary block
  of indices n (per-chain draws: n = chain index). They run Philox once per element.
* ``spec_words_tile`` / ``spec_uniform_tile`` / ``spec_normal_tile``: the bulk path. Given a block
  of group indices g they return a (groups, 4) tile for the elements n = 4 g + r, running Philox
  (and Box-Muller) once per group of four; ``_launch.tile_offsets`` lays such tiles over a flat
  tensor.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def spec_group_words(seed, step, stream, g):
    """The four Philox output words (uint32) of each block g (a block of group indices)."""
    g = g.to(tl.int64)  # the high counter word needs 64 bits (int32 >> 32 is undefined)
    zero = g * 0
    return tl.philox(
        seed,
        g.to(tl.uint32),
        (g >> 32).to(tl.uint32),
        (zero + step).to(tl.uint32),
        (zero + stream).to(tl.uint32),
    )


@triton.jit
def select4(v0, v1, v2, v3, r):
    """v_r, elementwise, for r in 0..3."""
    return tl.where(r == 0, v0, tl.where(r == 1, v1, tl.where(r == 2, v2, v3)))


@triton.jit
def spec_words(seed, step, stream, n):
    """Word out[n % 4] of block n // 4 (uint32) for each global element index n (n >= 0)."""
    w0, w1, w2, w3 = spec_group_words(seed, step, stream, n // 4)
    return select4(w0, w1, w2, w3, n % 4)


@triton.jit
def spec_uniform(seed, step, stream, n):
    """Uniform in [0, 1) (float32) per element index n: Triton's uint_to_uniform_float."""
    return tl.uint_to_uniform_float(spec_words(seed, step, stream, n))


@triton.jit
def spec_normal(seed, step, stream, n):
    """Standard normal (float32) per element index n: Box-Muller on (out0, out1) for n % 4 in
    {0, 1} and on (out2, out3) otherwise; cos for even n, sin for odd n."""
    w0, w1, w2, w3 = spec_group_words(seed, step, stream, n // 4)
    second_pair = (n % 4) >= 2
    u_a = tl.uint_to_uniform_float(tl.where(second_pair, w2, w0))
    u_b = tl.uint_to_uniform_float(tl.where(second_pair, w3, w1))
    z_cos, z_sin = tl.pair_uniform_to_normal(u_a, u_b)
    return tl.where(n % 2 == 0, z_cos, z_sin)


@triton.jit
def _as_tile(v0, v1, v2, v3):
    """(groups,) values of the four members of each group -> (groups, 4) tile, member r in
    column r."""
    r = tl.arange(0, 4)[None, :]
    return select4(v0[:, None], v1[:, None], v2[:, None], v3[:, None], r)


@triton.jit
def spec_words_tile(seed, step, stream, g):
    """Words (uint32) of the elements n = 4 g + r, as a (groups, 4) tile."""
    w0, w1, w2, w3 = spec_group_words(seed, step, stream, g)
    return _as_tile(w0, w1, w2, w3)


@triton.jit
def spec_uniform_tile(seed, step, stream, g):
    """Uniforms of the elements n = 4 g + r, as a (groups, 4) tile."""
    return tl.uint_to_uniform_float(spec_words_tile(seed, step, stream, g))


@triton.jit
def spec_normal_tile(seed, step, stream, g):
    """Normals of the elements n = 4 g + r, as a (groups, 4) tile: one Philox call and two
    Box-Muller transforms per four normals (Triton's randn4x)."""
    w0, w1, w2, w3 = spec_group_words(seed, step, stream, g)
    z0, z1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
    z2, z3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
    return _as_tile(z0, z1, z2, z3)
