// The noise spec (docs/design.md, ebm_fast/noise.py) in C++: Philox4x32-10 as Triton's
// tl.philox, Triton's uint -> uniform float map, and Box-Muller as Triton's randn4x.
// Scalar forms here serve per-chain draws; bulk per-element noise uses the vectorised forms
// (philox_*_bulk below): AVX-512 or AVX2 intrinsics with polynomial log/sincos where the
// compiler targets them, else a portable per-block loop of the scalar forms.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ebm_fast {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kBoxMullerMinU = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;

struct PhiloxKey {
  uint32_t k0, k1;
  explicit PhiloxKey(int64_t seed)
      : k0(static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffu)),
        k1(static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32)) {}
};

struct PhiloxBlock {
  uint32_t w[4];
};

// Philox4x32-10 on counter (c0, c1, c2, c3) with key (k0, k1).
inline PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 PhiloxKey key) {
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// The block holding global element index n (g = n / 4) at (step, stream).
inline PhiloxBlock philox_block(uint64_t n, uint32_t step, uint32_t stream, PhiloxKey key) {
  const uint64_t g = n >> 2;
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), step, stream,
                       key);
}

// The spec's word for element n.
inline uint32_t philox_bits(uint64_t n, uint32_t step, uint32_t stream, PhiloxKey key) {
  return philox_block(n, step, stream, key).w[n & 3];
}

// Triton's uint_to_uniform_float: [0, 1).
inline float uniform_from_bits(uint32_t r) {
  int32_t v = static_cast<int32_t>(r);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * kUniformScale;
}

inline float philox_uniform(uint64_t n, uint32_t step, uint32_t stream, PhiloxKey key) {
  return uniform_from_bits(philox_bits(n, step, stream, key));
}

// ---------------------------------------------------------------------------------------------
// Bulk generation: the spec's values for the contiguous run of global element indices
// [n0, n0 + count), written to out[0 .. count). A tile is 16 consecutive Philox blocks
// (64 elements); runs that start or end inside a tile go through a small buffer.

enum class NoiseKind { kBits, kUniform, kNormal };

constexpr int kTileBlocks = 16;
constexpr int kTileElements = 4 * kTileBlocks;

// (seed, step, stream) of one bulk draw, with the key schedule of the ten rounds precomputed.
struct PhiloxStream {
  PhiloxKey key;
  uint32_t step, stream;
  uint32_t k0[10], k1[10];
  PhiloxStream(PhiloxKey key_, uint32_t step_, uint32_t stream_)
      : key(key_), step(step_), stream(stream_) {
    for (int round = 0; round < 10; ++round) {
      k0[round] = key.k0 + static_cast<uint32_t>(round) * kPhiloxKeyA;
      k1[round] = key.k1 + static_cast<uint32_t>(round) * kPhiloxKeyB;
    }
  }
};

// Polynomial coefficients of the vector paths (least-squares fits on Chebyshev nodes, float32):
// log1p(f) = f * P(f) for f in [-0.25, 0.5): max relative error 2.5 ulp.
constexpr float kLog1pCoeffs[9] = {1.0f, -0.5000006556510925f, 0.3333360254764557f,
                                   -0.24993263185024261f, 0.1997554749250412f,
                                   -0.1682281792163849f, 0.1499691605567932f,
                                   -0.1209166869521141f, 0.054260093718767166f};
// sin(pi/2 r) = r * S(r^2), cos(pi/2 r) = C(r^2) for r in [-0.5, 0.5]: max error 1.5 ulp.
constexpr float kSinCoeffs[4] = {1.5707963705062866f, -0.6459634900093079f,
                                 0.07968022674322128f, -0.004602163098752499f};
constexpr float kCosCoeffs[5] = {1.0f, -1.2337005138397217f, 0.25366920232772827f,
                                 -0.02086007036268711f, 0.00090362987248227f};
constexpr float kLn2 = 0.693147180559945f;

// Writes the 64 * tiles elements of blocks [g, g + 16 * tiles) (element indices 4g ..) to out
// (as bits / float), in element order.
template <NoiseKind kind, int tiles>
inline void philox_tiles(uint64_t g, const PhiloxStream& s, void* out);

