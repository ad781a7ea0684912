"""The counter-based noise spec: its constants and its stream table (docs/design.md, "The noise
spec"). A leaf: it imports nothing, so every layer can read it.

A chain's noise depends only on (seed, step, stream, global element index):

* Philox4x32-10 exactly as Triton's ``tl.philox``: key = (seed & 0xffffffff, seed >> 32),
  counter = (g & 0xffffffff, g >> 32, step, stream) with g = n // 4, where
  n = chain_index * elements_per_chain + j and chain_index counts from ``chain_offset``.
* Element n takes output word r = out[n % 4].
* Uniform: the int32 bitcast of r, complemented where negative, times 4.6566127342e-10.
* Normal: Box-Muller on the pairs (out0, out1) and (out2, out3):
  rho = sqrt(-2 ln max(u_a, 1e-7)), z = rho cos(2 pi u_b) for the even member, rho sin(2 pi u_b)
  for the odd one (Triton's randn4x).

Where it lives: the pure-torch specification in ebm_fast/reference/philox.py (the ``*_ref``
functions), the public draws ``philox_normal`` / ``philox_uniform`` / ``philox_bits`` (run on the
selected backend) in ebm_fast/ops/philox.py, and the kernels' own versions in
ebm_fast/kernels/triton/_noise_spec.py and ebm_fast/csrc/philox.h.

What agrees exactly, and what only to rounding:

* Bit-identical across backends (reference, cpu, triton): the raw Philox words
  (``philox_bits``), the uniforms (an exact integer-to-float conversion and one correctly
  rounded float32 product), and what is decided from them alone: MALA's uniforms, the replay
  buffer's slot choices, re-initialisation decisions, uniform re-initialisation values,
  quantisation and stochastic rounding.
* Bit-identical for one backend with itself on one machine: any split of a batch into chunks
  (chain_offset), any thread count, and a chain resumed from a saved step counter.
* Equal only to rounding across backends: the normals. Box-Muller's log, sqrt, cos and sin are
  each backend's own float32 functions (torch's, the C++ kernels' polynomial ones, Triton's
  libdevice), so the same uniforms give normals that differ in the last bits (reference against
  cpu: about 6 in 10 values, by at most ~1e-6). Everything computed from normals inherits this:
  Langevin updates, gaussian buffer re-initialisation, and so whole chains, which drift apart
  by about 1e-6 over tens of steps (and MALA chains may then take a different decision where
  the accept probability is within that of the uniform).
"""

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10
BOX_MULLER_MIN_U = 1.0e-7
TWO_PI = 6.283185307179586

# Stream numbers (docs/design.md): one per use, so no two uses ever share a draw.
STREAM_PROPOSAL = 0
STREAM_MALA_ACCEPT = 1
STREAM_BUFFER_REINIT_DECISION = 2
STREAM_BUFFER_REINIT_VALUES = 3
STREAM_BUFFER_SLOT = 4
STREAM_BUFFER_RESERVOIR = 5
STREAM_BUFFER_QUANTIZE = 6  # stochastic rounding of uint8 buffer storage
