// Op ebm_fast_cpu::langevin_update_out: out = clamp(x - step_size * clip(grad) + noise_scale * xi)
// with xi the noise spec's normals (stream `stream`), as ebm_fast/reference/langevin_update.py.
// One pass over memory: the noise of each tile is generated into an L1-resident buffer and
// consumed at once. Work is split over the flattened (chain, element) range, so many small
// chains and a few large ones both keep every core busy, and a tile spans chains when they
// are short.
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <optional>
#include <type_traits>
#include <vector>

#include "philox.h"

namespace ebm_fast {
namespace {

constexpr int64_t kTile = 1024;   // noise buffer: 4 KiB, stays in L1 next to x, grad, out
constexpr int64_t kGrain = 8192;  // elements per parallel work unit at least
// Chains shorter than this share a tile: per-chain parameters are expanded per element.
constexpr int64_t kShortChain = 256;

// Sum of squares of a chain's gradient: 16 independent accumulator lanes (vectorised without
// reassociating a single sum), folded into a double per tile so long chains keep precision.
template <typename scalar_t, typename acc_t>
double sum_of_squares(const scalar_t* grad, int64_t len) {
  double total = 0.0;
  if (len < 16) {  // short chains: the 16-lane form would cost more than the work
    for (int64_t i = 0; i < len; ++i) {
      const acc_t v = static_cast<acc_t>(grad[i]);
      total += static_cast<double>(v * v);
    }
    return total;
  }
  for (int64_t start = 0; start < len; start += kTile) {
    const int64_t count = std::min(kTile, len - start);
    const scalar_t* g = grad + start;
    acc_t lanes[16] = {};
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
      for (int k = 0; k < 16; ++k) {
        const acc_t v = static_cast<acc_t>(g[i + k]);
        lanes[k] += v * v;
      }
    }
    for (; i < count; ++i) {
      const acc_t v = static_cast<acc_t>(g[i]);
      lanes[0] += v * v;
    }
    for (int k = 0; k < 16; ++k) total += lanes[k];
  }
  return total;
}

// Per-chain factor of the "norm" clip: c / max(|grad_chain|, c), as the reference computes it.
// A NaN norm is kept (torch's clamp propagates it), so a chain with a NaN gradient turns NaN
// whole, on every backend.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> norm_clip_scales(const scalar_t* grad, int64_t chains, int64_t per_chain,
                                    acc_t clip) {
  std::vector<acc_t> scales(chains);
  auto scale_of = [clip](double sum_sq) {
    const acc_t norm = static_cast<acc_t>(std::sqrt(sum_sq));
    return clip / (norm < clip ? clip : norm);
  };
  if (chains >= at::get_num_threads()) {
    at::parallel_for(0, chains, std::max<int64_t>(1, kGrain / per_chain), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        scales[c] = scale_of(sum_of_squares<scalar_t, acc_t>(grad + c * per_chain, per_chain));
    });
  } else {  // few long chains: split each chain's reduction over the cores
    for (int64_t c = 0; c < chains; ++c) {
      const scalar_t* g = grad + c * per_chain;
      const double sum_sq = at::parallel_reduce(
          0, per_chain, kGrain, 0.0,
          [&](int64_t b, int64_t e, double acc) {
            return acc + sum_of_squares<scalar_t, acc_t>(g + b, e - b);
          },
          [](double a, double b) { return a + b; });
      scales[c] = scale_of(sum_sq);
    }
  }
  return scales;
}

// Start loading the next tile's x and grad while this tile's noise is generated (compute),
// so the update then finds them in cache instead of waiting on memory.
template <typename scalar_t>
inline void prefetch_tile(const scalar_t* x, const scalar_t* grad, int64_t count) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t i = 0; i < count; i += kLine) {
    __builtin_prefetch(x + i, 1);
    __builtin_prefetch(grad + i, 0);
  }
}

// A per-chain parameter as the update loop reads it: one value for a run inside one chain, or
// one value per element of a tile that spans many short chains.
template <typename acc_t>
struct Broadcast {
  acc_t value;
  acc_t operator[](int64_t) const { return value; }
};

template <typename acc_t>
struct PerElement {
  const acc_t* values;
  acc_t operator[](int64_t i) const { return values[i]; }
};

template <typename acc_t>
struct Bounds {
  acc_t clip;    // value clip bound, +inf otherwise
  acc_t lo, hi;  // clamp bounds, -inf / +inf when absent
};

#ifdef __F16C__
// c10::Half's scalar conversions do not vectorise (4x slower than float32 here); F16C converts
// 8 at a time, rounding to nearest even as c10::Half does.
inline void half_to_float(const c10::Half* in, float* out, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

inline void float_to_half(const float* in, c10::Half* out, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < count; ++i) out[i] = static_cast<c10::Half>(in[i]);
}
#endif