#ifdef __AVX512F__

namespace avx512 {

// Lane L of a tile computes block g + kLaneBlock[L], chosen so that the 4x16 -> 64 interleave in
// interleave4() leaves the elements in order without a cross-lane permute. Philox runs on two
// halves of 8 blocks held in 64-bit lanes (low dword = the word): _mm512_mul_epu32 then yields
// the whole 64-bit product of each lane in one instruction, its high dword is the hi word.
inline __m512i block_offsets(int half) {
  return half == 0 ? _mm512_setr_epi64(0, 4, 8, 12, 1, 5, 9, 13)
                   : _mm512_setr_epi64(2, 6, 10, 14, 3, 7, 11, 15);
}

// Three-way xor in one instruction (truth table 0x96).
inline __m512i xor3(__m512i a, __m512i b, __m512i c) {
  return _mm512_ternarylogic_epi32(a, b, c, 0x96);
}

// The high dword of each 64-bit lane moved to its low dword. A shuffle rather than a shift:
// it runs on port 5 while the multiplies and shifts compete for port 0.
inline __m512i high_to_low(__m512i v) { return _mm512_shuffle_epi32(v, _MM_PERM_CDAB); }

// Philox for `tiles` consecutive tiles at once: w[t] gets tile t's four words. One tile's two
// halves give only four independent multiply chains per round, too few to hide the multiply
// latency; two tiles interleaved keep the multiplier busy (10-25% faster normals here).
template <int tiles>
inline void philox_tiles(uint64_t g, const PhiloxStream& s, __m512i w[][4]) {
  constexpr int halves = 2 * tiles;
  const __m512i round_a = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i round_b = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i c0[halves], c1[halves], c2[halves], c3[halves];
  for (int h = 0; h < halves; ++h) {
    const __m512i block = _mm512_add_epi64(
        _mm512_set1_epi64(static_cast<int64_t>(g + kTileBlocks * (h / 2))), block_offsets(h % 2));
    c0[h] = block;  // high dword ignored by the multiply
    c1[h] = _mm512_srli_epi64(block, 32);
    c2[h] = _mm512_set1_epi32(static_cast<int32_t>(s.step));
    c3[h] = _mm512_set1_epi32(static_cast<int32_t>(s.stream));
  }
  for (int round = 0; round < 10; ++round) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int32_t>(s.k0[round]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int32_t>(s.k1[round]));
    for (int h = 0; h < halves; ++h) {
      const __m512i prod_b = _mm512_mul_epu32(c2[h], round_b);
      const __m512i prod_a = _mm512_mul_epu32(c0[h], round_a);
      c0[h] = xor3(high_to_low(prod_b), c1[h], k0);
      c2[h] = xor3(high_to_low(prod_a), c3[h], k1);
      c1[h] = prod_b;
      c3[h] = prod_a;
    }
  }
  // Low dwords of a tile's two halves -> 16 lanes.
  const __m512i low_dwords = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                               26, 28, 30);
  for (int t = 0; t < tiles; ++t) {
    w[t][0] = _mm512_permutex2var_epi32(c0[2 * t], low_dwords, c0[2 * t + 1]);
    w[t][1] = _mm512_permutex2var_epi32(c1[2 * t], low_dwords, c1[2 * t + 1]);
    w[t][2] = _mm512_permutex2var_epi32(c2[2 * t], low_dwords, c2[2 * t + 1]);
    w[t][3] = _mm512_permutex2var_epi32(c3[2 * t], low_dwords, c3[2 * t + 1]);
  }
}

inline __m512 uniform16(__m512i r) {
  const __m512i v = _mm512_xor_si512(r, _mm512_srai_epi32(r, 31));  // ~r where r < 0
  return _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(kUniformScale));
}

template <int n>
inline __m512 horner(__m512 x, const float (&c)[n]) {
  __m512 acc = _mm512_set1_ps(c[n - 1]);
  for (int i = n - 2; i >= 0; --i) acc = _mm512_fmadd_ps(acc, x, _mm512_set1_ps(c[i]));
  return acc;
}

