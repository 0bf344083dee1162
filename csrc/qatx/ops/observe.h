// Public C++ API of the observe + fake-quantize ops: typed calls through the dispatcher.
// Formulas, rounding, gradients and errors: docs/ops.md.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace qatx {
namespace ops {

// Updates min_val / max_val from input's range, writes scale / zero_point from them and returns
// the fake-quantized input (straight-through gradient).
at::Tensor observe_fake_quantize_per_tensor_affine(const at::Tensor& input, at::Tensor& min_val, at::Tensor& max_val,
                                                   at::Tensor& scale, at::Tensor& zero_point,
                                                   double averaging_constant, int64_t quant_min, int64_t quant_max,
                                                   bool symmetric);
at::Tensor observe_fake_quantize_per_channel_affine(const at::Tensor& input, at::Tensor& min_val, at::Tensor& max_val,
                                                    at::Tensor& scale, at::Tensor& zero_point, int64_t axis,
                                                    double averaging_constant, int64_t quant_min, int64_t quant_max,
                                                    bool symmetric);
at::Tensor observe_fake_quantize_per_group_affine(const at::Tensor& input, at::Tensor& min_val, at::Tensor& max_val,
                                                  at::Tensor& scale, at::Tensor& zero_point, int64_t group_size,
                                                  double averaging_constant, int64_t quant_min, int64_t quant_max,
                                                  bool symmetric);
// The observing half alone (no output, no gradient).
void _observe_min_max(const at::Tensor& input, at::Tensor& min_val, at::Tensor& max_val, at::Tensor& scale,
                      at::Tensor& zero_point, std::optional<int64_t> axis, int64_t group_size,
                      double averaging_constant, int64_t quant_min, int64_t quant_max, bool symmetric);

}  // namespace ops
}  // namespace qatx
