// Replay-buffer storage rows (ebm_fast/reference/buffer_sample.py, buffer_push.py): float32 and
// bfloat16 rows hold values, uint8 rows hold codes on a grid over [lo, hi]. Constants are
// rounded from double to float32 exactly as the reference rounds them, so every backend stores
// the same bytes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

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

// v = clamp((x - lo) / step, 0, 255) split into floor and fraction; the caller rounds up when
// the fraction passes its threshold (0.5: nearest, half up; a uniform: stochastic).
inline void uint8_position(float x, const Uint8Grid& grid, float* floor_v, float* frac) {
  float v = (x - grid.lo) * grid.inv_step;
  v = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
  *floor_v = std::floor(v);
  *frac = v - *floor_v;
}

inline uint8_t quantize_nearest(float x, const Uint8Grid& grid) {
  float floor_v, frac;
  uint8_position(x, grid, &floor_v, &frac);
  return static_cast<uint8_t>(floor_v + (frac >= 0.5f ? 1.0f : 0.0f));
}

inline uint8_t quantize_stochastic(float x, float u, const Uint8Grid& grid) {
  float floor_v, frac;
  uint8_position(x, grid, &floor_v, &frac);
  return static_cast<uint8_t>(floor_v + (u < frac ? 1.0f : 0.0f));
}

}  // namespace ebm_fast