// ln(u) for u >= 1e-7: u = m 2^k with m in [0.75, 1.5), ln u = k ln 2 + log1p(m - 1).
inline __m512 log16(__m512 u) {
  const __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  const __m512 k = _mm512_sub_ps(_mm512_getexp_ps(u), _mm512_getexp_ps(m));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  return _mm512_fmadd_ps(k, _mm512_set1_ps(kLn2), _mm512_mul_ps(f, horner(f, kLog1pCoeffs)));
}

// cos(2 pi u), sin(2 pi u) for u in [0, 1): quadrant q = round(4u), r = 4u - q (exact).
// Reducing from u rather than from theta = fl(2 pi u) keeps the theta rounding of the spec's
// float formula out: the result is nearer the exact value, within float rounding of the spec.
inline void sincos_2pi16(__m512 u, __m512* cos_out, __m512* sin_out) {
  const __m512 x = _mm512_mul_ps(u, _mm512_set1_ps(4.0f));
  const __m512 q = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, q);
  const __m512 r2 = _mm512_mul_ps(r, r);
  const __m512 sin_r = _mm512_mul_ps(r, horner(r2, kSinCoeffs));
  const __m512 cos_r = horner(r2, kCosCoeffs);
  const __m512i quadrant = _mm512_cvtps_epi32(q);
  const __mmask16 swap = _mm512_test_epi32_mask(quadrant, _mm512_set1_epi32(1));
  const __m512i two = _mm512_set1_epi32(2);
  // cos is negative in quadrants 1 and 2, sin in 2 and 3 (q mod 4).
  const __m512i cos_sign = _mm512_slli_epi32(
      _mm512_and_si512(_mm512_add_epi32(quadrant, _mm512_set1_epi32(1)), two), 30);
  const __m512i sin_sign = _mm512_slli_epi32(_mm512_and_si512(quadrant, two), 30);
  *cos_out = _mm512_castsi512_ps(_mm512_xor_si512(
      _mm512_castps_si512(_mm512_mask_blend_ps(swap, cos_r, sin_r)), cos_sign));
  *sin_out = _mm512_castsi512_ps(_mm512_xor_si512(
      _mm512_castps_si512(_mm512_mask_blend_ps(swap, sin_r, cos_r)), sin_sign));
}

// sqrt(a) for a >= 0 within 2 ulp: a 14-bit reciprocal square root estimate and one Newton
// step, several times the throughput of the exact vsqrtps (which blocks port 0 for 12 cycles).
inline __m512 sqrt16(__m512 a) {
  const __mmask16 positive = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ);
  const __m512 y = _mm512_rsqrt14_ps(a);
  const __m512 s = _mm512_mul_ps(a, y);                       // ~ sqrt(a)
  const __m512 h = _mm512_mul_ps(y, _mm512_set1_ps(0.5f));
  const __m512 residual = _mm512_fnmadd_ps(s, h, _mm512_set1_ps(0.5f));  // 0.5 - s y / 2
  return _mm512_maskz_fmadd_ps(positive, s, residual, s);     // 0 where a == 0
}

// Box-Muller on (u_a, u_b) words: rho cos -> *even, rho sin -> *odd.
inline void box_muller16(__m512i word_a, __m512i word_b, __m512* even, __m512* odd) {
  const __m512 u_a = _mm512_max_ps(uniform16(word_a), _mm512_set1_ps(kBoxMullerMinU));
  const __m512 rho = sqrt16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log16(u_a)));
  __m512 cos_t, sin_t;
  sincos_2pi16(uniform16(word_b), &cos_t, &sin_t);
  *even = _mm512_mul_ps(rho, cos_t);
  *odd = _mm512_mul_ps(rho, sin_t);
}

