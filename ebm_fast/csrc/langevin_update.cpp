// Op ebm_fast_cpu::langevin_update_out: out = clamp(x - step_size * clip(grad) + noise_scale * xi)
// with xi the noise spec's normals (stream `stream`), as ebm_fast/reference/langevin_update.py.
// One pass over memory: the noise of each tile is generated into an L1-resident buffer and
// consumed at once. Work is split over the flattened (chain, element) range, so many small
// chains and a few large ones both keep every core busy.
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
#include <vector>

#include "philox.h"

namespace ebm_fast {
namespace {

constexpr int64_t kTile = 1024;   // noise buffer: 4 KiB, stays in L1 next to x, grad, out
constexpr int64_t kGrain = 8192;  // elements per parallel work unit at least

// Sum of squares of a chain's gradient: 16 independent accumulator lanes (vectorised without
// reassociating a single sum), folded into a double per tile so long chains keep precision.
template <typename scalar_t, typename acc_t>
double sum_of_squares(const scalar_t* grad, int64_t len) {
  double total = 0.0;
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
template <typename scalar_t, typename acc_t>
std::vector<acc_t> norm_clip_scales(const scalar_t* grad, int64_t chains, int64_t per_chain,
                                    acc_t clip) {
  std::vector<acc_t> scales(chains);
  auto scale_of = [clip](double sum_sq) {
    const acc_t norm = static_cast<acc_t>(std::sqrt(sum_sq));
    return clip / (norm > clip ? norm : clip);
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

template <typename acc_t>
struct UpdateParams {
  acc_t step_size, noise_scale;
  acc_t grad_scale;         // norm clip factor, 1 otherwise (exact)
  acc_t clip;               // value clip bound, +inf otherwise
  acc_t lo, hi;             // clamp bounds, -inf / +inf when absent
};

// The update of one tile. Comparisons rather than std::min/max so NaN propagates as in torch,
// and infinite bounds make absent options exact no-ops (no branches, so it vectorises).
template <typename scalar_t, typename acc_t>
inline void update_tile(scalar_t* out, const scalar_t* x, const scalar_t* grad, const float* noise,
                        int64_t count, const UpdateParams<acc_t>& p) {
  for (int64_t i = 0; i < count; ++i) {
    acc_t g = static_cast<acc_t>(grad[i]) * p.grad_scale;
    g = g < -p.clip ? -p.clip : g;
    g = g > p.clip ? p.clip : g;
    acc_t v = static_cast<acc_t>(x[i]) - p.step_size * g +
              p.noise_scale * static_cast<acc_t>(noise[i]);
    v = v < p.lo ? p.lo : v;
    v = v > p.hi ? p.hi : v;
    out[i] = static_cast<scalar_t>(v);
  }
}

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

template <>
inline void update_tile<c10::Half, float>(c10::Half* out, const c10::Half* x,
                                          const c10::Half* grad, const float* noise,
                                          int64_t count, const UpdateParams<float>& p) {
  alignas(64) float x_f[kTile], grad_f[kTile];
  half_to_float(x, x_f, count);
  half_to_float(grad, grad_f, count);
  update_tile<float, float>(x_f, x_f, grad_f, noise, count, p);
  float_to_half(x_f, out, count);
}
#endif

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
  const acc_t value_clip = grad_clip && !norm_clip ? clip : inf;
  const acc_t lo = clamp_lo ? static_cast<acc_t>(*clamp_lo) : -inf;
  const acc_t hi = clamp_hi ? static_cast<acc_t>(*clamp_hi) : inf;

  at::parallel_for(0, chains * per_chain, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float noise[kTile];
    int64_t pos = begin;
    while (pos < end) {  // one segment per chain touched by this range
      const int64_t chain = pos / per_chain;
      const int64_t within = pos - chain * per_chain;
      const int64_t segment = std::min(end - pos, per_chain - within);
      const UpdateParams<acc_t> params{
          step_sizes[chain * step_size_stride], noise_scales[chain * noise_scale_stride],
          grad_scales.empty() ? acc_t(1) : grad_scales[chain], value_clip, lo, hi};
      const uint64_t n = static_cast<uint64_t>(chain_offset + chain) *
                             static_cast<uint64_t>(per_chain) + static_cast<uint64_t>(within);
      for (int64_t t = 0; t < segment; t += kTile) {
        const int64_t count = std::min(kTile, segment - t);
        prefetch_tile(x_data + pos + t + kTile, grad_data + pos + t + kTile,
                      std::min(kTile, segment - t - count));
        philox_normal_bulk(n + static_cast<uint64_t>(t), count, stream, noise);
        update_tile<scalar_t, acc_t>(out_data + pos + t, x_data + pos + t, grad_data + pos + t,
                                     noise, count, params);
      }
      pos += segment;
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