// The update of `count` (<= kTile) elements. grad_scale is the norm clip factor (1, exact,
// otherwise). Comparisons rather than std::min/max so NaN propagates as in torch, and infinite
// bounds make absent options exact no-ops (no branches, so it vectorises).
template <typename scalar_t, typename acc_t, typename Param>
inline void update_run(scalar_t* out, const scalar_t* x, const scalar_t* grad, const float* noise,
                       int64_t count, Param step_size, Param noise_scale, Param grad_scale,
                       const Bounds<acc_t>& b) {
#ifdef __F16C__
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    alignas(64) float x_f[kTile], grad_f[kTile];
    half_to_float(x, x_f, count);
    half_to_float(grad, grad_f, count);
    update_run<float, float>(x_f, x_f, grad_f, noise, count, step_size, noise_scale, grad_scale,
                             b);
    float_to_half(x_f, out, count);
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) {
    acc_t g = static_cast<acc_t>(grad[i]) * grad_scale[i];
    g = g < -b.clip ? -b.clip : g;
    g = g > b.clip ? b.clip : g;
    acc_t v = static_cast<acc_t>(x[i]) - step_size[i] * g +
              noise_scale[i] * static_cast<acc_t>(noise[i]);
    v = v < b.lo ? b.lo : v;
    v = v > b.hi ? b.hi : v;
    out[i] = static_cast<scalar_t>(v);
  }
}

// Calls fn(chain, begin, end) for each chain's part of the flat range [begin, end).
// One division per call: a 64-bit division per chain would dominate for 2-element chains.
template <typename Fn>
inline void for_each_chain_segment(int64_t begin, int64_t end, int64_t per_chain, Fn fn) {
  int64_t chain = begin / per_chain;
  for (int64_t pos = begin; pos < end; ++chain) {
    const int64_t segment_end = std::min(end, (chain + 1) * per_chain);
    fn(chain, pos, segment_end);
    pos = segment_end;
  }
}

template <typename scalar_t>
void langevin_update_kernel(at::Tensor& out, const at::Tensor& x, const at::Tensor& grad,
                            const at::Tensor& step_size, const at::Tensor& noise_scale,
                            const PhiloxStream& stream, int64_t chain_offset,
                            std::optional<double> grad_clip, bool norm_clip,
                            std::optional<double> clamp_lo, std::optional<double> clamp_hi) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t chains = x.size(0);
  const int64_t per_chain = x.numel() / chains;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* grad_data = grad.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const acc_t* step_sizes = step_size.const_data_ptr<acc_t>();
  const acc_t* noise_scales = noise_scale.const_data_ptr<acc_t>();
  const int64_t step_size_stride = step_size.numel() == 1 ? 0 : 1;
  const int64_t noise_scale_stride = noise_scale.numel() == 1 ? 0 : 1;
  const acc_t clip = grad_clip ? static_cast<acc_t>(*grad_clip) : inf;
  const std::vector<acc_t> grad_scales =
      grad_clip && norm_clip
          ? norm_clip_scales<scalar_t, acc_t>(grad_data, chains, per_chain, clip)
          : std::vector<acc_t>();
  const Bounds<acc_t> bounds{grad_clip && !norm_clip ? clip : inf,
                             clamp_lo ? static_cast<acc_t>(*clamp_lo) : -inf,
                             clamp_hi ? static_cast<acc_t>(*clamp_hi) : inf};
  const acc_t unit_scale = 1;
  const acc_t* grad_scale_data = grad_scales.empty() ? &unit_scale : grad_scales.data();
  const int64_t grad_scale_stride = grad_scales.empty() ? 0 : 1;
  // Chains are contiguous, so the noise of the flat range [t, t + count) is the one run of
  // global indices from chain_offset * per_chain + t: a tile is drawn whole even when it spans
  // many short chains.
  const uint64_t first_index = static_cast<uint64_t>(chain_offset) * static_cast<uint64_t>(per_chain);
  const bool short_chains = per_chain < kShortChain;

  at::parallel_for(0, chains * per_chain, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float noise[kTile];
    for (int64_t t = begin; t < end;) {
      // Tiles aligned to kTile in the global index, so that all but the first start on a
      // Philox tile and draw no block twice.
      const uint64_t n = first_index + static_cast<uint64_t>(t);
      const int64_t count = std::min<int64_t>(end - t, kTile - static_cast<int64_t>(n % kTile));
      prefetch_tile(x_data + t + count, grad_data + t + count, std::min(kTile, end - t - count));
      philox_normal_bulk(n, count, stream, noise);
      if (short_chains) {  // expand the parameters per element, then one vectorised pass
        alignas(64) acc_t eps[kTile], sigma[kTile], scale[kTile];
        for_each_chain_segment(t, t + count, per_chain, [&](int64_t chain, int64_t b, int64_t e) {
          const acc_t chain_eps = step_sizes[chain * step_size_stride];
          const acc_t chain_sigma = noise_scales[chain * noise_scale_stride];
          const acc_t chain_scale = grad_scale_data[chain * grad_scale_stride];
          for (int64_t i = b - t; i < e - t; ++i) {
            eps[i] = chain_eps;
            sigma[i] = chain_sigma;
            scale[i] = chain_scale;
          }
        });
        update_run<scalar_t, acc_t>(out_data + t, x_data + t, grad_data + t, noise, count,
                                    PerElement<acc_t>{eps}, PerElement<acc_t>{sigma},
                                    PerElement<acc_t>{scale}, bounds);
      } else {
        for_each_chain_segment(t, t + count, per_chain, [&](int64_t chain, int64_t b, int64_t e) {
          update_run<scalar_t, acc_t>(
              out_data + b, x_data + b, grad_data + b, noise + (b - t), e - b,
              Broadcast<acc_t>{step_sizes[chain * step_size_stride]},
              Broadcast<acc_t>{noise_scales[chain * noise_scale_stride]},
              Broadcast<acc_t>{grad_scale_data[chain * grad_scale_stride]}, bounds);
        });
      }
      t += count;
    }
  });
}