// z[w] lane L holds word w of block kLaneBlock[L]; writes the 64 elements in order.
inline void interleave4(const __m512 z[4], float* out) {
  const __m512 a = _mm512_unpacklo_ps(z[0], z[1]);
  const __m512 b = _mm512_unpackhi_ps(z[0], z[1]);
  const __m512 c = _mm512_unpacklo_ps(z[2], z[3]);
  const __m512 d = _mm512_unpackhi_ps(z[2], z[3]);
  const __m512d a_d = _mm512_castps_pd(a), b_d = _mm512_castps_pd(b);
  const __m512d c_d = _mm512_castps_pd(c), d_d = _mm512_castps_pd(d);
  _mm512_storeu_ps(out, _mm512_castpd_ps(_mm512_unpacklo_pd(a_d, c_d)));
  _mm512_storeu_ps(out + 16, _mm512_castpd_ps(_mm512_unpackhi_pd(a_d, c_d)));
  _mm512_storeu_ps(out + 32, _mm512_castpd_ps(_mm512_unpacklo_pd(b_d, d_d)));
  _mm512_storeu_ps(out + 48, _mm512_castpd_ps(_mm512_unpackhi_pd(b_d, d_d)));
}

}  // namespace avx512

template <NoiseKind kind, int tiles>
inline void philox_tiles(uint64_t g, const PhiloxStream& s, void* out) {
  __m512i w[tiles][4];
  avx512::philox_tiles<tiles>(g, s, w);
  for (int t = 0; t < tiles; ++t) {
    __m512 z[4];
    if constexpr (kind == NoiseKind::kBits) {
      for (int i = 0; i < 4; ++i) z[i] = _mm512_castsi512_ps(w[t][i]);
    } else if constexpr (kind == NoiseKind::kUniform) {
      for (int i = 0; i < 4; ++i) z[i] = avx512::uniform16(w[t][i]);
    } else {
      avx512::box_muller16(w[t][0], w[t][1], &z[0], &z[1]);
      avx512::box_muller16(w[t][2], w[t][3], &z[2], &z[3]);
    }
    avx512::interleave4(z, static_cast<float*>(out) + kTileElements * t);
  }
}

#elif defined(__AVX2__)

namespace avx2 {

// As the AVX-512 path, 8 blocks at a time: lane L of a group holds block kGroupBlock[L] =
// {0, 2, 4, 6, 1, 3, 5, 7}, so interleave4() needs no cross-lane permute.
//
// Philox keeps each word of a group's 8 blocks in one vector, a block per dword lane, so that
// the xors run on full vectors: 14 instructions a round for 8 blocks, where a block per 64-bit
// lane took 16. A round's high products come from two _mm256_mul_epu32 (even lanes, odd lanes)
// packed by one _mm256_shuffle_ps, which also swaps lanes 1 and 2 of each 128-bit half (f, its
// own inverse); the low products from _mm256_mullo_epi32, in place. So words 0 and 2 alternate
// between the lane orders kGroupBlock and kGroupBlock f, and words 1 and 3, a round behind, are
// always in the order the xors need: starting from the first for words 0, 2 and the second for
// words 1, 3, ten rounds end in the same, and swap_lanes_1_2() puts words 1, 3 back.
inline __m256i swap_lanes_1_2(__m256i v) { return _mm256_shuffle_epi32(v, 0xD8); }  // f

inline __m256i high_dwords(__m256i even, __m256i odd) {
  return _mm256_castps_si256(
      _mm256_shuffle_ps(_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd), 0xDD));
}

// a ^ b ^ c with b ^ c first: off the multiply's dependency chain.
inline __m256i xor3(__m256i a, __m256i b, __m256i c) {
  return _mm256_xor_si256(a, _mm256_xor_si256(b, c));
}

