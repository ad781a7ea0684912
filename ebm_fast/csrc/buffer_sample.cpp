// Replay-buffer draw (ebm_fast/reference/buffer_sample.py is the spec): per chain, pick a slot
// (stream 4), decide on reinit (stream 2, or the slot was never written), then either dequantise
// the stored row or write fresh init values (stream 3) — one pass over the batch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "buffer_storage.h"
#include "philox.h"

namespace ebm_fast {
namespace {

constexpr uint32_t kStreamReinitDecision = 2;
constexpr uint32_t kStreamReinitValues = 3;
constexpr uint32_t kStreamSlot = 4;

enum class InitKind { kUniform, kGaussian, kValues };

InitKind parse_init_kind(const std::string& kind) {
  if (kind == "uniform") return InitKind::kUniform;
  if (kind == "gaussian") return InitKind::kGaussian;
  TORCH_CHECK(kind == "values", "buffer_sample: unknown init_kind '", kind, "'");
  return InitKind::kValues;
}

struct SampleParams {
  PhiloxKey key;
  uint32_t step;
  int64_t chain_offset, slots_per_class, features;
  float reinit_prob;
  InitKind init_kind;
  Uint8Grid grid;
  PhiloxStream values_stream;
};

// noise: scratch of p.features floats.
template <typename out_t>
void fill_init_noise(out_t* row, uint64_t first_element, const SampleParams& p, float* noise) {
  if (p.init_kind == InitKind::kGaussian) {
    philox_normal_bulk(first_element, p.features, p.values_stream, noise);
    for (int64_t j = 0; j < p.features; ++j) row[j] = static_cast<out_t>(noise[j]);
  } else {
    philox_uniform_bulk(first_element, p.features, p.values_stream, noise);
    for (int64_t j = 0; j < p.features; ++j) {
      row[j] = static_cast<out_t>(p.grid.lo + p.grid.width * noise[j]);
    }
  }
}

template <typename out_t, typename store_t>
void load_row(out_t* row, const store_t* stored, const SampleParams& p) {
  if constexpr (std::is_same_v<out_t, store_t>) {
    std::memcpy(row, stored, sizeof(out_t) * p.features);
  } else {
    for (int64_t j = 0; j < p.features; ++j) {
      row[j] = static_cast<out_t>(dequantize(stored[j], p.grid));
    }
  }
}

template <typename out_t, typename store_t>
void sample_rows(out_t* out, int64_t* slots, const store_t* storage, const uint8_t* written,
                 const int64_t* y, const out_t* init_values, int64_t batch, int64_t capacity,
                 const SampleParams& p) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.features));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> noise;
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t chain = static_cast<uint64_t>(p.chain_offset + i);
      const uint64_t r = philox_bits(chain, p.step, kStreamSlot, p.key);
      int64_t slot = static_cast<int64_t>((r * static_cast<uint64_t>(p.slots_per_class)) >> 32);
      if (y != nullptr) {
        TORCH_CHECK(y[i] >= 0 && (y[i] + 1) * p.slots_per_class <= capacity,
                    "buffer_sample: y[", i, "] = ", y[i], " is not a class of this buffer");
        slot += y[i] * p.slots_per_class;
      }
      slots[i] = slot;
      const bool reinit =
          philox_uniform(chain, p.step, kStreamReinitDecision, p.key) < p.reinit_prob ||
          written[slot] == 0;
      out_t* row = out + i * p.features;
      if (!reinit) {
        load_row(row, storage + slot * p.features, p);
      } else if (p.init_kind == InitKind::kValues) {
        std::memcpy(row, init_values + i * p.features, sizeof(out_t) * p.features);
      } else {
        noise.resize(p.features);
        fill_init_noise(row, chain * static_cast<uint64_t>(p.features), p, noise.data());
      }
    }
  });
}

void buffer_sample_out(at::Tensor out, at::Tensor slots, const at::Tensor& storage,
                       const at::Tensor& written, const std::optional<at::Tensor>& y,
                       const std::optional<at::Tensor>& init_values, const at::Tensor& seed,
                       const at::Tensor& step, int64_t chain_offset, int64_t slots_per_class,
                       double reinit_prob, std::string init_kind, double lo, double hi) {
  TORCH_CHECK(out.is_contiguous() && storage.is_contiguous() && written.is_contiguous(),
              "buffer_sample: tensors must be contiguous");
  TORCH_CHECK(written.scalar_type() == at::kByte, "buffer_sample: written must be uint8");
  const SampleParams p{PhiloxKey(seed.item<int64_t>()),
                       static_cast<uint32_t>(step.item<int64_t>()),
                       chain_offset,
                       slots_per_class,
                       storage.size(1),
                       static_cast<float>(reinit_prob),
                       parse_init_kind(init_kind),
                       Uint8Grid(lo, hi),
                       PhiloxStream(PhiloxKey(seed.item<int64_t>()),
                                    static_cast<uint32_t>(step.item<int64_t>()),
                                    kStreamReinitValues)};
  const int64_t* y_ptr = y.has_value() ? y->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "buffer_sample",
                                  [&] {
    using out_t = scalar_t;
    const out_t* init_ptr = init_values.has_value() ? init_values->data_ptr<out_t>() : nullptr;
    auto run = [&](auto* storage_ptr) {
      sample_rows(out.data_ptr<out_t>(), slots.data_ptr<int64_t>(), storage_ptr,
                  written.data_ptr<uint8_t>(), y_ptr, init_ptr, out.size(0), storage.size(0), p);
    };
    switch (storage.scalar_type()) {
      case at::kFloat: run(storage.data_ptr<float>()); break;
      case at::kBFloat16: run(storage.data_ptr<c10::BFloat16>()); break;
      case at::kByte: run(storage.data_ptr<uint8_t>()); break;
      default:
        TORCH_CHECK(false, "buffer_sample: unsupported storage dtype ", storage.scalar_type());
    }
  });
}

}  // namespace
}  // namespace ebm_fast

TORCH_LIBRARY_FRAGMENT(ebm_fast_cpu, m) {
  m.def("buffer_sample_out(Tensor(a!) out, Tensor(b!) slots, Tensor storage, Tensor written, "
        "Tensor? y, Tensor? init_values, Tensor seed, Tensor step, int chain_offset, "
        "int slots_per_class, float reinit_prob, str init_kind, float lo, float hi) -> ()");
}

TORCH_LIBRARY_IMPL(ebm_fast_cpu, CPU, m) {
  m.impl("buffer_sample_out", &ebm_fast::buffer_sample_out);
}
