// Op ebm_fast_cpu::philox_out: fills a (chains, ...) tensor with the noise spec's draws
// (normal / uniform float32, raw bits int32), vectorised via philox.h, parallel over elements.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "philox.h"

namespace ebm_fast {
namespace {

// Elements per parallel work unit: large enough to amortise scheduling, small enough that two
// cores split a 64K draw.
constexpr int64_t kGrain = 8192;

void philox_out(at::Tensor& out, const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                int64_t chain_offset, c10::string_view distribution) {
  TORCH_CHECK(out.device().is_cpu() && seed.device().is_cpu() && step.device().is_cpu(),
              "philox_out (cpu): out, seed and step must be CPU tensors");
  TORCH_CHECK(out.is_contiguous(), "philox_out: out must be contiguous");
  TORCH_CHECK(out.dim() >= 1, "philox_out: out needs a leading chain axis");
  TORCH_CHECK(seed.dim() == 0 && step.dim() == 0 && seed.scalar_type() == at::kLong &&
                  step.scalar_type() == at::kLong,
              "philox_out: seed and step must be 0-dim int64 tensors");
  TORCH_CHECK(chain_offset >= 0, "philox_out: chain_offset must be >= 0");
  const bool bits = distribution == "bits";
  TORCH_CHECK(bits || distribution == "normal" || distribution == "uniform",
              "philox_out: distribution must be 'normal', 'uniform' or 'bits', got ", distribution);
  TORCH_CHECK(out.scalar_type() == (bits ? at::kInt : at::kFloat), "philox_out: out must be ",
              bits ? "int32" : "float32", " for distribution ", distribution);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const int64_t per_chain = numel / out.size(0);
  const PhiloxStream s(PhiloxKey(seed.item<int64_t>()),
                       static_cast<uint32_t>(step.item<int64_t>()),
                       static_cast<uint32_t>(stream));
  // Chains are contiguous, so the tensor is the one run of indices from chain_offset * per_chain.
  const uint64_t n0 = static_cast<uint64_t>(chain_offset) * static_cast<uint64_t>(per_chain);
  void* data = out.data_ptr();
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    uint32_t* dst = static_cast<uint32_t*>(data) + begin;
    const uint64_t n = n0 + static_cast<uint64_t>(begin);
    if (bits) {
      philox_bits_bulk(n, end - begin, s, dst);
    } else if (distribution == "uniform") {
      philox_uniform_bulk(n, end - begin, s, reinterpret_cast<float*>(dst));
    } else {
      philox_normal_bulk(n, end - begin, s, reinterpret_cast<float*>(dst));
    }
  });
}

}  // namespace
}  // namespace ebm_fast

TORCH_LIBRARY_FRAGMENT(ebm_fast_cpu, m) {
  m.def(
      "philox_out(Tensor(a!) out, Tensor seed, Tensor step, int stream, int chain_offset, "
      "str distribution) -> ()");
}

TORCH_LIBRARY_IMPL(ebm_fast_cpu, CPU, m) { m.impl("philox_out", &ebm_fast::philox_out); }