// Philox for `groups` consecutive groups of 8 blocks at once: w[4 i + j] gets word j of group i.
// One group gives only two dependency chains of ten rounds; several groups interleaved in one
// round loop overlap them.
template <int groups>
inline void philox8(uint64_t g, const PhiloxStream& s, __m256i* w) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxRoundB));
  const __m256i g_low = _mm256_set1_epi32(static_cast<int32_t>(g));
  const __m256i g_high_plus_1 = _mm256_set1_epi32(static_cast<int32_t>((g >> 32) + 1));
  __m256i c0[groups], c1[groups], c2[groups], c3[groups];
  for (int i = 0; i < groups; ++i) {
    const __m256i first = _mm256_set1_epi32(8 * i);
    c0[i] = _mm256_add_epi32(g_low,
                             _mm256_add_epi32(first, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)));
    // Word 1, in order kGroupBlock f, carries where the low word g_low + offset wraps.
    const __m256i offset = _mm256_add_epi32(first, _mm256_setr_epi32(0, 4, 2, 6, 1, 5, 3, 7));
    const __m256i low = _mm256_add_epi32(g_low, offset);
    c1[i] = _mm256_add_epi32(g_high_plus_1,
                             _mm256_cmpeq_epi32(_mm256_max_epu32(low, offset), low));
    c2[i] = _mm256_set1_epi32(static_cast<int32_t>(s.step));
    c3[i] = _mm256_set1_epi32(static_cast<int32_t>(s.stream));
  }
  // Unrolled: else GCC keeps the round loop for several groups and spills (20-35% slower).
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const __m256i k0 = _mm256_set1_epi32(static_cast<int32_t>(s.k0[round]));
    const __m256i k1 = _mm256_set1_epi32(static_cast<int32_t>(s.k1[round]));
    for (int i = 0; i < groups; ++i) {
      const __m256i high_b = high_dwords(_mm256_mul_epu32(c2[i], round_b),
                                         _mm256_mul_epu32(_mm256_srli_epi64(c2[i], 32), round_b));
      const __m256i high_a = high_dwords(_mm256_mul_epu32(c0[i], round_a),
                                         _mm256_mul_epu32(_mm256_srli_epi64(c0[i], 32), round_a));
      const __m256i low_b = _mm256_mullo_epi32(c2[i], round_b);
      const __m256i low_a = _mm256_mullo_epi32(c0[i], round_a);
      c0[i] = xor3(high_b, c1[i], k0);
      c2[i] = xor3(high_a, c3[i], k1);
      c1[i] = low_b;
      c3[i] = low_a;
    }
  }
  for (int i = 0; i < groups; ++i) {
    w[4 * i] = c0[i];
    w[4 * i + 1] = swap_lanes_1_2(c1[i]);
    w[4 * i + 2] = c2[i];
    w[4 * i + 3] = swap_lanes_1_2(c3[i]);
  }
}

inline __m256 uniform8(__m256i r) {
  const __m256i v = _mm256_xor_si256(r, _mm256_srai_epi32(r, 31));  // ~r where r < 0
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(kUniformScale));
}

inline __m256 fmadd(__m256 a, __m256 b, __m256 c) {
#ifdef __FMA__
  return _mm256_fmadd_ps(a, b, c);
#else
  return _mm256_add_ps(_mm256_mul_ps(a, b), c);
#endif
}

// The functions below work on n independent vectors at once, each step across all n, so that
// their long dependency chains (the polynomials, the square root) overlap.
template <int n, int m>
inline void horner(const __m256 (&x)[n], const float (&c)[m], __m256 (&acc)[n]) {
  for (int i = 0; i < n; ++i) acc[i] = _mm256_set1_ps(c[m - 1]);
  for (int j = m - 2; j >= 0; --j)
    for (int i = 0; i < n; ++i) acc[i] = fmadd(acc[i], x[i], _mm256_set1_ps(c[j]));
}

// ln(u) for u >= 1e-7 (a normal float): u = m 2^k, m in [0.75, 1.5), k and m from the bits.
template <int n>
inline void log8(__m256 (&u)[n]) {
  __m256 k[n], f[n], p[n];
  for (int i = 0; i < n; ++i) {
    const __m256i bits = _mm256_castps_si256(u[i]);
    const __m256i e =
        _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f400000)), 23);
    const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(e, 23)));
    k[i] = _mm256_cvtepi32_ps(e);
    f[i] = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  }
  horner(f, kLog1pCoeffs, p);
  for (int i = 0; i < n; ++i)
    u[i] = fmadd(k[i], _mm256_set1_ps(kLn2), _mm256_mul_ps(f[i], p[i]));
}

