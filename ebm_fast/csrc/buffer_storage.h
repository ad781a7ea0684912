// Replay-buffer storage rows (ebm_fast/reference/buffer_sample.py, buffer_push.py): float32 and
// bfloat16 rows hold values, uint8 rows hold codes on a grid over [lo, hi]. Constants are
// rounded from double to float32 exactly as the reference rounds them, so every backend stores
// the same bytes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace ebm_fast {

constexpr double kUint8Levels = 255.0;

struct Uint8Grid {
  float lo, width, step, inv_step;
  Uint8Grid(double lo_d, double hi_d)
      : lo(static_cast<float>(lo_d)),
        width(static_cast<float>(hi_d - lo_d)),
        step(static_cast<float>((hi_d - lo_d) / kUint8Levels)),
        inv_step(static_cast<float>(kUint8Levels / (hi_d - lo_d))) {}
};

inline float dequantize(float v, const Uint8Grid&) { return v; }
inline float dequantize(c10::BFloat16 v, const Uint8Grid&) { return static_cast<float>(v); }
inline float dequantize(uint8_t q, const Uint8Grid& grid) {
  return grid.lo + static_cast<float>(q) * grid.step;
}

inline int32_t float_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// uint8 codes of a row: v = clamp((x - lo) / step, 0, 255), rounded up where its fraction
// v - floor(v) reaches 0.5 (to nearest, half up) or, stochastically, exceeds a uniform.
// Two passes over a scratch row of `count` floats, because GCC vectorises each but not one
// fused loop (its float compares count as control flow under the default -ftrapping-math).
template <bool kStochastic, typename in_t>
inline void quantize_row(uint8_t* __restrict dst, const in_t* __restrict src, int64_t count,
                         const Uint8Grid& grid, float* __restrict scratch,
                         const float* __restrict uniforms) {
  const float lo = grid.lo, inv_step = grid.inv_step;
  for (int64_t j = 0; j < count; ++j) {
    const float v = (static_cast<float>(src[j]) - lo) * inv_step;
    scratch[j] = std::min(std::max(v, 0.0f), 255.0f);
  }
  // v >= 0: truncation is floor, and non-negative floats compare like their bit patterns.
  const int32_t half = float_bits(0.5f);
  for (int64_t j = 0; j < count; ++j) {
    const float v = scratch[j];
    const int32_t floor_v = static_cast<int32_t>(v);
    const int32_t frac = float_bits(v - static_cast<float>(floor_v));
    const bool up = kStochastic ? float_bits(uniforms[j]) < frac : frac >= half;
    dst[j] = static_cast<uint8_t>(floor_v + static_cast<int32_t>(up));
  }
}

}  // namespace ebm_fast
