// The noise spec (DESIGN.md, ebm_fast/noise.py) in C++: Philox4x32-10 as Triton's tl.philox,
// Triton's uint -> uniform float map, and Box-Muller as Triton's randn4x.
// Scalar forms here serve per-chain draws; bulk per-element noise uses the vectorised forms.
#pragma once

#include <cmath>
#include <cstdint>

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

// Box-Muller on the pair holding element n: cos for even n, sin for odd n.
inline float philox_normal(uint64_t n, uint32_t step, uint32_t stream, PhiloxKey key) {
  const PhiloxBlock b = philox_block(n, step, stream, key);
  const int pair = static_cast<int>((n & 3) >> 1);
  const float u_a = std::fmax(uniform_from_bits(b.w[2 * pair]), kBoxMullerMinU);
  const float theta = kTwoPi * uniform_from_bits(b.w[2 * pair + 1]);
  const float rho = std::sqrt(-2.0f * std::log(u_a));
  return (n & 1) ? rho * std::sin(theta) : rho * std::cos(theta);
}

}  // namespace ebm_fast