// cos(2 pi u), sin(2 pi u) for u in [0, 1), reduced from u as in the AVX-512 path.
template <int n>
inline void sincos_2pi8(const __m256 (&u)[n], __m256 (&cos_out)[n], __m256 (&sin_out)[n]) {
  __m256 q[n], r[n], r2[n], sin_p[n], cos_r[n];
  for (int i = 0; i < n; ++i) {
    const __m256 x = _mm256_mul_ps(u[i], _mm256_set1_ps(4.0f));
    q[i] = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r[i] = _mm256_sub_ps(x, q[i]);
    r2[i] = _mm256_mul_ps(r[i], r[i]);
  }
  horner(r2, kSinCoeffs, sin_p);
  horner(r2, kCosCoeffs, cos_r);
  for (int i = 0; i < n; ++i) {
    const __m256 sin_r = _mm256_mul_ps(r[i], sin_p[i]);
    const __m256i quadrant = _mm256_cvtps_epi32(q[i]);
    const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2);
    const __m256 swap = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_and_si256(quadrant, one), one));
    const __m256i cos_sign =
        _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(quadrant, one), two), 30);
    const __m256i sin_sign = _mm256_slli_epi32(_mm256_and_si256(quadrant, two), 30);
    cos_out[i] = _mm256_xor_ps(_mm256_blendv_ps(cos_r[i], sin_r, swap),
                               _mm256_castsi256_ps(cos_sign));
    sin_out[i] = _mm256_xor_ps(_mm256_blendv_ps(sin_r, cos_r[i], swap),
                               _mm256_castsi256_ps(sin_sign));
  }
}

// Box-Muller on the n pairs (words[2i], words[2i + 1]): rho cos -> z[2i], rho sin -> z[2i + 1].
template <int n>
inline void box_muller8(const __m256i* words, __m256* z) {
  __m256 rho[n], u_b[n], cos_t[n], sin_t[n];
  for (int i = 0; i < n; ++i) {
    rho[i] = _mm256_max_ps(uniform8(words[2 * i]), _mm256_set1_ps(kBoxMullerMinU));
    u_b[i] = uniform8(words[2 * i + 1]);
  }
  log8(rho);
  sincos_2pi8(u_b, cos_t, sin_t);
  for (int i = 0; i < n; ++i) {
    rho[i] = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), rho[i]));
    z[2 * i] = _mm256_mul_ps(rho[i], cos_t[i]);
    z[2 * i + 1] = _mm256_mul_ps(rho[i], sin_t[i]);
  }
}

// z[w] lane L holds word w of block kGroupBlock[L]; writes the group's 32 elements in order.
inline void interleave4(const __m256 z[4], float* out) {
  const __m256d a = _mm256_castps_pd(_mm256_unpacklo_ps(z[0], z[1]));
  const __m256d b = _mm256_castps_pd(_mm256_unpackhi_ps(z[0], z[1]));
  const __m256d c = _mm256_castps_pd(_mm256_unpacklo_ps(z[2], z[3]));
  const __m256d d = _mm256_castps_pd(_mm256_unpackhi_ps(z[2], z[3]));
  _mm256_storeu_ps(out, _mm256_castpd_ps(_mm256_unpacklo_pd(a, c)));
  _mm256_storeu_ps(out + 8, _mm256_castpd_ps(_mm256_unpackhi_pd(a, c)));
  _mm256_storeu_ps(out + 16, _mm256_castpd_ps(_mm256_unpacklo_pd(b, d)));
  _mm256_storeu_ps(out + 24, _mm256_castpd_ps(_mm256_unpackhi_pd(b, d)));
}

}  // namespace avx2

// Philox on all 2 * tiles groups of a call at once (as fast as 4 groups at a time from 4 tiles,
// faster than fewer groups); Box-Muller a tile (4 pairs of words) at a time, a little faster
// than all 8 pairs at once, which run out of registers.
template <NoiseKind kind, int tiles>
inline void philox_tiles(uint64_t g, const PhiloxStream& s, void* out) {
  constexpr int groups = 2 * tiles;
  __m256i w[4 * groups];
  avx2::philox8<groups>(g, s, w);
  float* dst = static_cast<float*>(out);
  if constexpr (kind == NoiseKind::kNormal) {
    __m256 z[4 * groups];
    for (int t = 0; t < tiles; ++t) avx2::box_muller8<4>(w + 8 * t, z + 8 * t);
    for (int i = 0; i < groups; ++i) avx2::interleave4(z + 4 * i, dst + 32 * i);
  } else {
    for (int i = 0; i < groups; ++i) {
      __m256 z[4];
      for (int j = 0; j < 4; ++j) {
        const __m256i word = w[4 * i + j];
        z[j] = kind == NoiseKind::kBits ? _mm256_castsi256_ps(word) : avx2::uniform8(word);
      }
      avx2::interleave4(z, dst + 32 * i);
    }
  }
}

