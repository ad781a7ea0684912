// Replay-buffer push (ebm_fast/reference/buffer_push.py is the spec): choose each chain's slot
// (write-back, FIFO ring or reservoir with decisions on stream 5), keep only the last writer of
// each slot, then quantise and store the rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "buffer_storage.h"
#include "philox.h"

namespace ebm_fast {
namespace {

constexpr uint32_t kStreamReservoir = 5;
constexpr uint32_t kStreamQuantize = 6;

struct PushParams {
  PhiloxKey key;
  uint32_t step;
  int64_t chain_offset, features;
  bool stochastic;
  Uint8Grid grid;
  PhiloxStream quantize_stream;
};

// Slot of each chain (-1: dropped by the reservoir); advances `count` (a copy of the per-class
// counts, stored back only once every label is known to be valid) as chains are appended.
std::vector<int64_t> append_targets(int64_t batch, const int64_t* y, std::vector<int64_t>& count,
                                    int64_t n_classes, int64_t slots_per_class, bool reservoir,
                                    const PushParams& p) {
  std::vector<int64_t> targets(batch);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t cls = y != nullptr ? y[i] : 0;
    TORCH_CHECK(cls >= 0 && cls < n_classes, "buffer_push: y[", i, "] = ", cls,
                " is not a class of this buffer");
    const int64_t seen = count[cls]++;
    const int64_t base = cls * slots_per_class;
    if (!reservoir) {
      targets[i] = base + seen % slots_per_class;
    } else if (seen < slots_per_class) {
      targets[i] = base + seen;
    } else {
      const uint64_t r = philox_bits(static_cast<uint64_t>(p.chain_offset + i), p.step,
                                     kStreamReservoir, p.key);
      // 128-bit product: r * (seen + 1) leaves 64 bits once a class has seen 2^32 items.
      const int64_t j = static_cast<int64_t>(
          (static_cast<unsigned __int128>(r) * static_cast<uint64_t>(seen + 1)) >> 32);
      targets[i] = j < slots_per_class ? base + j : -1;
    }
  }
  return targets;
}

// Sequential push semantics: where chains share a slot only the last one is stored.
void keep_last_writers(std::vector<int64_t>& targets) {
  std::vector<int64_t> order(targets.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return targets[a] < targets[b]; });
  for (size_t k = 0; k + 1 < order.size(); ++k) {
    if (targets[order[k]] == targets[order[k + 1]]) targets[order[k]] = -1;
  }
}

// scratch: 2 * p.features floats (quantisation and stochastic-rounding uniforms).
template <typename in_t, typename store_t>
void store_row(store_t* dst, const in_t* src, uint64_t first_element, const PushParams& p,
               float* scratch) {
  if constexpr (std::is_same_v<store_t, uint8_t>) {
    float* uniforms = scratch + p.features;
    if (p.stochastic) {
      philox_uniform_bulk(first_element, p.features, p.quantize_stream, uniforms);
      quantize_row<true>(dst, src, p.features, p.grid, scratch, uniforms);
    } else {
      quantize_row<false>(dst, src, p.features, p.grid, scratch, nullptr);
    }
  } else if constexpr (std::is_same_v<store_t, in_t>) {
    std::memcpy(dst, src, sizeof(store_t) * p.features);
  } else {
    for (int64_t j = 0; j < p.features; ++j) {
      dst[j] = static_cast<store_t>(static_cast<float>(src[j]));
    }
  }
}

void buffer_push_out(at::Tensor storage, at::Tensor written, at::Tensor count,
                     const at::Tensor& x, const std::optional<at::Tensor>& idx,
                     const std::optional<at::Tensor>& y, const at::Tensor& seed,
                     const at::Tensor& step, int64_t chain_offset, int64_t slots_per_class,
                     std::string policy, double lo, double hi, bool stochastic) {
  TORCH_CHECK(storage.is_contiguous() && written.is_contiguous() && count.is_contiguous() &&
                  x.is_contiguous(),
              "buffer_push: tensors must be contiguous");
  TORCH_CHECK(policy == "fifo" || policy == "reservoir", "buffer_push: unknown policy '",
              policy, "'");
  const int64_t batch = x.size(0), capacity = storage.size(0);
  const PushParams p{PhiloxKey(seed.item<int64_t>()), static_cast<uint32_t>(step.item<int64_t>()),
                     chain_offset, storage.size(1), stochastic, Uint8Grid(lo, hi),
                     PhiloxStream(PhiloxKey(seed.item<int64_t>()),
                                  static_cast<uint32_t>(step.item<int64_t>()), kStreamQuantize)};
  std::vector<int64_t> targets;
  if (idx.has_value()) {
    const int64_t* idx_ptr = idx->data_ptr<int64_t>();
    targets.assign(idx_ptr, idx_ptr + batch);
    for (int64_t i = 0; i < batch; ++i) {
      TORCH_CHECK(targets[i] >= 0 && targets[i] < capacity, "buffer_push: idx[", i, "] = ",
                  targets[i], " is not a slot of this buffer");
    }
  } else {
    int64_t* count_ptr = count.data_ptr<int64_t>();
    std::vector<int64_t> counts(count_ptr, count_ptr + count.size(0));
    targets = append_targets(batch, y.has_value() ? y->data_ptr<int64_t>() : nullptr, counts,
                             count.size(0), slots_per_class, policy == "reservoir", p);
    std::copy(counts.begin(), counts.end(), count_ptr);
  }
  keep_last_writers(targets);
  uint8_t* written_ptr = written.data_ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.features));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "buffer_push", [&] {
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    auto run = [&](auto* storage_ptr) {
      at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(storage.scalar_type() == at::kByte ? 2 * p.features : 0);
        for (int64_t i = begin; i < end; ++i) {
          if (targets[i] < 0) continue;
          store_row(storage_ptr + targets[i] * p.features, x_ptr + i * p.features,
                    static_cast<uint64_t>(chain_offset + i) * p.features, p, scratch.data());
          written_ptr[targets[i]] = 1;
        }
      });
    };
    switch (storage.scalar_type()) {
      case at::kFloat: run(storage.data_ptr<float>()); break;
      case at::kBFloat16: run(storage.data_ptr<c10::BFloat16>()); break;
      case at::kByte: run(storage.data_ptr<uint8_t>()); break;
      default:
        TORCH_CHECK(false, "buffer_push: unsupported storage dtype ", storage.scalar_type());
    }
  });
}

}  // namespace
}  // namespace ebm_fast

TORCH_LIBRARY_FRAGMENT(ebm_fast_cpu, m) {
  m.def("buffer_push_out(Tensor(a!) storage, Tensor(b!) written, Tensor(c!) count, Tensor x, "
        "Tensor? idx, Tensor? y, Tensor seed, Tensor step, int chain_offset, "
        "int slots_per_class, str policy, float lo, float hi, bool stochastic) -> ()");
}

TORCH_LIBRARY_IMPL(ebm_fast_cpu, CPU, m) {
  m.impl("buffer_push_out", &ebm_fast::buffer_push_out);
}
