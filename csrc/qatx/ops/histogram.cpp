#include "qatx/ops/histogram.h"

#include "qatx/ops/typed_op.h"

namespace qatx {
namespace ops {

using T = at::Tensor;
using CT = const at::Tensor&;
using Triple = std::tuple<T, T, T>;
using Pair = std::tuple<T, T>;
using OptInt = c10::optional<int64_t>;

Triple histogram_observe(CT input, CT hist, CT grid, CT bounds, OptInt axis) {
  QATX_DISPATCH("histogram_observe", Triple(CT, CT, CT, CT, OptInt), input, hist, grid,
                bounds, axis);
}

Pair histogram_range(CT hist, CT grid, CT bounds, const std::string& method, double percentile,
                                 int64_t quant_min, int64_t quant_max, bool symmetric) {
  QATX_DISPATCH("histogram_range", Pair(CT, CT, CT, c10::string_view, double, int64_t, int64_t, bool),
                hist, grid, bounds, c10::string_view(method), percentile, quant_min, quant_max, symmetric);
}

}  // namespace ops
}  // namespace qatx