#else  // portable: one block at a time with the scalar forms above

template <NoiseKind kind, int tiles>
inline void philox_tiles(uint64_t g, const PhiloxStream& s, void* tile) {
  for (int b = 0; b < kTileBlocks * tiles; ++b) {
    const uint64_t block = g + static_cast<uint64_t>(b);
    const PhiloxBlock words = philox4x32_10(static_cast<uint32_t>(block),
                                            static_cast<uint32_t>(block >> 32), s.step,
                                            s.stream, s.key);
    if constexpr (kind == NoiseKind::kBits) {
      std::memcpy(static_cast<uint32_t*>(tile) + 4 * b, words.w, sizeof(words.w));
    } else if constexpr (kind == NoiseKind::kUniform) {
      for (int i = 0; i < 4; ++i)
        static_cast<float*>(tile)[4 * b + i] = uniform_from_bits(words.w[i]);
    } else {
      for (int pair = 0; pair < 2; ++pair) {
        const float u_a = std::fmax(uniform_from_bits(words.w[2 * pair]), kBoxMullerMinU);
        const float theta = kTwoPi * uniform_from_bits(words.w[2 * pair + 1]);
        const float rho = std::sqrt(-2.0f * std::log(u_a));
        static_cast<float*>(tile)[4 * b + 2 * pair] = rho * std::cos(theta);
        static_cast<float*>(tile)[4 * b + 2 * pair + 1] = rho * std::sin(theta);
      }
    }
  }
}

#endif  // __AVX512F__ / __AVX2__

// The spec's draws of kind `kind` for elements [n0, n0 + count) into out (uint32 for kBits,
// float otherwise). Any n0: a start or end inside a tile is generated into a buffer and copied;
// whole tiles go two at a time where they can.
template <NoiseKind kind>
inline void philox_fill(uint64_t n0, int64_t count, const PhiloxStream& s, void* out) {
  static_assert(sizeof(float) == sizeof(uint32_t), "one 4-byte element per draw");
  char* dst = static_cast<char*>(out);
  uint64_t n = n0;
  const uint64_t end = n0 + static_cast<uint64_t>(count);
  alignas(64) uint32_t buffer[kTileElements];
  while (n < end) {
    const uint64_t tile_start = n & ~static_cast<uint64_t>(3);
    const uint64_t skip = n - tile_start;
    uint64_t take = std::min<uint64_t>(kTileElements - skip, end - n);
    if (skip == 0 && end - n >= 2 * kTileElements) {
      philox_tiles<kind, 2>(tile_start >> 2, s, dst);
      take = 2 * kTileElements;
    } else if (skip == 0 && take == kTileElements) {
      philox_tiles<kind, 1>(tile_start >> 2, s, dst);
    } else {
      philox_tiles<kind, 1>(tile_start >> 2, s, buffer);
      std::memcpy(dst, buffer + skip, take * sizeof(uint32_t));
    }
    dst += take * sizeof(uint32_t);
    n += take;
  }
}

inline void philox_bits_bulk(uint64_t n0, int64_t count, const PhiloxStream& s, uint32_t* out) {
  philox_fill<NoiseKind::kBits>(n0, count, s, out);
}

inline void philox_uniform_bulk(uint64_t n0, int64_t count, const PhiloxStream& s, float* out) {
  philox_fill<NoiseKind::kUniform>(n0, count, s, out);
}

inline void philox_normal_bulk(uint64_t n0, int64_t count, const PhiloxStream& s, float* out) {
  philox_fill<NoiseKind::kNormal>(n0, count, s, out);
}

}  // namespace ebm_fast
