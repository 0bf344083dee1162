// Public C++ API of the histogram observer ops: typed calls through the dispatcher (CPU, CUDA,
// Meta). State layout, grid rule, range searches and errors: docs/ops.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace qatx {
namespace ops {

// (hist, grid, bounds) after adding `input`'s finite values; per tensor when axis is nullopt.
std::tuple<at::Tensor, at::Tensor, at::Tensor> histogram_observe(const at::Tensor& input, const at::Tensor& hist,
                                                                 const at::Tensor& grid, const at::Tensor& bounds,
                                                                 c10::optional<int64_t> axis = c10::nullopt);
// (min_val, max_val) per row, chosen by method "percentile", "mse" or "entropy".
std::tuple<at::Tensor, at::Tensor> histogram_range(const at::Tensor& hist, const at::Tensor& grid,
                                                   const at::Tensor& bounds, const std::string& method,
                                                   double percentile = 99.99, int64_t quant_min = -128,
                                                   int64_t quant_max = 127, bool symmetric = true);

}  // namespace ops
}  // namespace qatx
