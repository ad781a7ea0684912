// Op ebm_fast_cpu::mala_accept_out: fused MALA accept/reject on the CPU.
// The spec is ebm_fast/reference/mala_accept.py. One pass per chain: the reduction
// s = sum((g_x + g_y) * (eps (g_y - g_x) - 2 (y - x))), the accept decision against the spec's
// per-chain uniform (n = chain index), then, for accepted chains only, the copy of y, grad_y and
// energy_y into x, grad_x and energy_x (rejected chains cost one read of the four rows).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "philox.h"

namespace ebm_fast {
namespace {

// A 0-dim (shared by all chains) or per-chain (B,) parameter.
template <typename acc_t>
struct ChainParam {
  const acc_t* data;
  int64_t stride;
  explicit ChainParam(const at::Tensor& t)
      : data(t.data_ptr<acc_t>()), stride(t.numel() == 1 ? 0 : 1) {}
  acc_t operator[](int64_t chain) const { return data[chain * stride]; }
};

template <typename scalar_t>
void mala_accept_typed(at::Tensor& accepted, at::Tensor& accept_prob, at::Tensor& x,
                       const at::Tensor& y, at::Tensor& grad_x, const at::Tensor& grad_y,
                       at::Tensor& energy_x, const at::Tensor& energy_y,
                       const at::Tensor& step_size, const at::Tensor& temperature, int64_t seed,
                       uint32_t step, uint32_t stream, int64_t chain_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t chains = x.size(0);
  const int64_t per_chain = chains ? x.numel() / chains : 0;
  scalar_t* x_data = x.data_ptr<scalar_t>();
  scalar_t* grad_x_data = grad_x.data_ptr<scalar_t>();
  const scalar_t* y_data = y.data_ptr<scalar_t>();
  const scalar_t* grad_y_data = grad_y.data_ptr<scalar_t>();
  acc_t* energy_x_data = energy_x.data_ptr<acc_t>();
  const acc_t* energy_y_data = energy_y.data_ptr<acc_t>();
  bool* accepted_data = accepted.data_ptr<bool>();
  acc_t* accept_prob_data = accept_prob.data_ptr<acc_t>();
  const ChainParam<acc_t> eps_of(step_size), temp_of(temperature);
  const PhiloxKey key(seed);
  // Enough chains per task to amortise scheduling when chains are short.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(per_chain, 1));

  at::parallel_for(0, chains, grain, [&](int64_t begin, int64_t end) {
    for (int64_t chain = begin; chain < end; ++chain) {
      const int64_t row = chain * per_chain;
      const scalar_t* xr = x_data + row;
      const scalar_t* yr = y_data + row;
      const scalar_t* gxr = grad_x_data + row;
      const scalar_t* gyr = grad_y_data + row;
      const acc_t eps = eps_of[chain];
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < per_chain; ++j) {
        const acc_t gx = static_cast<acc_t>(gxr[j]);
        const acc_t gy = static_cast<acc_t>(gyr[j]);
        const acc_t dx = static_cast<acc_t>(yr[j]) - static_cast<acc_t>(xr[j]);
        sum += (gx + gy) * (eps * (gy - gx) - 2 * dx);
      }
      const acc_t temp = temp_of[chain];
      const acc_t e_x = energy_x_data[chain];
      const acc_t e_y = energy_y_data[chain];
      const acc_t log_alpha = -(e_y - e_x) / temp - sum / (4 * temp);
      const acc_t prob = (std::isfinite(e_y) && !std::isnan(log_alpha))
                             ? std::exp(std::min(log_alpha, acc_t(0)))
                             : acc_t(0);
      const float u = philox_uniform(static_cast<uint64_t>(chain_offset + chain), step, stream,
                                     key);
      const bool take = static_cast<acc_t>(u) < prob;
      accepted_data[chain] = take;
      accept_prob_data[chain] = prob;
      if (take) {
        std::copy(yr, yr + per_chain, x_data + row);
        std::copy(gyr, gyr + per_chain, grad_x_data + row);
        energy_x_data[chain] = e_y;
      }
    }
  });
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "mala_accept_out: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "mala_accept_out: ", name, " must be contiguous");
}

// One value per chain (or one shared value where shared is allowed), of the given dtype.
void check_chain_vector(const at::Tensor& t, const char* name, at::ScalarType dtype,
                        int64_t chains, bool shared_allowed) {
  TORCH_CHECK(t.scalar_type() == dtype, "mala_accept_out: ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == chains || (shared_allowed && t.dim() == 0), "mala_accept_out: ", name,
              " must hold one value per chain (", chains, "), got shape ", t.sizes());
}

// Arguments as ebm_fast/ops/mala_accept.py passes them: outputs, then the op's inputs
// (x, grad_x, energy_x are updated in place), all contiguous CPU tensors.
void mala_accept_out(at::Tensor accepted, at::Tensor accept_prob, at::Tensor x,
                     const at::Tensor& y, at::Tensor grad_x, const at::Tensor& grad_y,
                     at::Tensor energy_x, const at::Tensor& energy_y,
                     const at::Tensor& step_size, const at::Tensor& temperature,
                     const at::Tensor& seed, const at::Tensor& step, int64_t stream,
                     int64_t chain_offset) {
  const std::pair<const at::Tensor*, const char*> tensors[] = {
      {&accepted, "accepted"}, {&accept_prob, "accept_prob"}, {&x, "x"}, {&y, "y"},
      {&grad_x, "grad_x"}, {&grad_y, "grad_y"}, {&energy_x, "energy_x"},
      {&energy_y, "energy_y"}, {&step_size, "step_size"}, {&temperature, "temperature"}};
  for (const auto& [tensor, name] : tensors) check_cpu_contiguous(*tensor, name);
  TORCH_CHECK(x.dim() >= 1, "mala_accept_out: x needs a leading chain axis");
  const int64_t chains = x.size(0);
  TORCH_CHECK(y.sizes() == x.sizes() && grad_x.sizes() == x.sizes() &&
                  grad_y.sizes() == x.sizes(),
              "mala_accept_out: y, grad_x and grad_y must have x's shape");
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && grad_x.scalar_type() == x.scalar_type() &&
                  grad_y.scalar_type() == x.scalar_type(),
              "mala_accept_out: y, grad_x and grad_y must have x's dtype");
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_chain_vector(accepted, "accepted", at::kBool, chains, false);
  check_chain_vector(accept_prob, "accept_prob", compute, chains, false);
  check_chain_vector(energy_x, "energy_x", compute, chains, false);
  check_chain_vector(energy_y, "energy_y", compute, chains, false);
  check_chain_vector(step_size, "step_size", compute, chains, true);
  check_chain_vector(temperature, "temperature", compute, chains, true);
  if (chains == 0) return;
  const int64_t seed_value = seed.item<int64_t>();  // CPU scalars: no device synchronisation
  const uint32_t step_value = static_cast<uint32_t>(step.item<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "mala_accept_out", [&] {
        mala_accept_typed<scalar_t>(accepted, accept_prob, x, y, grad_x, grad_y, energy_x,
                                    energy_y, step_size, temperature, seed_value, step_value,
                                    static_cast<uint32_t>(stream), chain_offset);
      });
}

}  // namespace
}  // namespace ebm_fast

TORCH_LIBRARY_FRAGMENT(ebm_fast_cpu, m) {
  m.def(
      "mala_accept_out(Tensor(a!) accepted, Tensor(b!) accept_prob, Tensor(c!) x, Tensor y, "
      "Tensor(d!) grad_x, Tensor grad_y, Tensor(e!) energy_x, Tensor energy_y, "
      "Tensor step_size, Tensor temperature, Tensor seed, Tensor step, int stream, "
      "int chain_offset) -> ()");
}

TORCH_LIBRARY_IMPL(ebm_fast_cpu, CPU, m) {
  m.impl("mala_accept_out", &ebm_fast::mala_accept_out);
}