void check_chain_param(const at::Tensor& param, const char* name, int64_t chains,
                       at::ScalarType dtype) {
  TORCH_CHECK(param.device().is_cpu(), "langevin_update_out (cpu): ", name, " must be on the CPU");
  TORCH_CHECK(param.scalar_type() == dtype, "langevin_update_out: ", name, " must have dtype ",
              dtype, ", got ", param.scalar_type());
  TORCH_CHECK(param.dim() == 0 || (param.dim() == 1 && param.size(0) == chains),
              "langevin_update_out: ", name, " must be 0-dim or of shape (", chains, ",)");
  TORCH_CHECK(param.is_contiguous(), "langevin_update_out: ", name, " must be contiguous");
}

void langevin_update_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& grad,
                         const at::Tensor& step_size, const at::Tensor& noise_scale,
                         const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                         int64_t chain_offset, std::optional<double> grad_clip,
                         c10::string_view grad_clip_mode, std::optional<double> clamp_lo,
                         std::optional<double> clamp_hi) {
  TORCH_CHECK(x.device().is_cpu() && grad.device().is_cpu() && out.device().is_cpu(),
              "langevin_update_out (cpu): out, x and grad must be CPU tensors");
  TORCH_CHECK(x.dim() >= 1, "langevin_update_out: x needs a leading chain axis");
  TORCH_CHECK(grad.sizes() == x.sizes() && out.sizes() == x.sizes(),
              "langevin_update_out: out, x and grad must have the same shape");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "langevin_update_out: out, x and grad must have the same dtype");
  TORCH_CHECK(x.is_contiguous() && grad.is_contiguous() && out.is_contiguous(),
              "langevin_update_out: out, x and grad must be contiguous");
  TORCH_CHECK(seed.dim() == 0 && step.dim() == 0 && seed.scalar_type() == at::kLong &&
                  step.scalar_type() == at::kLong && seed.device().is_cpu() &&
                  step.device().is_cpu(),
              "langevin_update_out: seed and step must be 0-dim int64 CPU tensors");
  TORCH_CHECK(grad_clip_mode == "value" || grad_clip_mode == "norm",
              "langevin_update_out: grad_clip_mode must be 'value' or 'norm', got ",
              grad_clip_mode);
  TORCH_CHECK(chain_offset >= 0, "langevin_update_out: chain_offset must be >= 0");
  const at::ScalarType acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_chain_param(step_size, "step_size", x.size(0), acc_dtype);
  check_chain_param(noise_scale, "noise_scale", x.size(0), acc_dtype);
  if (x.numel() == 0) return;
  const PhiloxStream philox(PhiloxKey(seed.item<int64_t>()),
                            static_cast<uint32_t>(step.item<int64_t>()),
                            static_cast<uint32_t>(stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "langevin_update_out", [&] {
        langevin_update_kernel<scalar_t>(out, x, grad, step_size, noise_scale, philox,
                                         chain_offset, grad_clip, grad_clip_mode == "norm",
                                         clamp_lo, clamp_hi);
      });
}

}  // namespace
}  // namespace ebm_fast

TORCH_LIBRARY_FRAGMENT(ebm_fast_cpu, m) {
  m.def(
      "langevin_update_out(Tensor(a!) out, Tensor x, Tensor grad, Tensor step_size, "
      "Tensor noise_scale, Tensor seed, Tensor step, int stream, int chain_offset, "
      "float? grad_clip, str grad_clip_mode, float? clamp_lo, float? clamp_hi) -> ()");
}

TORCH_LIBRARY_IMPL(ebm_fast_cpu, CPU, m) {
  m.impl("langevin_update_out", &ebm_fast::langevin_update_out);
}
