// Public C++ API of the affine quantization ops: typed calls through the dispatcher, so they
// reach the CPU, CUDA and Meta kernels and record autograd exactly as calls from Python or
// TorchScript do. Formulas, rounding, gradients and errors: docs/ops.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace qatx {
namespace ops {

// ---- fake-quantize (differentiable, straight-through estimator) ----
at::Tensor fake_quantize_per_tensor_affine(const at::Tensor& input, const at::Tensor& scale,
                                           const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max);
at::Tensor fake_quantize_per_channel_affine(const at::Tensor& input, const at::Tensor& scale,
                                            const at::Tensor& zero_point, int64_t axis, int64_t quant_min,
                                            int64_t quant_max);
at::Tensor fake_quantize_per_group_affine(const at::Tensor& input, const at::Tensor& scale,
                                          const at::Tensor& zero_point, int64_t group_size, int64_t quant_min,
                                          int64_t quant_max);

// ---- forward with the bit-packed STE mask, and the STE backward ----
std::tuple<at::Tensor, at::Tensor> _fake_quantize_per_tensor_affine_with_mask(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
    int64_t quant_max);
std::tuple<at::Tensor, at::Tensor> _fake_quantize_per_channel_affine_with_mask(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point, int64_t axis,
    int64_t quant_min, int64_t quant_max);
std::tuple<at::Tensor, at::Tensor> _fake_quantize_per_group_affine_with_mask(
    const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point, int64_t group_size,
    int64_t quant_min, int64_t quant_max);
at::Tensor _fake_quantize_ste_backward(const at::Tensor& grad_output, const at::Tensor& mask);

// ---- quantize to integers / dequantize ----
at::Tensor quantize_per_tensor_affine(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                                      int64_t quant_min, int64_t quant_max, at::ScalarType dtype);
at::Tensor quantize_per_channel_affine(const at::Tensor& input, const at::Tensor& scale,
                                       const at::Tensor& zero_point, int64_t axis, int64_t quant_min,
                                       int64_t quant_max, at::ScalarType dtype);
at::Tensor quantize_per_group_affine(const at::Tensor& input, const at::Tensor& scale, const at::Tensor& zero_point,
                                     int64_t group_size, int64_t quant_min, int64_t quant_max, at::ScalarType dtype);
at::Tensor dequantize_per_tensor_affine(const at::Tensor& input, const at::Tensor& scale,
                                        const at::Tensor& zero_point,
                                        std::optional<at::ScalarType> output_dtype = std::nullopt);
at::Tensor dequantize_per_channel_affine(const at::Tensor& input, const at::Tensor& scale,
                                         const at::Tensor& zero_point, int64_t axis,
                                         std::optional<at::ScalarType> output_dtype = std::nullopt);
at::Tensor dequantize_per_group_affine(const at::Tensor& input, const at::Tensor& scale,
                                       const at::Tensor& zero_point, int64_t group_size,
                                       std::optional<at::ScalarType> output_dtype = std::nullopt);

}  // namespace ops
}  // namespace qatx
