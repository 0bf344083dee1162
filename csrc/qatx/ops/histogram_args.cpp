#include <ATen/ops/aminmax.h>

#include "qatx/ops/histogram_impl.h"

namespace qatx {
namespace ops {

int64_t check_histogram_state(const at::Tensor& hist, const at::Tensor& grid, const at::Tensor& bounds,
                              const at::Device& device, const char* op) {
  TORCH_CHECK(hist.dim() == 2, op, ": hist must have shape [channels, bins], got ", hist.sizes());
  TORCH_CHECK(hist.scalar_type() == at::kLong, op, ": hist must be int64, got ", hist.scalar_type());
  const int64_t channels = hist.size(0), bins = hist.size(1);
  TORCH_CHECK(channels >= 1, op, ": hist needs at least one row (channel), got shape ", hist.sizes());
  TORCH_CHECK(bins >= math::kHistMinBins && bins <= math::kHistMaxBins, op, ": the number of bins (hist.shape[1] = ",
              bins, ") must be in [", math::kHistMinBins, ", ", math::kHistMaxBins, "]");
  TORCH_CHECK(grid.scalar_type() == at::kInt && grid.dim() == 2 && grid.size(0) == channels && grid.size(1) == 2,
              op, ": grid must be int32 of shape [", channels, ", 2], got ", grid.scalar_type(), " ", grid.sizes());
  TORCH_CHECK(bounds.scalar_type() == at::kFloat && bounds.dim() == 2 && bounds.size(0) == channels &&
                  bounds.size(1) == 2,
              op, ": bounds must be float32 of shape [", channels, ", 2], got ", bounds.scalar_type(), " ",
              bounds.sizes());
  for (const at::Tensor* t : {&hist, &grid, &bounds}) {
    TORCH_CHECK(t->device() == device, op, ": the histogram state must be on ", device, ", got ", t->device());
  }
  return channels;
}

void check_histogram_grid_values_cpu(const at::Tensor& grid, const char* op) {
  if (grid.numel() == 0) return;
  const at::Tensor e = grid.select(1, 0);
  const auto mm = at::aminmax(e);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= math::kHistMinExponent && hi <= 127, op, ": grid exponents (grid[:, 0]) must be in [",
              math::kHistMinExponent, ", 127], got [", lo, ", ", hi, "]");
}

math::HistMethod histogram_method(const std::string& method, const char* op) {
  if (method == "percentile") return math::HistMethod::Percentile;
  if (method == "mse") return math::HistMethod::Mse;
  if (method == "entropy") return math::HistMethod::Entropy;
  TORCH_CHECK(false, op, ": method must be 'percentile', 'mse' or 'entropy', got '", method, "'");
}

void check_percentile(double percentile, const char* op) {
  TORCH_CHECK(percentile > 0.0 && percentile <= 100.0, op, ": percentile must be in (0, 100], got ", percentile);
}

}  // namespace ops
}  // namespace qatx
